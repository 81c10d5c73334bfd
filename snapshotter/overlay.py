"""Snapshots as overlayfs layers on local disk, like containerd's overlay snapshotter.

Layout: ROOT/metadata.db and ROOT/snapshots/<id>/{fs,work}. Crash safety comes
from the order of operations:
- create: build the directory under a temporary name, then, inside the metadata
  transaction, rename it to its id; a crash before COMMIT leaves a directory no
  snapshot names, which `recover()` removes at the next start;
- remove: delete the metadata first, then the directory (renamed to rm-<id>
  before it is deleted); a crash in between leaves garbage, never a snapshot
  without its directory.
All metadata work runs on one thread, one operation at a time (one writer).
"""

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from .crash_points import crash_point
from .errors import AlreadyExists, InvalidArgument, SnapshotError
from .filters import parse_filters, snapshot_fields
from .fusemanager.client import FuseManagerClient
from .lazy.layer_files import is_lazy_snapshot_dir, read_layer_record, tree_path
from .lazy.layer_source import LayerSource, NotLazy, layer_source
from .lazy.prefetch_wait import FIRST_BYTES
from .metadata import Info, Kind, MetaStore, Snapshot
from .metrics import FALLBACKS
from .usage import disk_usage

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Staging:
    def __init__(self, path: str):
        self.path = path
        self.final: str | None = None

    def place(self, final: str) -> None:
        os.rename(self.path, final)
        self.final = final


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: list[str]


def _overlay_index_supported() -> bool:
    # With the index feature on, overlayfs refuses to reuse a lower directory in
    # another mount; containerd turns it off whenever the kernel knows the option.
    return os.path.exists("/sys/module/overlay/parameters/index")


class OverlaySnapshotter:
    def __init__(self, root: str, lazy: FuseManagerClient | None = None,
                 prefetch_timeout: float = 60.0, prefetch_wait: str = FIRST_BYTES):
        self.lazy = lazy
        self.prefetch_timeout = prefetch_timeout
        self.prefetch_wait = prefetch_wait  # lazy.prefetch_wait
        self.root = os.path.abspath(root)
        self.snapshots_dir = os.path.join(self.root, "snapshots")
        os.makedirs(self.snapshots_dir, mode=0o700, exist_ok=True)
        self.meta = MetaStore(os.path.join(self.root, "metadata.db"))
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metadata")
        self._index_off = _overlay_index_supported()
        self._lazy_names: dict[int, str] = {}  # lazy snapshot id -> its FUSE directory
        self._mounting: set[str] = set()  # FUSE directories of lazy layers being committed

    async def close(self) -> None:
        await self._run(self.meta.close)
        self._writer.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    # -- paths and mounts --------------------------------------------------

    def _dir(self, sid: int) -> str:
        return os.path.join(self.snapshots_dir, str(sid))

    def upper_path(self, sid: int) -> str:
        return os.path.join(self._dir(sid), "fs")

    def work_path(self, sid: int) -> str:
        return os.path.join(self._dir(sid), "work")

    def lower_path(self, sid: int) -> str:
        """A committed snapshot as a lower layer: a lazy layer written out as a plain
        directory (lazy.materialize) is taken instead of its FUSE directory."""
        tree = tree_path(self._dir(sid))
        return tree if sid in self._lazy_names and os.path.isdir(tree) else self.upper_path(sid)

    def mounts_for(self, snap: Snapshot) -> list[Mount]:
        if not snap.parent_ids:
            mode = "ro" if snap.kind is Kind.VIEW else "rw"
            return [Mount("bind", self.upper_path(snap.id), [mode, "rbind"])]
        options = ["index=off"] if self._index_off else []
        if snap.kind is Kind.ACTIVE:
            options += [f"workdir={self.work_path(snap.id)}",
                        f"upperdir={self.upper_path(snap.id)}"]
        elif len(snap.parent_ids) == 1:
            return [Mount("bind", self.lower_path(snap.parent_ids[0]), ["ro", "rbind"])]
        lower = ":".join(self.lower_path(pid) for pid in snap.parent_ids)
        return [Mount("overlay", "overlay", [*options, f"lowerdir={lower}"])]

    # -- operations --------------------------------------------------------

    async def stat(self, key: str) -> Info:
        return await self._run(self.meta.info, key)

    async def update(self, key: str, labels: dict[str, str], field_paths: list[str]) -> Info:
        def update() -> Info:
            with self.meta.transaction():
                return self.meta.update(key, labels, field_paths)
        return await self._run(update)

    async def usage(self, key: str) -> tuple[int, int]:
        sid, kind, size, inodes = await self._run(self.meta.usage, key)
        if kind is Kind.COMMITTED:
            return size, inodes
        # Walking a tree can take long: off the metadata thread and the event loop.
        return await asyncio.to_thread(disk_usage, self.upper_path(sid))

    async def mounts(self, key: str) -> list[Mount]:
        snap = await self._run(self.meta.snapshot, key)
        await self._wait_for_lazy_parents(snap)
        return self.mounts_for(snap)

    async def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        source = layer_source(labels) if self.lazy else None
        if source is not None:
            await self._mount_remote(key, source, parent, labels)
        await self._wait_for_lazy_chain(parent)
        return self.mounts_for(await self._run(self._create, Kind.ACTIVE, key, parent, labels))

    async def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        await self._wait_for_lazy_chain(parent)
        return self.mounts_for(await self._run(self._create, Kind.VIEW, key, parent, labels))

    # -- lazy layers -------------------------------------------------------

    async def _mount_remote(self, key: str, source: LayerSource, parent: str,
                            labels: dict[str, str]) -> None:
        """Commit the wanted snapshot as a lazy layer and answer ALREADY_EXISTS, the
        remote-snapshot handshake; return quietly when the layer cannot be lazy, so the
        caller makes an ordinary snapshot and containerd unpacks the layer itself.

        The layer is served before its snapshot is committed: the FUSE manager fetches,
        verifies and parses the TOC and says how large the layer is, and a layer it
        refuses leaves nothing behind."""
        assert self.lazy is not None
        if await self._run(self.meta.exists, source.target):
            raise AlreadyExists(f"target snapshot {source.target}: already exists")
        staging = await asyncio.to_thread(tempfile.mkdtemp, prefix="new-",
                                          dir=self.snapshots_dir)
        name = f"l{secrets.token_hex(8)}"  # its directory in the FUSE mount
        self._mounting.add(name)  # served before it has a snapshot: not a leftover
        try:
            await self._serve_and_commit(key, source, parent, labels, staging, name)
        finally:
            self._mounting.discard(name)

    async def _serve_and_commit(self, key: str, source: LayerSource, parent: str,
                                labels: dict[str, str], staging: str, name: str) -> None:
        assert self.lazy is not None
        try:
            size = await self.lazy.mount_remote(name, staging, source)
        except NotLazy as exc:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            FALLBACKS.labels(reason="not lazy").inc()
            log.info("%s: unpacking %s the ordinary way: %s", key, source.layer_digest, exc)
            return
        except (SnapshotError, OSError) as exc:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            FALLBACKS.labels(reason="not served").inc()
            log.warning("%s: cannot serve %s lazily, unpacking it the ordinary way: %s",
                        key, source.layer_digest, exc)
            return
        crash_point("remote.served")
        try:
            snap = await self._run(self._commit_lazy, staging, name, source.target, parent,
                                   labels, size)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            with contextlib.suppress(SnapshotError):
                await self.lazy.unmount(name)
            raise
        self._lazy_names[snap.id] = name
        crash_point("remote.committed")
        log.info("%s: layer %s of %s mounted lazily as %s", key, source.layer_digest,
                 source.reference, source.target)
        raise AlreadyExists(f"target snapshot {source.target}: already exists (lazy layer)")

    def _commit_lazy(self, staging: str, name: str, target: str, parent: str,
                     labels: dict[str, str], size: int) -> Snapshot:
        assert self.lazy is not None
        with self.meta.transaction():
            snap = self.meta.create_committed(target, parent, labels, size)
            os.symlink(self.lazy.path_of(name), os.path.join(staging, "fs"))
            os.rename(staging, self._dir(snap.id))
            crash_point("remote.placed")
        return snap

    async def materialize(self, digests: list[str]) -> int:
        """Write the lazy layers with these blob digests out as plain directories, for
        the overlay mounts made from now on (lazy.materialize); returns how many were
        written. A layer that cannot be written out stays served as it was."""
        assert self.lazy is not None
        wanted = set(digests)
        written = 0
        for sid, name in sorted(self._lazy_names.items()):
            digest = self.lazy.layers.get(name)
            if digest not in wanted:
                continue
            try:
                answer = await self.lazy.materialize(name, self._dir(sid))
            except SnapshotError as exc:  # the others may still be written out
                log.warning("layer %s (snapshot id %d) stays served through FUSE: %s",
                            digest, sid, exc)
                continue
            written += not answer["existed"]
        return written

    async def _wait_for_lazy_parents(self, snap: Snapshot) -> None:
        await self._wait_for_lazy_ids(snap.parent_ids)

    async def _wait_for_lazy_chain(self, parent: str) -> None:
        """Before a snapshot is made over `parent`: wait for the prefetch of the lazy
        layers below (its first bytes or all of it: `prefetch_wait`), so a refusal
        (UNAVAILABLE) leaves no half-made snapshot."""
        if self.lazy is None or not self._lazy_names or not parent:
            return
        try:
            below = await self._run(self.meta.snapshot, parent)
        except SnapshotError:
            return  # the create that follows reports the missing parent
        await self._wait_for_lazy_ids([below.id, *below.parent_ids])

    async def _wait_for_lazy_ids(self, ids: list[int]) -> None:
        if self.lazy is None or not any(i in self._lazy_names for i in ids):
            return
        # A FUSE manager that came back serves the layers again only after a resync.
        await self.lazy.wait_in_line(self.prefetch_timeout)
        names = [n for n in map(self._lazy_names.get, ids) if n in self.lazy.layers]
        await self.lazy.wait_prefetched(names, self.prefetch_timeout, self.prefetch_wait)

    async def restore_lazy_layers(self) -> int:
        """Bring the FUSE manager's layers in line with the committed lazy snapshots:
        serve the ones it does not (it restarted, or never served them), stop serving
        the ones no snapshot names. Returns how many were mounted anew."""
        if self.lazy is None:
            return 0
        wanted: dict[str, tuple[int, str]] = {}  # FUSE name -> (snapshot id, blob digest)
        for sid in sorted(await self._run(self.meta.ids)):
            directory = self._dir(sid)
            if is_lazy_snapshot_dir(directory):
                record = await asyncio.to_thread(read_layer_record, directory)
                name = os.path.basename(os.readlink(os.path.join(directory, "fs")))
                wanted[name] = (sid, record.digest)
        self._lazy_names.update({sid: name for name, (sid, _) in wanted.items()})
        for name, digest in list(self.lazy.layers.items()):
            if name in self._mounting:
                continue  # a Prepare is committing it
            if name not in wanted or wanted[name][1] != digest:
                log.info("lazy layer %s (%s) has no snapshot: unmounting it", name, digest)
                await self.lazy.unmount(name)
        mounted = 0
        for name, (sid, _) in wanted.items():
            if name not in self.lazy.layers:
                await self.lazy.mount(name, self._dir(sid), restored=True)
                mounted += 1
        return mounted

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> Snapshot:
        with self._staging() as staging:
            os.mkdir(os.path.join(staging.path, "fs"), 0o755)
            if kind is Kind.ACTIVE:
                os.mkdir(os.path.join(staging.path, "work"), 0o711)
            crash_point("prepare.staged")
            with self.meta.transaction():
                snap = self.meta.create(kind, key, parent, labels)
                if snap.parent_ids:
                    # The new upper directory takes its parent's owner, as in containerd.
                    st = os.stat(self.upper_path(snap.parent_ids[0]))
                    os.lchown(os.path.join(staging.path, "fs"), st.st_uid, st.st_gid)
                staging.place(self._dir(snap.id))
                crash_point("prepare.placed")
            crash_point("prepare.committed")
            return snap

    @contextlib.contextmanager
    def _staging(self) -> Iterator["_Staging"]:
        """A directory built under a temporary name and renamed into place inside the
        metadata transaction; on any failure both names are removed again."""
        staging = _Staging(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
        try:
            yield staging
        except BaseException:
            for path in (staging.path, staging.final):
                if path and os.path.exists(path):
                    shutil.rmtree(path, ignore_errors=True)
            raise

    async def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        sid, kind, _, _ = await self._run(self.meta.usage, key)
        size, inodes = (0, 0)
        if kind is Kind.ACTIVE:
            size, inodes = await asyncio.to_thread(disk_usage, self.upper_path(sid))

        def commit() -> None:
            crash_point("commit.measured")
            with self.meta.transaction():
                self.meta.commit(key, name, labels, size, inodes)
            crash_point("commit.committed")
        await self._run(commit)

    async def remove(self, key: str) -> None:
        def remove() -> tuple[int, str]:
            with self.meta.transaction():
                sid, _ = self.meta.remove(key)
            # The metadata is gone for good: from here on the directory is garbage.
            crash_point("remove.deleted")
            garbage = os.path.join(self.snapshots_dir, f"rm-{sid}")
            try:
                os.rename(self._dir(sid), garbage)
            except FileNotFoundError:
                log.warning("snapshot %s (id %d) had no directory", key, sid)
            crash_point("remove.renamed")
            return sid, garbage
        sid, garbage = await self._run(remove)
        name = self._lazy_names.pop(sid, None)
        if self.lazy is not None and name is not None:
            try:
                await self.lazy.unmount(name)
            except SnapshotError as exc:  # the next reconnect unmounts it
                log.warning("snapshot id %d: FUSE manager: %s", sid, exc)
        await asyncio.to_thread(shutil.rmtree, garbage, True)

    async def walk(self, filters: list[str]) -> list[Info]:
        try:
            matcher = parse_filters(filters)
        except ValueError as exc:
            raise InvalidArgument(f"invalid filter: {exc}") from None

        def walk() -> list[Info]:
            return [info for info in self.meta.walk() if matcher.match(
                snapshot_fields(info.name, info.parent, info.kind.label, info.labels))]
        return await self._run(walk)

    def _garbage(self) -> list[str]:
        """Directories under snapshots/ that no snapshot owns (staging, removed, orphans)."""
        owned = {str(sid) for sid in self.meta.ids()}
        return [os.path.join(self.snapshots_dir, name)
                for name in os.listdir(self.snapshots_dir) if name not in owned]

    async def cleanup(self) -> list[str]:
        garbage = await self._run(self._garbage)
        for path in garbage:
            await asyncio.to_thread(shutil.rmtree, path, True)
        return garbage

    def recover(self) -> list[str]:
        """At start, before serving: drop what interrupted operations left behind, and
        report snapshots whose directories are missing."""
        garbage = self._garbage()
        for path in garbage:
            log.info("removing leftover directory %s", path)
            shutil.rmtree(path, ignore_errors=True)
        for sid in self.meta.ids():
            if is_lazy_snapshot_dir(self._dir(sid)):
                continue  # its fs is in the FUSE mount, served again by restore_lazy_layers
            if not os.path.isdir(self.upper_path(sid)):
                log.error("snapshot id %d has lost its directory %s", sid, self.upper_path(sid))
        return garbage
