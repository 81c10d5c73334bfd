"""The gzip indexes of an image's layers, fetched and built all at once when the first
of its layers is looked up.

containerd prepares an image's layers one after another, and each mount through a gzip
index waits for its index blob (a round trip and its transfer) and for the tree built
from it into SQLite. Once the image's indexes are known (IndexLookup), every layer's
index blob is fetched at once (a few at a time) and its tree built in a worker thread,
into a staging directory; the Prepares that follow find theirs ready or on the way,
and move it into their own directory. The layer a mount waits for goes first: its blob
alone on the wire, then the others'; the trees one after another in the image's order
(a build is mostly Python: two at once take as long as one after the other). With a
chunk cache, each layer's hot spans are fetched as soon as its index is in hand
(index_prefetch.py), and its mount's prefetch waits for them rather than asking again.

Only work is done ahead, no trust is given ahead: the blob is checked against its
digest and the layer it names as when fetched for a mount, and the mount checks the
layer's size against its own descriptor. A blob that fails those checks fails only its
own layer. What no mount claims within KEEP_SECONDS is deleted.
"""

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gzindex
from estargz import FormatError
from indexer.lookup import LayerIndex, fetch_index
from oci.digest import DigestMismatchError
from oci.reference import Reference

from .gzip_layer import build_gzip_layer
from .index_prefetch import prefetch_hot_spans
from .layer_files import GZIP_INDEX_FILE, INDEX_FILE

if TYPE_CHECKING:
    from oci.registry import RegistryClient

    from .chunk_cache import ChunkCache

log = logging.getLogger(__name__)
INDEX_AHEAD_DIR = "gzip-index-ahead"  # the staging directory, under the service's root
KEEP_SECONDS = 120.0
MAX_LAYERS_AHEAD = 64  # layers of one image prepared ahead, at most
FETCHES_AT_ONCE = 4  # index blobs on the wire at once
BUILDS_AT_ONCE = 1  # trees built at once, of all images
DECODES_AT_ONCE = 1  # worker threads inflating and hashing hot spans, of all images
BlobKey = tuple[str, str, str]  # registry, repository, layer digest


class IndexRefused(Exception):
    """The index blob fetched ahead is not the one listed (its digest or its layer):
    fetching it again would give the same bytes."""


@dataclass(frozen=True)
class StagedIndex:
    """A layer's index blob and the tree built from it, in a directory of their own."""

    directory: str
    index: LayerIndex
    layer_size: int  # as the index's header says: the mount checks it against its own
    fetch_seconds: float
    build_seconds: float
    prefetch: "asyncio.Task[int] | None" = None  # its hot spans into the chunk cache

    def move_into(self, directory: str) -> None:
        """Move the blob and the tree to `directory` (the tree last: a mount that finds
        the tree finds its blob) and remove the staging directory."""
        for name in (GZIP_INDEX_FILE, INDEX_FILE):
            shutil.move(os.path.join(self.directory, name), os.path.join(directory, name))
        shutil.rmtree(self.directory, ignore_errors=True)


class IndexAhead:
    def __init__(self, client: "RegistryClient", staging: str, *,
                 cache: "ChunkCache | None" = None, keep_seconds: float = KEEP_SECONDS,
                 fetches_at_once: int = FETCHES_AT_ONCE, builds_at_once: int = BUILDS_AT_ONCE):
        self.client = client
        self.staging = staging
        self.cache = cache  # None: hot spans are left to the mounts' prefetch
        self.keep_seconds = keep_seconds
        self._fetch_slots = asyncio.Semaphore(fetches_at_once)
        self._build_slots = asyncio.Semaphore(builds_at_once)
        self._decode_slots = asyncio.Semaphore(DECODES_AT_ONCE)
        self._staged: dict[BlobKey, asyncio.Task[StagedIndex]] = {}
        # Leftovers of an earlier run are no mount's: nothing in the staging area is.
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging, mode=0o700, exist_ok=True)

    def start(self, reference: Reference, indexes: Iterable[LayerIndex],
              first: str | None = None) -> int:
        """Start fetching and building the indexes no mount has claimed or is waiting
        for, that of layer `first` (the one a mount waits for) first, then in the
        image's order; returns how many were started."""
        started = 0
        loop = asyncio.get_running_loop()
        ordered = sorted(indexes, key=lambda index: index.layer_digest != first)
        first_fetched: asyncio.Event | None = None
        built_before: asyncio.Event | None = None
        for index in ordered[:MAX_LAYERS_AHEAD]:
            key = (reference.registry, reference.repository, index.layer_digest)
            if key in self._staged:  # (another image's lookup may have started it)
                continue
            fetched, built = asyncio.Event(), asyncio.Event()
            task = loop.create_task(self._prepare(reference, index, first_fetched, fetched,
                                                  built_before, built))
            if first_fetched is None:
                first_fetched = fetched
            built_before = built
            # A preparation nobody awaits must not log "exception never retrieved".
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._staged[key] = task
            loop.call_later(self.keep_seconds, self._expire, key, task)
            started += 1
        return started

    async def claim(self, reference: Reference, index: LayerIndex) -> StagedIndex | None:
        """The layer's staged index (claimed: nobody else gets it), once ready; None if
        none was started for this very blob or its fetch failed on the way (the registry
        may be back: the mount fetches it again). IndexRefused if its bytes are wrong."""
        key = (reference.registry, reference.repository, index.layer_digest)
        task = self._staged.get(key)
        if task is None:
            return None
        del self._staged[key]
        try:
            staged = await asyncio.shield(task)
        except IndexRefused:
            raise
        except Exception as exc:  # a registry error, a full disk: try again without
            log.info("layer %s: gzip index fetched ahead failed (%s); fetching it again",
                     index.layer_digest, exc)
            return None
        if staged.index.descriptor != index.descriptor:  # another image listed another blob
            shutil.rmtree(staged.directory, ignore_errors=True)
            return None
        return staged

    async def _prepare(self, reference: Reference, index: LayerIndex,
                       fetch_after: asyncio.Event | None, fetched_now: asyncio.Event,
                       build_after: asyncio.Event | None, built_now: asyncio.Event
                       ) -> StagedIndex:
        """Fetch the blob once `fetch_after` is set (the first layer's fetched), build
        the tree once `build_after` is (the layer before it built); set `fetched_now`
        and `built_now` when done with each, whether it worked or not."""
        directory = tempfile.mkdtemp(prefix="layer-", dir=self.staging)
        prefetch = prefetch_index = None
        try:
            try:
                if fetch_after is not None:
                    await fetch_after.wait()
                async with self._fetch_slots:
                    started = time.monotonic()
                    opened = await fetch_index(self.client, reference, index,
                                               os.path.join(directory, GZIP_INDEX_FILE))
                    fetched = time.monotonic()
            except Exception as exc:
                if _refusal(exc):
                    raise IndexRefused(str(exc)) from None
                raise
            finally:
                fetched_now.set()
            if self.cache is not None:
                # Its own open index: the build reads the file table meanwhile.
                prefetch_index = gzindex.GzipIndex.open(os.path.join(directory,
                                                                     GZIP_INDEX_FILE))
                prefetch = asyncio.get_running_loop().create_task(
                    self._prefetch(reference, index, prefetch_index))
                # Nobody may await it (its layer never claimed): no "never retrieved".
                prefetch.add_done_callback(lambda t: t.cancelled() or t.exception())
            try:
                if build_after is not None:
                    await build_after.wait()
                async with self._build_slots:
                    built = time.monotonic()
                    layer = await asyncio.to_thread(
                        build_gzip_layer, opened, index.descriptor.digest,
                        opened.header.layer_size, os.path.join(directory, INDEX_FILE))
                    layer.close()
                    finished = time.monotonic()
                size = opened.header.layer_size
            finally:
                opened.close()
        except BaseException:
            built_now.set()
            if prefetch is not None and prefetch_index is not None:
                prefetch.cancel()
                prefetch_index.close()  # (a task cancelled before it ran closes nothing)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        built_now.set()
        log.info("layer %s: gzip index %s fetched ahead in %.3fs, its tree built in %.3fs",
                 index.layer_digest, index.descriptor.digest, fetched - started,
                 finished - built)
        return StagedIndex(directory, index, size, fetched - started, finished - built,
                           prefetch)

    async def _prefetch(self, reference: Reference, index: LayerIndex,
                        opened: "gzindex.GzipIndex") -> int:
        assert self.cache is not None

        async def fetch(offset: int, length: int) -> bytes:
            return await self.client.fetch_range(reference, index.layer_digest, offset,
                                                 length)
        started = time.monotonic()
        try:
            fetched = await prefetch_hot_spans(opened, fetch, self.cache, self._decode_slots)
        finally:
            opened.close()
        if fetched:
            log.info("layer %s: %d bytes of hot spans fetched ahead in %.3fs",
                     index.layer_digest, fetched, time.monotonic() - started)
        return fetched

    def _expire(self, key: BlobKey, task: asyncio.Task[StagedIndex]) -> None:
        if self._staged.get(key) is not task:
            return  # claimed (or replaced)
        del self._staged[key]
        if not task.done():
            task.cancel()
            return
        with contextlib.suppress(Exception, asyncio.CancelledError):
            shutil.rmtree(task.result().directory, ignore_errors=True)

    def close(self) -> None:
        for task in self._staged.values():
            task.cancel()
            if task.done() and not task.cancelled() and task.exception() is None \
                    and task.result().prefetch is not None:
                task.result().prefetch.cancel()
        self._staged.clear()
        shutil.rmtree(self.staging, ignore_errors=True)


def _refusal(exc: Exception) -> bool:
    """A blob whose bytes are not the ones listed (its digest, its format, its layer)."""
    return isinstance(exc, DigestMismatchError | FormatError)
