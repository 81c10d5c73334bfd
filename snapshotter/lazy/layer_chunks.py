"""A lazy layer's chunks as its blob holds them: which are wanted for a policy, which
are cached, and how many blob bytes are local. The warm set asks these questions.

Each answer walks the layer's spans from its index, so none holds the whole list of a
layer's chunks in memory.
"""

from collections.abc import Iterator

from estargz import Layer, Span

from .chunk_cache import ChunkCache


def wanted(layer: Layer, full: bool) -> Iterator[Span]:
    """The spans a policy keeps local: all of them, or the prefetch region's."""
    region = layer.prefetch_size
    for span in layer.iter_spans():
        if not full and span.offset >= region:
            return
        yield span


def wanted_digests(layer: Layer, full: bool) -> list[str]:
    return [chunk.digest for span in wanted(layer, full) for chunk in span.chunks]


def chunks_missing(layer: Layer, full: bool, cache: ChunkCache) -> bool:
    """True if a wanted chunk is not on disk. Every chunk is looked at (no early
    return): on_disk also drops index entries whose files are gone, so the fetch that
    follows gets them again."""
    present = [cache.on_disk(chunk.digest) for span in wanted(layer, full)
               for chunk in span.chunks]
    return not all(present)


def bytes_cached(layer: Layer, cache: ChunkCache) -> tuple[int, int]:
    """(blob bytes whose chunks are all cached, blob bytes of the layer)."""
    cached = total = 0
    for span in layer.iter_spans():
        total += span.size
        if all(chunk.digest in cache for chunk in span.chunks):
            cached += span.size
    return cached, total
