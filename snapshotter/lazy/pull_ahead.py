"""An image's lazy layers opened and prefetching from the moment its pull is resolved,
before containerd prepares any of them.

`lazypull pull` hands its pull to the service, which knows the image (manifest digest
and layers) as soon as the manifest is resolved. Until then containerd's first Prepare
is still some round trips away (config, content records, the snapshotter's stat), and
each later Prepare waits for the one before. So the service tells the FUSE manager at
once, which for every lazy layer in parallel fetches and verifies the TOC, builds the
layer's index and starts the layer's prefetch. The Prepare that mounts the layer then
claims all of it: the index (moved into the snapshot's directory), and the fetcher
with its requests under way, so no chunk is fetched twice.

Nothing here may fail a pull: a layer that cannot be opened ahead is opened by its
mount as before, and a failed prefetch is fetched again by the mount's prefetch.
What no mount claims within KEEP_SECONDS is cancelled and dropped (the chunks it
cached stay in the cache).
"""

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import weakref
from dataclasses import dataclass, replace

import estargz
from estargz.prefetch_region import PREFETCH_REGION_ANNOTATION, decode_region, region_to_fetch
from oci.manifest import Descriptor
from oci.reference import Reference

from .fetcher import LayerFetcher
from .index_build import IndexBuilder, build_index
from .layer_files import LayerRecord
from .layer_source import LayerSource, NotLazy
from .manager import LazyLayers
from .prefetch_plan import prefetch_runs, read_ranges_of
from .raw_ahead import RawAhead
from .remote import RemoteLayer
from .toc_ahead import MAX_LAYERS_AHEAD, BlobKey, TocAhead

log = logging.getLogger(__name__)
KEEP_SECONDS = 120.0


@dataclass
class OpenedAhead:
    """A layer opened before its mount: verified TOC, index, and a fetcher prefetching."""

    remote: RemoteLayer
    index_path: str
    fetcher: LayerFetcher
    prefetch: asyncio.Task[int]


class PullAhead:
    def __init__(self, lazy: LazyLayers, toc_ahead: TocAhead, directory: str,
                 max_toc_size: int = estargz.toc.DEFAULT_MAX_TOC_SIZE,
                 keep_seconds: float = KEEP_SECONDS, builder: IndexBuilder | None = None):
        self.lazy = lazy
        self.builder = builder  # forks the processes that build indexes
        self.toc_ahead = toc_ahead
        self.directory = directory  # where indexes wait for their mount
        self.max_toc_size = max_toc_size
        self.keep_seconds = keep_seconds
        self._layers: dict[BlobKey, asyncio.Task[OpenedAhead]] = {}
        # Layers whose mount has asked (for KEEP_SECONDS): a pull announced after that
        # mount began must not open them a second time.
        self._claimed: set[BlobKey] = set()
        self._numbers = 0

    def start(self) -> None:
        """Empty the waiting room: what a previous manager left there is never claimed."""
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)

    async def pull(self, reference: Reference, manifest_digest: str,
                   layer_digests: list[str]) -> int:
        """Start opening the image's lazy layers that are neither mounted nor on their
        way; returns how many were started. Reads the manifest (through the TOC-ahead
        cache, which starts every lazy layer's TOC fetch and keeps the manifest for the
        mounts)."""
        if not layer_digests:
            return 0
        mounted = {m.record.digest for m in self.lazy.layers.values()}
        probe = LayerSource("", reference, layer_digests[0], manifest_digest)
        try:
            layers = await self.toc_ahead.image_layers(probe)
        except NotLazy as exc:
            log.info("pull of %s: nothing opened ahead: %s", reference, exc)
            return 0
        opening: dict[tuple[str, str, str], Descriptor] = {}  # a layer twice: once
        for descriptor in layers[:MAX_LAYERS_AHEAD]:
            key = (reference.registry, reference.repository, descriptor.digest)
            if estargz.TOC_DIGEST_ANNOTATION in descriptor.annotations \
                    and descriptor.digest not in mounted and key not in self._layers \
                    and key not in self._claimed:
                opening.setdefault(key, descriptor)
        for key, descriptor in opening.items():
            source = LayerSource("", reference, descriptor.digest, manifest_digest)
            task = asyncio.create_task(self._open(source, descriptor))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._layers[key] = task
            # Weakly: a claimed layer's TOC bytes and fetcher must not wait for the timer.
            asyncio.get_running_loop().call_later(self.keep_seconds, self._expire, key,
                                                  weakref.ref(task))
        log.info("pull of %s: opening %d lazy layers ahead of their mounts", reference,
                 len(opening))
        return len(opening)

    async def _open(self, source: LayerSource, descriptor: Descriptor) -> OpenedAhead:
        # A region named by the descriptor flows from now on, beside the TOC's request.
        raw = self._raw_ahead(source, descriptor, region_named_by(descriptor))
        try:
            fetched = await self.toc_ahead.toc(source.reference, descriptor)
        except BaseException:
            if raw is not None:
                raw.close()
            raise
        toc_digest = descriptor.annotations[estargz.TOC_DIGEST_ANNOTATION]
        self._numbers += 1
        index_path = os.path.join(self.directory, f"{self._numbers}.db")
        # The index is built in a child process (lazy.index_build) while this process
        # reads the prefetch region from the TOC, whose bytes start flowing at once; its
        # chunks are known only once the index is built (lazy.raw_ahead).
        building = asyncio.create_task(build_index(
            fetched.footer, fetched.toc_bytes, toc_digest, self.max_toc_size,
            index_path=index_path, builder=self.builder))
        try:
            read = read_ranges_of(descriptor)
            if raw is None:
                raw = self._raw_ahead(source, descriptor, await asyncio.to_thread(
                    region_to_fetch, fetched.footer, fetched.toc_bytes, toc_digest,
                    self.max_toc_size, read))
            built = await building
        except BaseException as exc:
            if not building.done():
                building.cancel()
                with contextlib.suppress(BaseException):
                    await building
            elif not building.cancelled() and building.exception() is None:
                building.result().layer.close()
            if raw is not None:
                raw.close()
            if isinstance(exc, estargz.FormatError):
                raise NotLazy(f"layer {descriptor.digest}: {exc}") from None
            raise
        log.info("layer %s: TOC verified at pull, %s", descriptor.digest, built.describe())
        layer = built.layer
        remote = RemoteLayer(source, descriptor, toc_digest, fetched.footer,
                             fetched.toc_bytes, layer)
        runs = await asyncio.to_thread(prefetch_runs, layer, read) if read else None
        fetcher = self.lazy.new_fetcher(LayerRecord.of(remote), layer, raw=raw,
                                        prefetch_runs=runs)
        prefetch = self.lazy.prefetch_ahead(fetcher)
        prefetch.add_done_callback(lambda t: _report(t, descriptor.digest, raw))
        return OpenedAhead(remote, index_path, fetcher, prefetch)

    def _raw_ahead(self, source: LayerSource, descriptor: Descriptor,
                   region: list[tuple[int, int]] | None) -> RawAhead | None:
        if not region:
            return None
        return RawAhead(functools.partial(self.lazy.client.stream_range, source.reference,
                                          descriptor.digest), region, descriptor.digest).start()

    async def claim(self, source: LayerSource, descriptor: Descriptor,
                    index_path: str) -> OpenedAhead | None:
        """The layer opened ahead for this mount, its index moved to `index_path`; None
        if none was (or its opening failed, or is of another TOC): the mount opens it."""
        key = (source.reference.registry, source.reference.repository, descriptor.digest)
        if key not in self._claimed:
            self._claimed.add(key)
            asyncio.get_running_loop().call_later(self.keep_seconds, self._claimed.discard,
                                                  key)
        task = self._layers.pop(key, None)
        if task is None:
            return None
        try:
            opened = await asyncio.shield(task)
        except Exception as exc:
            log.info("layer %s: opening ahead failed (%s); opening it now",
                     descriptor.digest, exc)
            return None
        if opened.remote.toc_digest != descriptor.annotations.get(
                estargz.TOC_DIGEST_ANNOTATION):
            await self.drop(opened)
            return None
        try:
            # The open index follows its file: same inode, now under the snapshot.
            await asyncio.to_thread(_move, opened.index_path, index_path)
        except OSError as exc:
            log.warning("layer %s: cannot place the index opened ahead: %s",
                        descriptor.digest, exc)
            await self.drop(opened)
            return None
        opened.remote = replace(opened.remote, source=source)
        opened.index_path = index_path
        return opened

    def _expire(self, key: BlobKey, ref: "weakref.ref[asyncio.Task[OpenedAhead]]") -> None:
        task = ref()
        if task is None or self._layers.get(key) is not task:
            return
        del self._layers[key]
        asyncio.get_running_loop().create_task(self._drop_task(task))

    async def _drop_task(self, task: asyncio.Task[OpenedAhead]) -> None:
        task.cancel()  # if it is still opening
        try:
            opened = await task
        except (Exception, asyncio.CancelledError):
            return
        log.info("layer %s: opened ahead but never mounted; dropped",
                 opened.remote.descriptor.digest)
        await self.drop(opened)

    async def drop(self, opened: OpenedAhead) -> None:
        opened.prefetch.cancel()
        await opened.fetcher.aclose()
        opened.remote.layer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(opened.index_path)

    async def close(self) -> None:
        tasks = list(self._layers.values())
        self._layers.clear()
        for task in tasks:
            await self._drop_task(task)


def _report(prefetch: "asyncio.Task[int]", digest: str, raw: RawAhead | None) -> None:
    if raw is not None:
        raw.close()  # what the prefetch did not take is not wanted
    if prefetch.cancelled():
        return
    if prefetch.exception() is not None:  # its mount fetches the region again
        log.info("layer %s: prefetch at pull failed: %s", digest, prefetch.exception())
    else:
        log.info("layer %s: prefetched %d bytes at pull", digest, prefetch.result())


def _move(source: str, target: str) -> None:
    try:
        os.replace(source, target)
    except OSError:  # another file system: a copy, then the waiting one goes
        shutil.copyfile(source, target)
        os.unlink(source)


def region_named_by(descriptor: Descriptor) -> list[tuple[int, int]] | None:
    """The prefetch region the descriptor's annotation names (None if none, or if it is
    malformed: then the region is read from the TOC, with a warning)."""
    text = descriptor.annotations.get(PREFETCH_REGION_ANNOTATION)
    if text is None:
        return None
    region = decode_region(text, descriptor.size)
    if region is None:
        log.warning("layer %s: ignoring a malformed %s annotation", descriptor.digest,
                    PREFETCH_REGION_ANNOTATION)
    return region
