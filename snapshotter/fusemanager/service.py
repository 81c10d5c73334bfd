"""The FUSE manager's operations: what the snapshotter may ask of the lazy layers.

Layers are named by the snapshotter (their directories in the FUSE mount). A new
layer is opened from the registry (the TOCs of its image's other layers fetched at
the same time, lazy.toc_ahead), or taken over from the work a pull announced before
its Prepares started (`pull_ahead`, lazy.pull_ahead), and its TOC stored in the
directory the request names (`toc` and `layer.json`); a layer served again after a
restart is loaded from that directory, so no request carries a TOC. Warm-set
questions name a layer by its blob digest.
"""

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from estargz import Layer
from estargz.toc import DEFAULT_MAX_TOC_SIZE
from oci.reference import Reference, ReferenceError

from ..errors import Unavailable
from ..lazy.index_build import IndexBuilder
from ..lazy.index_lookup import IndexLookup, indexable
from ..lazy.layer_chunks import bytes_cached, chunks_missing, wanted_digests
from ..lazy.layer_files import (
    INDEX_FILE,
    LayerRecord,
    load_layer_files,
    write_layer_files,
    write_layer_record,
)
from ..lazy.layer_source import LayerSource, NotLazy
from ..lazy.manager import LazyLayers
from ..lazy.metrics import REGISTRY
from ..lazy.prefetch_plan import prefetch_runs, read_ranges_of
from ..lazy.prefetch_wait import WHOLE
from ..lazy.pull_ahead import PullAhead
from ..lazy.remote import open_remote_layer
from ..lazy.toc_ahead import TocAhead
from ..prometheus import generate_latest
from .protocol import (
    INTERNAL,
    INVALID,
    NOT_FOUND,
    NOT_LAZY,
    PROTOCOL_VERSION,
    UNAVAILABLE,
    ManagerError,
)
from .registry_relay import RegistryRelay

log = logging.getLogger(__name__)
Handler = Callable[..., Awaitable[Any]]
# Connections opened to a registry while a pull reads its manifest: about what its
# lazy layers' TOC parts and prefetch streams want at once (lazy.remote, raw_ahead).
PRECONNECTIONS = 8


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise ManagerError(INVALID, f"bad layer name {name!r}")


class FuseManagerService:
    def __init__(self, lazy: LazyLayers, max_toc_bytes: int = DEFAULT_MAX_TOC_SIZE,
                 index_lookup: IndexLookup | None = None,
                 registry_relay: RegistryRelay | None = None, ahead_dir: str | None = None,
                 index_build_template: bool = True):
        self.lazy = lazy
        self.max_toc_bytes = max_toc_bytes
        self.index_lookup = index_lookup  # None: plain gzip layers are pulled, not indexed
        self.toc_ahead = TocAhead(lazy.client, max_toc_bytes)
        # forks the processes that index layers' TOCs (None: each starts its own)
        self.index_builder = IndexBuilder() if index_build_template else None
        # None: layers are opened by their mounts only (pull_ahead is refused).
        self.pull_ahead = PullAhead(lazy, self.toc_ahead, ahead_dir, max_toc_bytes,
                                    builder=self.index_builder) if ahead_dir else None
        self._preconnecting: set[asyncio.Task[None]] = set()
        self.handlers: dict[str, Handler] = {
            "hello": self.hello, "mount": self.mount, "mount_remote": self.mount_remote,
            "unmount": self.unmount, "pull_ahead": self.open_ahead,
            "materialize": self.materialize,
            "wait_prefetched": self.wait_prefetched, "fetch": self.fetch,
            "chunks_missing": self.chunks_missing, "layer_bytes": self.layer_bytes,
            "protect": self.protect, "release": self.release, "release_others": self.release_others,
            "metrics": self.metrics,
        }
        if registry_relay is not None:  # reads for the service's pulls
            registry_relay.before_manifest = self._open_connections
            registry_relay.on_manifest = self.toc_ahead.remember
            self.handlers |= {"registry_manifest": registry_relay.manifest,
                              "registry_blob": registry_relay.blob}

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        handler = self.handlers.get(op)
        if handler is None:
            raise ManagerError(INVALID, f"unknown operation {op!r}")
        try:
            return await handler(**args)
        except TypeError as exc:
            raise ManagerError(INVALID, f"{op}: {exc}") from None
        except Unavailable as exc:
            raise ManagerError(UNAVAILABLE, str(exc)) from None

    # -- layers ------------------------------------------------------------------------

    async def hello(self, protocol: int) -> dict[str, Any]:
        if protocol != PROTOCOL_VERSION:
            raise ManagerError(INVALID, f"this FUSE manager speaks protocol {PROTOCOL_VERSION}"
                                        f", not {protocol}: restart it with this version")
        return {"protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                "mountpoint": self.lazy.mountpoint, "layers": self._layers()}

    def _layers(self) -> list[dict[str, str]]:
        return [{"name": name, "digest": mounted.record.digest}
                for name, mounted in self.lazy.layers.items()]

    async def mount(self, name: str, directory: str, restored: bool = False
                    ) -> dict[str, Any]:
        """Serve the layer stored in `directory` as MOUNT/<name> (a no-op if it is);
        returns the path, the blob digest and the bytes of its regular files."""
        _check_name(name)
        if name not in self.lazy.layers:
            try:
                record, layer = await asyncio.to_thread(load_layer_files, directory)
            except FileNotFoundError as exc:
                raise ManagerError(NOT_FOUND, f"layer {name}: {exc}") from None
            except Exception as exc:
                raise ManagerError(INVALID, f"layer {name} in {directory}: {exc}") from None
            if name not in self.lazy.layers:  # not mounted by another request meanwhile
                self.lazy.mount(name, record, layer, restored=restored)
        return self._served(name)

    async def mount_remote(self, name: str, directory: str, source: dict[str, Any]
                           ) -> dict[str, Any]:
        """Fetch and verify a remote layer's TOC, store it in `directory` (toc and
        layer.json, for later mounts) and serve the layer as MOUNT/<name>. The TOC comes
        over the connections the layer's chunks will use, already warmed up."""
        _check_name(name)
        try:
            wanted = LayerSource(str(source["target"]), Reference.parse(source["reference"]),
                                 str(source["layer_digest"]), source.get("manifest_digest"))
        except (KeyError, TypeError, ReferenceError) as exc:
            raise ManagerError(INVALID, f"bad layer source: {exc}") from None
        try:
            found = await self.toc_ahead.find_layer(wanted)
            if self.index_lookup is not None and indexable(found.descriptor):
                indexed = await self.index_lookup.open(wanted, found, directory)
                await asyncio.to_thread(write_layer_record, directory, indexed.record)
                if name not in self.lazy.layers:
                    self.lazy.mount(name, indexed.record, indexed.layer,
                                    prefetching=indexed.prefetch)
                return self._served(name)
            index_path = os.path.join(directory, INDEX_FILE)
            opened = None if self.pull_ahead is None else \
                await self.pull_ahead.claim(wanted, found.descriptor, index_path)
            if opened is not None:
                remote = opened.remote
            else:
                remote = await open_remote_layer(self.lazy.client, wanted, self.max_toc_bytes,
                                                 index_path=index_path,
                                                 descriptor=found.descriptor,
                                                 ahead=self.toc_ahead,
                                                 builder=self.index_builder)
        except NotLazy as exc:
            raise ManagerError(NOT_LAZY, str(exc)) from None
        await asyncio.to_thread(write_layer_files, directory, remote)
        if name in self.lazy.layers:  # mounted by another request meanwhile
            if opened is not None and self.pull_ahead is not None:
                await self.pull_ahead.drop(opened)
        elif opened is not None:
            self.lazy.mount(name, LayerRecord.of(remote), remote.layer,
                            fetcher=opened.fetcher, prefetching=opened.prefetch)
        else:
            read = read_ranges_of(remote.descriptor)
            runs = await asyncio.to_thread(prefetch_runs, remote.layer, read) if read else None
            self.lazy.mount(name, LayerRecord.of(remote), remote.layer, prefetch_runs=runs)
        log.info("layer %s: served lazily from its TOC%s", remote.descriptor.digest,
                 " (opened at pull)" if opened is not None else "")
        return self._served(name)

    def _open_connections(self, reference: Reference) -> None:
        """A pull is reading its manifest: meanwhile the connections for the TOC and
        prefetch requests that follow are opened (RegistryClient.preconnect)."""
        async def preconnect() -> None:
            try:
                opened = await self.lazy.client.preconnect(reference, PRECONNECTIONS)
            except Exception as exc:  # e.g. a hosts.toml gone bad: the requests say
                log.debug("no connections opened ahead to %s: %s", reference.registry, exc)
                return
            log.debug("%d connections opened ahead to %s", opened, reference.registry)
        task = asyncio.get_running_loop().create_task(preconnect())
        self._preconnecting.add(task)
        task.add_done_callback(self._preconnecting.discard)

    async def open_ahead(self, reference: str, manifest_digest: str,
                         layers: list[str]) -> int:
        """A pull of this image is under way: open its lazy layers and start their
        prefetch now, for the mounts that follow (lazy.pull_ahead). Returns how many
        layers were started; the work goes on after the answer."""
        if self.pull_ahead is None:
            raise ManagerError(INVALID, "this FUSE manager does not open layers ahead")
        try:
            parsed = Reference.parse(reference)
        except ReferenceError as exc:
            raise ManagerError(INVALID, f"bad reference: {exc}") from None
        if not isinstance(manifest_digest, str) or not isinstance(layers, list) \
                or not all(isinstance(d, str) for d in layers):
            raise ManagerError(INVALID, "manifest_digest and layers must be digests")
        return await self.pull_ahead.pull(parsed, manifest_digest, layers)

    def _served(self, name: str) -> dict[str, Any]:
        mounted = self.lazy.layers[name]
        return {"path": self.lazy.path_of(name), "digest": mounted.record.digest,
                "size": mounted.fetcher.layer.regular_bytes}

    async def unmount(self, name: str) -> None:
        await self.lazy.unmount(name)

    async def wait_prefetched(self, names: list[str], timeout: float,
                              until: str = WHOLE) -> None:
        """`until`: the prefetch's first bytes or its whole (lazy.prefetch_wait); a
        client that does not say waits for the whole, as before the choice existed."""
        try:
            await self.lazy.wait_prefetched(names, timeout, until)
        except ValueError as exc:  # an `until` the manager does not know
            raise ManagerError(INVALID, f"wait_prefetched: {exc}") from None

    async def materialize(self, name: str, directory: str) -> dict[str, Any]:
        """Write the layer served as MOUNT/<name> out to DIRECTORY/tree, the plain
        directory new overlay mounts take instead (lazy.materialize)."""
        _check_name(name)
        if name not in self.lazy.layers:
            raise ManagerError(NOT_FOUND, f"layer {name} is not served")
        try:
            written = await self.lazy.materialize(name, directory)
        except OSError as exc:
            raise ManagerError(INTERNAL, f"layer {name}: writing it out: {exc}") from None
        return {"entries": written.entries, "bytes": written.bytes,
                "seconds": written.seconds, "existed": written.existed}

    # -- the warm set's questions, by layer digest ---------------------------------------

    def _mounted(self, digest: str) -> Any:
        for mounted in list(self.lazy.layers.values()):
            if mounted.record.digest == digest:
                return mounted
        raise ManagerError(NOT_FOUND, f"no lazy layer {digest} is mounted")

    def _layer(self, digest: str) -> Layer:
        return self._mounted(digest).fetcher.layer

    async def fetch(self, digest: str, full: bool) -> None:
        """Fetch the chunks a policy wants: the prefetch region, or the whole layer."""
        mounted = self._mounted(digest)
        if mounted.prefetch is not None and not mounted.prefetch.done():
            # The prefetch the mount started; if it failed, the one below says why.
            with contextlib.suppress(Exception):
                await asyncio.shield(mounted.prefetch)
        # The whole region, unread chunks of large files too: a warm set keeps it all
        # local (chunks_missing asks about all of it).
        await mounted.fetcher.prefetch(mounted.fetcher.layer.prefetch_span_ranges())
        if full:
            await mounted.fetcher.fetch_all()

    async def chunks_missing(self, digest: str, full: bool) -> bool:
        return await asyncio.to_thread(chunks_missing, self._layer(digest), full,
                                       self.lazy.cache)

    async def layer_bytes(self, digest: str) -> list[int]:
        return list(await asyncio.to_thread(bytes_cached, self._layer(digest), self.lazy.cache))

    async def protect(self, owner: str, digests: list[str], full: bool) -> None:
        """Protect the wanted chunks of these layers (the mounted ones) for `owner`.
        In a worker thread, the digests streamed from the layers' indexes into the
        cache's: a layer of a million chunks is never a list in memory."""
        layers: list[Layer] = []
        for digest in digests:
            with contextlib.suppress(ManagerError):
                layers.append(self._layer(digest))
        chunks = itertools.chain.from_iterable(wanted_digests(layer, full) for layer in layers)
        await asyncio.to_thread(self.lazy.cache.protect, chunks, owner)

    async def release(self, owner: str) -> None:
        await asyncio.to_thread(self.lazy.cache.release, owner)

    async def release_others(self, prefix: str, keep: list[str]) -> list[str]:
        """Release every owner that starts with `prefix` but with none of `keep`: a
        restarted warm set drops what its predecessor protected for images or digests
        it no longer has."""
        dropped = [o for o in await asyncio.to_thread(self.lazy.cache.owners)
                   if o.startswith(prefix) and not any(o.startswith(k) for k in keep)]
        for owner in dropped:
            await asyncio.to_thread(self.lazy.cache.release, owner)
        return dropped

    async def metrics(self) -> str:
        return generate_latest(REGISTRY).decode()
