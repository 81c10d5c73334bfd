"""On Prepare of an unmodified gzip layer: find its published gzip index, fetch and
check it, and build the layer's tree from it (docs/gzip-index.md, "The snapshotter
side").

Only layers whose descriptor is gzip without an eStargz TOC digest (or zstd:chunked
annotations) are looked up. The lookup of an image manifest's indexes (referrers API,
then the fallback tag) is bounded in time and its answer, found or not, is kept per
manifest digest for a TTL, so the other layers of the image and the next pull do not
ask again; concurrent Prepares of one image share one lookup. Anything wrong (no
index, a timeout, an index whose digest or layer does not match) raises NotLazy with
the reason, and the layer is pulled the ordinary way.

A lookup that finds indexes starts fetching every layer's index blob and building its
tree at once (index_ahead.py); each layer's mount then claims its own, checked again
against its descriptor, or fetches it itself if that failed on the way.
"""

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gzindex
from estargz import TOC_DIGEST_ANNOTATION
from indexer.lookup import LayerIndex, fetch_index, find_layer_indexes
from oci import mediatypes as mt
from oci.manifest import Descriptor

from ..prometheus import Counter
from .gzip_layer import GzipLayer, GzipSpanDecoder, build_gzip_layer, layer_footer
from .index_ahead import IndexAhead, IndexRefused, StagedIndex
from .layer_files import GZIP_INDEX_FILE, GZIP_INDEX_KIND, INDEX_FILE, LayerRecord
from .layer_source import LayerSource, NotLazy
from .metrics import REGISTRY
from .remote import FoundLayer

if TYPE_CHECKING:
    from oci.registry import RegistryClient

log = logging.getLogger(__name__)

FOUND, NONE, INVALID, TIMEOUT, ERROR = "found", "none", "invalid", "timeout", "error"
LOOKUPS = Counter("lazypull_gzip_index_lookups_total",
                  "Gzip index lookups of unmodified gzip layers on Prepare, by outcome "
                  "(found, none, invalid, timeout, error); `cached` counts answers kept "
                  "from an earlier lookup of the image", ["outcome", "cached"],
                  registry=REGISTRY)
# Annotations that mark a zstd:chunked layer (read through its own TOC, never indexed).
_ZSTD_CHUNKED_ANNOTATIONS = ("io.github.containers.zstd-chunked.manifest-checksum",
                             "io.github.containers.zstd-chunked.manifest-position")
MAX_REMEMBERED = 1024  # image manifests whose answer is kept


def indexable(descriptor: Descriptor) -> bool:
    """A plain gzip layer: neither eStargz with a TOC digest nor zstd:chunked."""
    annotations = descriptor.annotations
    return (descriptor.media_type in mt.GZIP_LAYERS
            and TOC_DIGEST_ANNOTATION not in annotations
            and not any(a in annotations for a in _ZSTD_CHUNKED_ANNOTATIONS))


@dataclass
class IndexedLayer:
    """A gzip layer opened through its index, ready to mount."""

    record: LayerRecord
    layer: GzipLayer
    # its hot spans being fetched into the chunk cache (fetched ahead): the mount's
    # prefetch waits for them first
    prefetch: "asyncio.Task[int] | None" = None


@dataclass
class _Answer:
    indexes: dict[str, LayerIndex]  # layer digest -> its index; empty: none
    outcome: str
    reason: str
    expires: float


class IndexLookup:
    def __init__(self, client: "RegistryClient", *, timeout: float = 3.0,
                 negative_ttl: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 ahead: IndexAhead | None = None):
        self.client = client
        self.ahead = ahead  # None: each mount fetches its own index when it comes
        self.timeout = timeout
        self.ttl = negative_ttl
        self._clock = clock
        self._answers: OrderedDict[str, _Answer] = OrderedDict()
        self._pending: dict[str, asyncio.Task[_Answer]] = {}

    async def open(self, source: LayerSource, found: FoundLayer, directory: str
                   ) -> IndexedLayer:
        """The layer served through its index, its files stored in `directory`; NotLazy
        (and a log line) when it has none or it cannot be used."""
        digest = found.descriptor.digest
        answer, cached = await self._answer(source, found.manifest.digest)
        index = answer.indexes.get(digest)
        if index is None:
            LOOKUPS.labels(answer.outcome if not answer.indexes else NONE,
                           str(cached).lower()).inc()
            reason = answer.reason if not answer.indexes else \
                f"the image's indexes do not cover layer {digest}"
            log.info("layer %s: no usable gzip index (%s); pulling it the ordinary way",
                     digest, reason)
            raise NotLazy(f"layer {digest} is plain gzip without a usable gzip index: {reason}")
        try:
            indexed = await self._fetch(source, found, index, directory)
        except NotLazy as exc:
            LOOKUPS.labels(INVALID, str(cached).lower()).inc()
            log.warning("%s; pulling it the ordinary way", exc)
            raise
        LOOKUPS.labels(FOUND, str(cached).lower()).inc()
        log.info("layer %s: served lazily through gzip index %s", digest,
                 index.descriptor.digest)
        return indexed

    # -- the image's indexes, remembered -------------------------------------------------

    async def _answer(self, source: LayerSource, manifest_digest: str
                      ) -> tuple[_Answer, bool]:
        known = self._answers.get(manifest_digest)
        if known is not None and known.expires > self._clock():
            self._answers.move_to_end(manifest_digest)
            return known, True
        task = self._pending.get(manifest_digest)
        if task is None:
            task = asyncio.create_task(self._look_up(source, manifest_digest))
            self._pending[manifest_digest] = task
            task.add_done_callback(lambda _: self._pending.pop(manifest_digest, None))
        answer = await asyncio.shield(task)
        self._answers[manifest_digest] = answer
        self._answers.move_to_end(manifest_digest)
        while len(self._answers) > MAX_REMEMBERED:
            self._answers.popitem(last=False)
        return answer, False

    async def _look_up(self, source: LayerSource, manifest_digest: str) -> _Answer:
        expires = self._clock() + self.ttl
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                # The fallback tag read beside the referrers API: a round trip less on
                # a registry without the API, which answers 404 to it.
                indexes = await find_layer_indexes(self.client, source.reference,
                                                   manifest_digest, fallback_at_once=True)
            log.info("image %s: gzip index lookup took %.3fs, %d layers indexed",
                     manifest_digest, time.monotonic() - started, len(indexes))
        except TimeoutError:
            return _Answer({}, TIMEOUT, f"the lookup of {manifest_digest}'s indexes took more "
                           f"than {self.timeout:g}s", expires)
        except Exception as exc:  # a registry error, a malformed referrer: no index
            return _Answer({}, ERROR, f"the lookup of {manifest_digest}'s indexes failed: "
                           f"{exc}", expires)
        if not indexes:
            return _Answer({}, NONE, f"no gzip index refers to {manifest_digest}", expires)
        if self.ahead is not None:
            self.ahead.start(source.reference, indexes.values(), first=source.layer_digest)
        return _Answer(indexes, FOUND, "", expires)

    # -- one layer's index ----------------------------------------------------------------

    async def _fetch(self, source: LayerSource, found: FoundLayer, index: LayerIndex,
                     directory: str) -> IndexedLayer:
        staged = None
        if self.ahead is not None:
            try:
                staged = await self.ahead.claim(source.reference, index)
            except IndexRefused as exc:
                raise NotLazy(f"layer {found.descriptor.digest}: gzip index "
                              f"{index.descriptor.digest} refused: {exc}") from None
        prefetch = None
        if staged is not None:
            layer = await asyncio.to_thread(_take_staged, staged, found, directory)
            prefetch = staged.prefetch
        else:
            layer = await self._fetch_now(source, found, index, directory)
        descriptor = found.descriptor
        record = LayerRecord(str(source.reference), descriptor.digest, descriptor.size,
                             descriptor.media_type, index.descriptor.digest, "gzip",
                             descriptor.size, 0, descriptor.size, 0, None,
                             source.manifest_digest or found.manifest.digest,
                             kind=GZIP_INDEX_KIND)
        return IndexedLayer(record, layer, prefetch)

    async def _fetch_now(self, source: LayerSource, found: FoundLayer, index: LayerIndex,
                         directory: str) -> GzipLayer:
        descriptor = found.descriptor
        started = time.monotonic()
        path = os.path.join(directory, GZIP_INDEX_FILE)
        partial = path + ".partial"
        try:
            opened = await fetch_index(self.client, source.reference, index, partial)
        except Exception as exc:  # digest mismatch, another layer, a registry error
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise NotLazy(f"layer {descriptor.digest}: gzip index {index.descriptor.digest} "
                          f"refused: {exc}") from None
        try:
            if opened.header.layer_size != descriptor.size:
                raise gzindex.IndexFormatError(
                    f"it is of a layer of {opened.header.layer_size} bytes, the manifest "
                    f"says {descriptor.size}")
            os.replace(partial, path)
            fetched = time.monotonic()
            layer = await asyncio.to_thread(
                build_gzip_layer, opened, index.descriptor.digest, descriptor.size,
                os.path.join(directory, INDEX_FILE))
            log.info("layer %s: gzip index %s fetched in %.3fs, its tree built in %.3fs",
                     descriptor.digest, index.descriptor.digest, fetched - started,
                     time.monotonic() - fetched)
        except Exception as exc:
            opened.close()
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise NotLazy(f"layer {descriptor.digest}: gzip index {index.descriptor.digest} "
                          f"refused: {exc}") from None
        layer.decoder = GzipSpanDecoder(opened)
        return layer


def _take_staged(staged: StagedIndex, found: FoundLayer, directory: str) -> GzipLayer:
    """In a worker thread: the index and tree built ahead, moved into `directory` and
    opened, if they are of a layer of the descriptor's size."""
    descriptor, digest = found.descriptor, staged.index.descriptor.digest
    if staged.layer_size != descriptor.size:
        shutil.rmtree(staged.directory, ignore_errors=True)
        raise NotLazy(f"layer {descriptor.digest}: gzip index {digest} refused: it is of a "
                      f"layer of {staged.layer_size} bytes, the manifest says {descriptor.size}")
    staged.move_into(directory)
    opened = None
    try:
        opened = gzindex.GzipIndex.open(os.path.join(directory, GZIP_INDEX_FILE))
        layer = GzipLayer.open_index(os.path.join(directory, INDEX_FILE),
                                     layer_footer(descriptor.size), digest)
        if layer is None:
            raise gzindex.IndexFormatError(f"the tree built from index {digest} did not open")
    except Exception as exc:
        if opened is not None:
            opened.close()
        raise NotLazy(f"layer {descriptor.digest}: gzip index {digest} refused: {exc}"
                      ) from None
    layer.decoder = GzipSpanDecoder(opened)
    return layer
