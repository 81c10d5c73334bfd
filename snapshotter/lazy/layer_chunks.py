"""A lazy layer's chunks as its blob holds them: which are wanted for a policy, which
are cached, and how many blob bytes are local. The warm set asks these questions."""

from collections.abc import Iterable
from dataclasses import dataclass

from estargz import Layer

from .chunk_cache import ChunkCache


@dataclass(frozen=True)
class Span:
    size: int  # compressed bytes in the blob
    digests: tuple[str, ...]
    prefetch: bool  # in the layer's prioritized region


def spans_of(layer: Layer) -> list[Span]:
    """The blob spans of an eStargz layer with the chunks each holds."""
    spans: dict[int, tuple[int, list[str]]] = {}
    for chunk in layer.payload_chunks():
        _, digests = spans.setdefault(chunk.blob_offset, (chunk.blob_end, []))
        digests.append(chunk.digest)
    region = layer.prefetch_size
    return [Span(end - offset, tuple(digests), offset < region)
            for offset, (end, digests) in sorted(spans.items())]


def wanted(spans: Iterable[Span], full: bool) -> list[Span]:
    """The spans a policy keeps local: all of them, or the prefetch region's."""
    return list(spans) if full else [s for s in spans if s.prefetch]


def wanted_digests(spans: Iterable[Span], full: bool) -> list[str]:
    return [d for span in wanted(spans, full) for d in span.digests]


def chunks_missing(spans: Iterable[Span], full: bool, cache: ChunkCache) -> bool:
    """True if a wanted chunk is not on disk. Every chunk is looked at (no early
    return): on_disk also drops index entries whose files are gone, so the fetch that
    follows gets them again."""
    present = [cache.on_disk(d) for d in wanted_digests(spans, full)]
    return not all(present)


def bytes_cached(spans: Iterable[Span], cache: ChunkCache) -> tuple[int, int]:
    """(blob bytes whose chunks are all cached, blob bytes of the layer)."""
    cached = total = 0
    for span in spans:
        total += span.size
        if all(d in cache for d in span.digests):
            cached += span.size
    return cached, total
