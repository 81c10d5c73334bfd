"""The hot spans of a gzip index, fetched into the chunk cache as soon as the index is
in hand, before the layer's tree is built and mounted (index_ahead.py).

A layer's prefetch otherwise starts at its mount, and containerd mounts an image's
layers one after another: the last layer's hot files were asked for a second or more
after the first's. The spans are found from the index alone (its hot list and file
table), fetched in runs of adjacent spans, and each is inflated and checked against
its digest before it is cached under that digest, which is the chunk digest the
layer's tree gives it: the mount's own prefetch then finds them cached. A span that
fails is left out; the mount's prefetch fetches it again (and refuses it again if its
bytes are wrong).
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import gzindex
from gzindex import Span

from .fetcher import FETCH_BYTES, FETCH_LATENCY, FETCH_REQUESTS, PREFETCH

if TYPE_CHECKING:
    from .chunk_cache import ChunkCache

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 8 << 20  # compressed bytes of one range request, at most
REQUESTS_AT_ONCE = 4  # of one layer
FetchRange = Callable[[int, int], Awaitable[bytes]]


def hot_spans(index: gzindex.GzipIndex) -> list[Span]:
    """The spans holding the hot files' data, in the hot list's order, each once. A
    hard link's data is its target's; a path the layer holds twice is its last entry."""
    hot = index.hot_files()
    if not hot:
        return []
    wanted = set(hot)
    found: dict[str, gzindex.FileEntry] = {}
    for entry in index.entries():
        if entry.name in wanted:
            found[entry.name] = entry
    targets = {e.link_name for e in found.values() if e.type == "hardlink"}
    if targets:
        linked = {entry.name: entry for entry in index.entries() if entry.name in targets}
        found.update({name: linked[e.link_name] for name, e in found.items()
                      if e.type == "hardlink" and e.link_name in linked})
    numbers: dict[int, None] = {}  # ordered set
    for path in hot:
        entry = found.get(path)
        if entry is not None and entry.type == "reg" and entry.size:
            numbers.update(dict.fromkeys(index.spans_for(entry.offset, entry.end)))
    return [index.span(number) for number in numbers]


def runs(spans: list[Span], max_bytes: int = MAX_REQUEST_BYTES) -> list[list[Span]]:
    """Adjacent spans (in the blob) joined into one request each, up to `max_bytes`; in
    the order of each run's first hot span."""
    out: list[list[Span]] = []
    for span in sorted(spans, key=lambda s: s.index):
        run = out[-1] if out else None
        if run and run[-1].index + 1 == span.index and \
                span.compressed_end - run[0].compressed_offset <= max_bytes:
            run.append(span)
        else:
            out.append([span])
    rank = {span.index: number for number, span in enumerate(spans)}
    return sorted(out, key=lambda run: min(rank[s.index] for s in run))


async def prefetch_hot_spans(index: gzindex.GzipIndex, fetch: FetchRange,
                             cache: "ChunkCache", decode_slots: asyncio.Semaphore) -> int:
    """Fetch, verify and cache the hot spans of `index` not cached yet; returns the
    compressed bytes fetched. `decode_slots` bounds the worker threads that inflate
    and hash, shared by all layers: they share the default executor with the trees'
    builds, which the mounts wait for (a dozen of them at once queued those builds)."""
    async with decode_slots:
        spans = await asyncio.to_thread(hot_spans, index)
    missing = [s for s in spans if "sha256:" + s.digest.hex() not in cache]
    slots = asyncio.Semaphore(REQUESTS_AT_ONCE)

    async def one(run: list[Span]) -> int:
        async with slots:  # held until cached: at most that many requests' bytes held
            start, end = run[0].compressed_offset, run[-1].compressed_end
            FETCH_REQUESTS.labels(PREFETCH).inc()
            begun = asyncio.get_running_loop().time()
            data = await fetch(start, end - start)
            FETCH_LATENCY.labels(PREFETCH).observe(asyncio.get_running_loop().time() - begun)
            FETCH_BYTES.labels(PREFETCH).inc(len(data))
            async with decode_slots:
                await asyncio.to_thread(_verify_and_cache, index, run, data, start, cache)
        return len(data)

    results = await asyncio.gather(*(one(run) for run in runs(missing)),
                                   return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        log.info("layer %s: %d of %d hot span requests ahead failed (%s); its mount "
                 "fetches them", index.layer_digest, len(failed), len(results), failed[0])
    return sum(r for r in results if isinstance(r, int))


def _verify_and_cache(index: gzindex.GzipIndex, run: list[Span], data: bytes, base: int,
                      cache: "ChunkCache") -> None:
    """In a worker thread: inflating and hashing are the slow part."""
    good = []
    for span in run:
        compressed = data[span.compressed_offset - base:span.compressed_end - base]
        try:
            good.append(("sha256:" + span.digest.hex(),
                         gzindex.decode_span(index, span, compressed)))
        except gzindex.SpanDigestMismatch as exc:
            log.warning("layer %s: %s; not cached", index.layer_digest, exc)
    try:
        # ahead of readers: disk only; decode_span checked each against its digest
        cache.put_many(good, keep_in_memory=False, hashed=True)
    except OSError as exc:  # a full disk: the mount's prefetch tries again
        log.warning("cannot cache %d hot spans fetched ahead: %s", len(good), exc)
