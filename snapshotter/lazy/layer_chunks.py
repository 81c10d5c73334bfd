"""A lazy layer's chunks as its blob holds them: which are wanted for a policy, which
are cached, and how many blob bytes are local. The warm set asks these questions.

Each answer walks the layer's spans from its index, so none holds the whole list of a
layer's chunks in memory, and asks the cache about a block of spans at a time (one
index transaction per block, not per chunk).
"""

import itertools
from collections.abc import Iterable, Iterator

from estargz import Layer, Span

from .chunk_cache import ChunkCache


def wanted(layer: Layer, full: bool) -> Iterator[Span]:
    """The spans a policy keeps local: all of them, or the prefetch region's."""
    if full:
        yield from layer.iter_spans()
        return
    for start, stop in layer.prefetch_span_ranges():
        for first in range(start, stop, 128):
            yield from layer.spans(first, min(stop, first + 128))


def wanted_digests(layer: Layer, full: bool) -> Iterator[str]:
    for span in wanted(layer, full):
        for chunk in span.chunks:
            yield chunk.digest


def chunks_missing(layer: Layer, full: bool, cache: ChunkCache) -> bool:
    """True if a wanted chunk is not on disk. Every chunk is looked at (no early
    return): looking also drops index entries whose files are gone, so the fetch that
    follows gets them again."""
    missing = False
    for block in _blocks(wanted(layer, full)):
        digests = {chunk.digest for span in block for chunk in span.chunks}
        if len(cache.stored_among(digests, check_files=True)) < len(digests):
            missing = True
    return missing


def bytes_cached(layer: Layer, cache: ChunkCache) -> tuple[int, int]:
    """(blob bytes whose chunks are all cached, blob bytes of the layer)."""
    cached = total = 0
    for block in _blocks(layer.iter_spans()):
        stored = cache.stored_among(chunk.digest for span in block for chunk in span.chunks)
        for span in block:
            total += span.size
            if all(chunk.digest in stored for chunk in span.chunks):
                cached += span.size
    return cached, total


def _blocks(spans: Iterable[Span], size: int = 256) -> Iterator[list[Span]]:
    spans = iter(spans)
    while block := list(itertools.islice(spans, size)):
        yield block
