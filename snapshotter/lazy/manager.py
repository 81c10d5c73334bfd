"""The lazy layers of a running service: one FUSE tree, a fetcher per layer, and
their prefetch and background fetch. How each layer is stored on disk is in
layer_files.py."""

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import estargz
from oci.reference import Reference
from oci.registry import RegistryClient

from ..errors import Unavailable
from .chunk_cache import ChunkCache
from .fetcher import LayerFetcher
from .filesystem import LazyFilesystem
from .gzip_layer import GzipLayer
from .layer_files import LayerRecord
from .materialize import TreeWritten, materialize
from .metrics import GZIP_INDEX_LAYERS_MOUNTED, LAYERS_MOUNTED, PREFETCH_FAILURES
from .prefetch_wait import FIRST_BYTES, UNTIL, WHOLE, first_bytes
from .profiles import ProfileRecorder
from .raw_ahead import FETCHER_RUN_BYTES, RawAhead

log = logging.getLogger(__name__)
# Pauses before a background fetch that failed (the registry was down) starts again:
# the first, doubled after each failure up to the last.
BACKGROUND_RETRY_SECONDS = (5.0, 300.0)
# A background fetch yields to containers at work for at most this long at a time, so
# that one that never stops reading does not keep its layers remote for ever.
BACKGROUND_MAX_YIELD_SECONDS = 60.0


class _MountedLayer:
    def __init__(self, fetcher: LayerFetcher, record: LayerRecord):
        self.fetcher = fetcher
        self.record = record
        self.prefetch: asyncio.Task[int] | None = None
        self.background: asyncio.Task[int] | None = None


class LazyLayers:
    def __init__(self, mountpoint: str, cache: ChunkCache, client: RegistryClient, *,
                 concurrency: int = 8, background: bool = True,
                 background_bytes_per_second: float | None = None,
                 background_quiet_seconds: float = 3.0,
                 small_file_window_bytes: int = 512 << 10,
                 demand_readahead_bytes: int = 0,
                 read_timeout: float | None = 30.0,
                 profiles: ProfileRecorder | None = None):
        self.fs = LazyFilesystem(mountpoint)
        self.mountpoint = mountpoint
        self.cache = cache
        self.client = client
        self.concurrency = concurrency
        self.background = background
        self.background_rate = background_bytes_per_second or None
        self.background_quiet_seconds = background_quiet_seconds
        self.small_file_window_bytes = small_file_window_bytes
        self.demand_readahead_bytes = demand_readahead_bytes
        self.read_timeout = read_timeout
        self.profiles = profiles
        self.layers: dict[str, _MountedLayer] = {}
        self._prefetching = 0
        self._activity_seen = 0  # _activity() when background fetching last looked
        self._prefetch_idle = asyncio.Event()
        self._prefetch_idle.set()

    async def start(self) -> None:
        os.makedirs(self.mountpoint, exist_ok=True)
        await self.fs.start()
        if self.profiles is not None:
            await self.profiles.start()

    def path_of(self, name: str) -> str:
        return os.path.join(self.mountpoint, name)

    def new_fetcher(self, record: LayerRecord, layer: estargz.Layer,
                    raw: RawAhead | None = None,
                    prefetch_runs: list[tuple[int, int]] | None = None) -> LayerFetcher:
        """`raw`: bytes of the blob already on their way (lazy.raw_ahead);
        `prefetch_runs`: the spans to prefetch, if not the whole prefetch region
        (lazy.prefetch_plan)."""
        reference = Reference.parse(record.reference)

        async def fetch_range(offset: int, length: int) -> bytes:
            return await self.client.fetch_range(reference, record.digest, offset, length)

        async def read_range(offset: int, length: int) -> bytes:
            if raw is None:
                return await fetch_range(offset, length)
            return await raw.read(offset, length, fetch_range)

        def stream_range(offset: int, length: int) -> AsyncIterator[bytes]:
            return self.client.stream_range(reference, record.digest, offset, length)

        fetcher = LayerFetcher(layer, read_range, self.cache, name=record.digest,
                               read_timeout=self.read_timeout, concurrency=self.concurrency,
                               background_bytes_per_second=self.background_rate,
                               window_bytes=self.small_file_window_bytes,
                               demand_readahead_bytes=self.demand_readahead_bytes,
                               # bytes on their way ahead are read from there, whole
                               stream_range=stream_range if raw is None else None,
                               prefetch_request_bytes=None if raw is None else
                               FETCHER_RUN_BYTES,
                               decoder=layer.decoder if isinstance(layer, GzipLayer) else None,
                               foreground_idle=self.fs.idle_seconds)
        fetcher.prefetch_runs = prefetch_runs
        return fetcher

    def prefetch_ahead(self, fetcher: LayerFetcher) -> "asyncio.Task[int]":
        """Start the prefetch of a layer not mounted yet (lazy.pull_ahead). It counts as
        a prefetch, so background fetches wait for it too."""
        return asyncio.create_task(self._counted(fetcher.prefetch()))

    def mount(self, name: str, record: LayerRecord, layer: estargz.Layer, *,
              restored: bool = False, fetcher: LayerFetcher | None = None,
              prefetching: "asyncio.Future[int] | None" = None,
              prefetch_runs: list[tuple[int, int]] | None = None) -> str:
        """Serve the layer under MOUNT/<name> and start fetching its prefetch region.
        `restored`: served again after a restart, not freshly pulled. `fetcher` and
        `prefetching`: the layer's, made and started before its mount (lazy.pull_ahead),
        or a fetch of its hot spans under way (lazy.index_prefetch); the mount's prefetch
        waits for that one and then fetches what it left out."""
        fetcher = fetcher or self.new_fetcher(record, layer, prefetch_runs=prefetch_runs)
        mounted = _MountedLayer(fetcher, record)
        path = self.fs.add_layer(name, layer, fetcher.read)
        if self.profiles is not None:
            self.fs.observe_layer(name, self.profiles.attach(
                name, record.reference, record.digest, record.manifest_digest,
                fresh=not restored))
        self.layers[name] = mounted
        mounted.prefetch = asyncio.create_task(self._prefetch(name, mounted, prefetching))
        self._count()
        return path

    def _count(self) -> None:
        LAYERS_MOUNTED.set(len(self.layers))
        GZIP_INDEX_LAYERS_MOUNTED.set(sum(isinstance(m.fetcher.layer, GzipLayer)
                                          for m in self.layers.values()))

    async def _counted(self, prefetch: Awaitable[int]) -> int:
        """Await a prefetch, counted so that background fetches wait for it."""
        self._prefetching += 1
        self._prefetch_idle.clear()
        try:
            return await prefetch
        finally:
            self._prefetching -= 1
            if self._prefetching == 0:
                self._prefetch_idle.set()

    async def _prefetch(self, name: str, mounted: _MountedLayer,
                        ahead: "asyncio.Future[int] | None" = None) -> int:
        fetched = 0
        if ahead is not None:
            fetched = await self._counted(_settled(name, ahead))
        fetched += await self._counted(mounted.fetcher.prefetch())
        log.info("layer %s (%s): prefetched %d bytes", name, mounted.record.digest, fetched)
        if self.background:
            mounted.background = asyncio.create_task(self._fetch_rest(name, mounted))
        return fetched

    async def _fetch_rest(self, name: str, mounted: _MountedLayer) -> int:
        pause, longest = BACKGROUND_RETRY_SECONDS
        while True:
            # Background fetch shares the link with every layer's prefetch, and each
            # fetcher orders only its own requests: measured cold starts were up to twice
            # as slow when it ran alongside another layer's prefetch. So it waits for all.
            await self._prefetch_idle.wait()
            await self._quiet()
            try:
                fetched = await mounted.fetcher.fetch_all(self._yield_to_containers)
                break
            except Exception as exc:  # what was fetched stays cached; the rest comes later
                log.warning("layer %s: background fetch stopped: %s; trying again in %.0fs",
                            name, exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)
        log.info("layer %s: fully local (%d bytes fetched in the background)", name, fetched)
        return fetched

    def _activity(self) -> int:
        """Reads and on-demand requests so far, of every layer: grows while containers
        work, whether their reads hit the cache or not."""
        return sum(m.fetcher.stats.reads + m.fetcher.stats.demand_requests
                   for m in self.layers.values())

    async def _quiet(self) -> None:
        """Wait until containers have stopped reading for a while: a starting workspace
        reads on demand right after the prefetch, and background requests beside those
        reads delayed measured cold starts by a factor of two; beside reads from the
        cache (a warm node), their transfer and verification took the CPU the starting
        workspace wanted."""
        while True:
            before = self._activity()
            await asyncio.sleep(self.background_quiet_seconds)
            after = self._activity()
            self._activity_seen = after
            if after == before and self._prefetching == 0:
                return

    async def _yield_to_containers(self) -> None:
        """Before each background request: if containers read since the last one, wait
        until they are quiet again (BACKGROUND_MAX_YIELD_SECONDS at most)."""
        if self._activity() == self._activity_seen and self._prefetching == 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quiet(), BACKGROUND_MAX_YIELD_SECONDS)
        self._activity_seen = self._activity()

    async def wait_prefetched(self, names: list[str], timeout: float,
                              until: str = WHOLE) -> None:
        """Wait for the prefetch of these layers: its end (WHOLE), or its first bytes
        (FIRST_BYTES: the first of its requests verified and cached, or its end);
        UNAVAILABLE if it fails before that or takes too long. A prefetch that failed
        before is started again: its failure must not outlive its cause (the registry
        may be back)."""
        if until not in UNTIL:
            raise ValueError(f"wait for the prefetch's {FIRST_BYTES!r} or {WHOLE!r}, "
                             f"not {until!r}")
        for name in names:
            mounted = self.layers.get(name)
            if mounted is not None and _failed(mounted.prefetch):
                mounted.fetcher.prefetch_answered.clear()  # the next answer is the new one's
                mounted.prefetch = asyncio.create_task(self._prefetch(name, mounted))
        layers = [self.layers[n] for n in names if n in self.layers]
        pending: list[asyncio.Future[Any]] = [
            m.prefetch if until == WHOLE else
            asyncio.ensure_future(first_bytes(m.prefetch, m.fetcher.prefetch_answered))
            for m in layers if m.prefetch is not None]
        if not pending:
            return
        done, still = await asyncio.wait(pending, timeout=timeout)
        if until == FIRST_BYTES:
            for waiter in still:
                waiter.cancel()  # the waiter only: the prefetch goes on
        if still:
            PREFETCH_FAILURES.inc()
            what = "finish" if until == WHOLE else "have its first bytes"
            raise Unavailable(f"prefetch of {len(still)} lazy layer(s) did not {what} "
                              f"within {timeout:.0f}s (registry unreachable or slow)")
        for task in done:
            if task.exception() is not None:
                PREFETCH_FAILURES.inc()
                raise Unavailable(f"prefetch of a lazy layer failed: {task.exception()}")

    async def materialize(self, name: str, directory: str) -> TreeWritten:
        """Write the layer served as `name` out to DIRECTORY/tree (lazy.materialize),
        fetching what is not cached yet."""
        mounted = self.layers[name]
        written = await materialize(mounted.fetcher.layer, mounted.fetcher.read, directory)
        if not written.existed:
            log.info("layer %s (%s): written out as a directory: %d entries, %d bytes in "
                     "%.2fs", name, mounted.record.digest, written.entries, written.bytes,
                     written.seconds)
        return written

    async def unmount(self, name: str) -> None:
        mounted = self.layers.pop(name, None)
        if mounted is None:
            return
        for task in (mounted.prefetch, mounted.background):
            if task is not None:
                task.cancel()
        await mounted.fetcher.aclose()
        with contextlib.suppress(KeyError, ValueError):
            await self.fs.remove_layer(name)
        if self.profiles is not None:
            self.profiles.detach(name)
        if isinstance(mounted.fetcher.layer, GzipLayer):
            mounted.fetcher.layer.decoder.close()  # its index blob's file
        self._count()

    async def close(self) -> None:
        for name in list(self.layers):
            await self.unmount(name)
        if self.profiles is not None:
            await self.profiles.close()  # after the unmounts, which end the recordings
        await self.fs.close()


def _failed(task: asyncio.Task[int] | None) -> bool:
    return task is not None and task.done() and not task.cancelled() \
        and task.exception() is not None


async def _settled(name: str, ahead: "asyncio.Future[int]") -> int:
    """Bytes a prefetch started before the mount fetched. Its failure or cancellation is
    not the mount's: the fetcher's own prefetch then fetches what it could not."""
    await asyncio.wait([ahead])
    if ahead.cancelled():
        log.info("layer %s: prefetch started ahead was cancelled", name)
        return 0
    if (exc := ahead.exception()) is not None:
        log.info("layer %s: prefetch started ahead failed: %s", name, exc)
        return 0
    return ahead.result()
