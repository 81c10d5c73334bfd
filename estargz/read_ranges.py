"""Which parts of a layer's large prioritized files a workload read: carried in an
annotation on the layer's descriptor, so a prefetch can fetch those chunks of the
file and leave the rest to on-demand reads.

The converter writes it from an access profile's `ranges` (docs/access-profile.md);
the snapshotter reads it. The manifest's digest covers the annotation, so it is as
trusted as the TOC digest beside it; it is still checked, and a malformed one is
refused as a whole (the prefetch then fetches every prioritized file whole).
Paths are relative to the layer's root, ranges [offset, length] pairs.
"""

import json

READ_RANGES_ANNOTATION = "dev.lazypull.read-ranges"
MAX_ANNOTATION_BYTES = 1 << 20
MAX_RANGES_PER_FILE = 4096

ReadRanges = dict[str, list[tuple[int, int]]]


def encode_read_ranges(ranges: ReadRanges) -> str:
    """The annotation for `ranges`, within what decode_read_ranges accepts: ranges
    whose widened spans meet are merged (the same chunks match), and a file still
    over MAX_RANGES_PER_FILE, or the largest files while the text is over
    MAX_ANNOTATION_BYTES, are left out: their prefetch takes them whole."""
    merged = {path: _merged(spans) for path, spans in ranges.items()}
    kept = {path: spans for path, spans in merged.items() if len(spans) <= MAX_RANGES_PER_FILE}
    while True:
        text = json.dumps({path: [list(r) for r in spans] for path, spans in kept.items()},
                          separators=(",", ":"), sort_keys=True)
        if len(text) <= MAX_ANNOTATION_BYTES:
            return text
        del kept[max(kept, key=lambda path: len(kept[path]))]


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with ranges closer than twice the margin joined: widened by the margin
    on each side, they cover the same bytes either way."""
    out: list[tuple[int, int]] = []
    for offset, length in sorted(spans):
        if out and offset <= out[-1][0] + out[-1][1] + 2 * MARGIN_BYTES:
            start, size = out[-1]
            out[-1] = (start, max(size, offset + length - start))
        else:
            out.append((offset, length))
    return out


def decode_read_ranges(text: str) -> ReadRanges:
    """The annotation's ranges; ValueError saying what is wrong with it."""
    if len(text) > MAX_ANNOTATION_BYTES:
        raise ValueError(f"{READ_RANGES_ANNOTATION} is over {MAX_ANNOTATION_BYTES} bytes")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{READ_RANGES_ANNOTATION} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{READ_RANGES_ANNOTATION} must be an object of paths")
    found: ReadRanges = {}
    for path, spans in doc.items():
        if not isinstance(spans, list) or len(spans) > MAX_RANGES_PER_FILE:
            raise ValueError(f"{READ_RANGES_ANNOTATION}: {path!r}: not a list of ranges")
        pairs = []
        for span in spans:
            if not (isinstance(span, list) and len(span) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                            for v in span)):
                raise ValueError(f"{READ_RANGES_ANNOTATION}: {path!r}: bad range {span!r}"[:200])
            pairs.append((span[0], span[1]))
        found[path] = pairs
    return found


# A read range widened by this much on each side before it is matched with chunks:
# profiles see the reads the kernel made, and a later run's readahead may go further.
MARGIN_BYTES = 256 << 10


def chunk_was_read(chunk_offset: int, chunk_size: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether a chunk (file offset, size) meets a read range (widened by the margin)."""
    return any(chunk_offset < offset + length + MARGIN_BYTES
               and offset - MARGIN_BYTES < chunk_offset + chunk_size
               for offset, length in ranges)
