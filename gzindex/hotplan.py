"""Where to put extra checkpoints so the spans that hold hot files are small.

A prefetch fetches whole spans: a hot file in the middle of a 4 MiB span costs the
whole span. Given the block boundaries of a layer (recorded by its first scan) and
the hot files' data extents in the uncompressed tar, hot extents closer than `gap`
are merged into runs, and each run gets a checkpoint at the last boundary at or
before its start and the first at or after its end. The spans inside a run keep
the regular spacing; the bytes a prefetch fetches beyond the hot bytes are then at
most one deflate block at each end of a run plus the merged gaps.

Only data is counted: the snapshotter reads a file's bytes, never its tar header.
"""

import bisect
from collections.abc import Iterable, Sequence

from .entries import FileEntry

# Hot extents closer than this share a run: a checkpoint pair costs two windows
# (about 10-20 KiB of index each), so skipping a smaller gap is cheaper than
# cutting it out.
DEFAULT_MERGE_GAP = 128 << 10


def hot_extents(entries: Iterable[FileEntry], hot_paths: Iterable[str]) -> list[tuple[int, int]]:
    """The uncompressed [start, end) of each hot file's data, sorted; a hard link
    counts as its target, a path's last entry wins (as extracting the tar would)."""
    latest: dict[str, FileEntry] = {}
    for entry in entries:
        latest[entry.name] = entry
    extents = set()
    for path in hot_paths:
        entry = latest.get(path)
        if entry is not None and entry.type == "hardlink":
            entry = latest.get(entry.link_name)
        if entry is not None and entry.type == "reg" and entry.size:
            extents.add((entry.offset, entry.end))
    return sorted(extents)


def merge_runs(extents: Sequence[tuple[int, int]], gap: int,
               max_runs: int | None = None) -> list[tuple[int, int]]:
    """Sorted extents merged where less than `gap` bytes apart; with `max_runs`,
    the narrowest gaps are merged further until at most that many runs are left."""
    runs: list[tuple[int, int]] = []
    for start, end in extents:
        if runs and start - runs[-1][1] < gap:
            runs[-1] = (runs[-1][0], max(end, runs[-1][1]))
        else:
            runs.append((start, end))
    if max_runs is not None and len(runs) > max(max_runs, 1):
        gaps = sorted(runs[i + 1][0] - runs[i][1] for i in range(len(runs) - 1))
        wider = gaps[len(runs) - max(max_runs, 1) - 1] + 1
        return merge_runs(runs, wider)
    return runs


def plan_cuts(runs: Iterable[tuple[int, int]], boundaries: Sequence[int]) -> set[int]:
    """For each run, the last boundary at or before its start and the first at or
    after its end (`boundaries` sorted; none where the run reaches a member's edge)."""
    cuts: set[int] = set()
    for start, end in runs:
        before = bisect.bisect_right(boundaries, start) - 1
        if before >= 0:
            cuts.add(boundaries[before])
        after = bisect.bisect_left(boundaries, end)
        if after < len(boundaries):
            cuts.add(boundaries[after])
    return cuts

