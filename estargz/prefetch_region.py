"""A layer's prefetch region as blob ranges, and the descriptor annotation that names
it so that a node can request its bytes before it has the TOC.

The region runs from the blob's start to the TOC's prefetch landmark, less the
members whose chunks the layer's read ranges (estargz.read_ranges) say went unread.
The converter writes it as PREFETCH_REGION_ANNOTATION ("start-end,start-end", decimal
blob offsets, ends exclusive): the manifest's digest covers it, and every chunk
fetched through it is still checked against the TOC's digests, so a wrong region
costs bytes, never correctness.
"""

import bisect
import json
import tempfile

from .errors import FormatError
from .footer import Footer
from .read_ranges import ReadRanges, chunk_was_read
from .reader import spool_toc_json
from .toc import PREFETCH_LANDMARK, TOCError, clean_name

PREFETCH_REGION_ANNOTATION = "dev.lazypull.prefetch-region"
MAX_REGION_RANGES = 4096  # a longer annotation is ignored

# A TOC whose JSON is larger gives no region here (its reader finds the region in the
# layer's index instead): reading it takes about twice its size in memory, and a
# 10^6-file layer's TOC is 300 MB.
MAX_TOC_JSON_BYTES = 16 << 20


def region_to_fetch(footer: Footer, toc_bytes: bytes, toc_digest: str, max_toc_size: int,
                    read: ReadRanges | None = None) -> list[tuple[int, int]]:
    """The blob ranges [start, end) of the prefetch region: from 0 to the TOC's prefetch
    landmark, less the members of the chunks that `read` (the layer's read ranges)
    says went unread. Empty if the TOC (checked against its digest) has no landmark.
    Cheap beside the index build: one decompression and a JSON parse in C that keeps
    only what the region needs (parsed whole, the TOC of a 10^6-file layer took the
    FUSE manager to 1.6 GB). Empty too for a TOC over MAX_TOC_JSON_BYTES."""
    read = read or {}
    try:
        with tempfile.TemporaryFile() as spooled:
            if spool_toc_json(footer, toc_bytes, max_toc_size, spooled) != toc_digest:
                return []  # the index build says why
            if spooled.tell() > MAX_TOC_JSON_BYTES:
                return []
            spooled.seek(0)
            scan = _TocScan(read)
            doc = json.load(spooled, object_hook=scan.keep)
    except (FormatError, ValueError, RecursionError):
        return []  # the index build says why
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        return []
    stop = scan.landmark
    if not isinstance(stop, int) or isinstance(stop, bool) or stop <= 0:
        return []
    skipped = _unread_members(scan.entries, scan.offsets, read, stop)
    region, position = [], 0
    for start, end in skipped:
        if position < start:
            region.append((position, start))
        position = max(position, end)
    if position < stop:
        region.append((position, stop))
    return region


class _TocScan:
    """json.load's object_hook over a TOC: every object is handed to `keep` once
    parsed, innermost first, and what it returns stands in its place. It keeps the
    landmark's offset, the members' offsets (only if there are read ranges) and the
    entries of files in `read`; every other entry becomes None at once."""

    def __init__(self, read: ReadRanges):
        self.read = read
        self.landmark: object = None  # the first landmark's offset, whatever it is
        self._landmark_seen = False
        self.offsets: list[int] = []
        self.entries: list[dict] = []

    def keep(self, entry: dict) -> object:
        if "entries" in entry:
            return entry  # the document itself
        name, offset = entry.get("name"), entry.get("offset")
        if name == PREFETCH_LANDMARK and not self._landmark_seen:
            self.landmark, self._landmark_seen = offset, True
        if not self.read or not isinstance(offset, int) or isinstance(offset, bool) \
                or offset <= 0:
            return None
        self.offsets.append(offset)
        if entry.get("type") in ("reg", "chunk") and isinstance(name, str):
            try:
                if clean_name(name) in self.read:
                    self.entries.append(entry)
            except TOCError:
                pass
        return None


def _unread_members(entries: list[dict], offsets: list[int], read: ReadRanges, stop: int
                    ) -> list[tuple[int, int]]:
    """[start, end) of the members before `stop` that hold only unread chunks, from the
    entries of files in `read` (in TOC order) and every member's offset."""
    if not read:
        return []
    ends = sorted({offset for offset in offsets if offset <= stop} | {stop})
    sizes: dict[str, int] = {}
    unread, wanted = set(), set()
    for entry in entries:
        name, offset = entry["name"], entry["offset"]
        if not offset < stop:
            continue
        path = clean_name(name)
        if entry["type"] == "reg":
            sizes[path] = entry.get("size") if isinstance(entry.get("size"), int) else 0
        chunk_offset = entry.get("chunkOffset") or 0
        chunk_size = entry.get("chunkSize") or sizes.get(path, 0) - chunk_offset
        if not isinstance(chunk_offset, int) or not isinstance(chunk_size, int):
            continue
        (wanted if chunk_was_read(chunk_offset, chunk_size, read[path]) else unread).add(offset)
    members = []
    for start in sorted(unread - wanted):
        end = ends[bisect.bisect_right(ends, start)]
        members.append((start, end))
    return members


def encode_region(region: list[tuple[int, int]]) -> str:
    return ",".join(f"{start}-{end}" for start, end in region)


def decode_region(text: str, blob_size: int) -> list[tuple[int, int]] | None:
    """The ranges of an annotation, or None if it is not ranges in order, apart and
    within the blob (then the region is read from the TOC, as without it)."""
    parts = text.split(",")
    if not text or len(parts) > MAX_REGION_RANGES:
        return None
    region: list[tuple[int, int]] = []
    for part in parts:
        start, dash, end = part.partition("-")
        if not (dash and start.isascii() and start.isdigit() and end.isascii()
                and end.isdigit()):
            return None
        first, last = int(start), int(end)
        if not (first < last <= blob_size) or (region and first <= region[-1][1]):
            return None
        region.append((first, last))
    return region
