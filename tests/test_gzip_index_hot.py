"""Hot checkpoints: an index built with hot files has small spans around them, still
reads every byte right, and a layer without hot files is indexed as before."""

import bisect
import io
import itertools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gzindex import GzipIndex, LayerReader, build_index, file_fetcher, scan_layer
from gzindex.hotplan import hot_extents, merge_runs, plan_cuts

from .test_gzip_index import gzip_layer, random_tar

SPACING = 1 << 20


def _index(blob: bytes, hot: list[str], **options: object) -> GzipIndex:
    out = io.BytesIO()
    build_index(io.BytesIO(blob), out, spacing=SPACING, hot_files=hot,
                **options)  # type: ignore[arg-type]
    return GzipIndex.open(out.getvalue())


def _boundaries(blob: bytes) -> list[int]:
    with scan_layer(io.BytesIO(blob), spacing=SPACING) as layer:
        return list(layer.boundaries)


def _largest_block(boundaries: list[int], size: int) -> int:
    """An upper bound of any block's output: the widest gap between boundaries."""
    points = [0, *boundaries, size]
    return max(b - a for a, b in itertools.pairwise(points))


def _span_bytes(index: GzipIndex, start: int, end: int) -> int:
    return sum(index.span(n).uncompressed_size for n in index.spans_for(start, end))


def _regular_checkpoints(boundaries: list[int], spacing: int, member_starts: set[int]) -> set[int]:
    """Where the spacing rule alone puts checkpoints (besides member starts)."""
    points, last = set(), 0
    for offset in sorted({*boundaries, *member_starts}):
        if offset in member_starts:
            last = offset
        elif offset - last >= spacing:
            points.add(offset)
            last = offset
    return points


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), level=st.sampled_from([1, 6, 9]), members=st.integers(1, 3),
       gap=st.sampled_from([0, 4096, 128 << 10]))
def test_hot_spans_are_small_and_every_byte_reads_right(seed: int, level: int, members: int,
                                                       gap: int) -> None:
    rng = random.Random(seed)
    tar = random_tar(seed)
    blob = gzip_layer(tar, level, members, rng)
    plain = _index(blob, [])
    files = [e for e in plain.entries() if e.type in ("reg", "hardlink")]
    hot = [e.name for e in rng.sample(files, rng.randint(1, min(len(files), 12)))]

    index = _index(blob, hot, gap=gap, index_share=None)

    assert index.hot_files() == hot
    reader = LayerReader(index, file_fetcher(io.BytesIO(blob)))
    for entry in index.entries():
        if entry.type == "reg":
            assert reader.read_file(entry) == tar[entry.offset:entry.end]
    for _ in range(20):
        a = rng.randrange(len(tar))
        b = rng.randrange(a, min(len(tar), a + rng.choice([1, 5000, 300_000])) + 1)
        assert reader.read(a, b) == tar[a:b]
    assert reader.read(0, len(tar)) == tar
    # The spans holding each run of hot bytes pass it by at most a block at each end.
    slack = 2 * _largest_block(_boundaries(blob), len(tar))
    for start, end in merge_runs(hot_extents(index.entries(), hot), gap):
        assert _span_bytes(index, start, end) <= end - start + slack


def test_a_small_hot_file_no_longer_costs_a_whole_span() -> None:
    rng = random.Random(3)
    tar = random_tar(3)
    blob = gzip_layer(tar, 6, 1, rng)
    plain = _index(blob, [])
    middle = plain.uncompressed_size // 2
    entry = min((e for e in plain.entries() if e.type == "reg" and 0 < e.size < 4000),
                key=lambda e: abs(e.offset - middle))
    boundaries = _boundaries(blob)
    bound = entry.size + 2 * _largest_block(boundaries, len(tar))

    hot = _index(blob, [entry.name], index_share=None)

    assert _span_bytes(plain, entry.offset, entry.end) > bound  # the regular spans fail it
    assert _span_bytes(hot, entry.offset, entry.end) <= bound
    (number,) = hot.spans_for(entry.offset, entry.end)
    span = hot.span(number)
    assert bisect.bisect_left(boundaries, entry.offset) - \
        bisect.bisect_left(boundaries, span.uncompressed_offset) <= 1
    assert hot.span_count <= plain.span_count + 2


def test_a_layer_without_hot_data_is_indexed_as_before() -> None:
    rng = random.Random(9)
    tar = random_tar(9)
    blob = gzip_layer(tar, 6, 3, rng)
    boundaries = _boundaries(blob)
    plain = _index(blob, [])
    starts = {s.uncompressed_offset for s in plain.spans()}
    member_starts = starts - set(boundaries)  # a member starts after its last block

    # Only the spacing rule placed the checkpoints, at the boundaries the scan saw.
    assert starts - member_starts == _regular_checkpoints(boundaries, SPACING, member_starts)
    # Hot files without data (a directory, an empty file) add no checkpoint; the
    # spans, files and windows sections are the plain index's byte for byte.
    empty = next(e.name for e in plain.entries() if e.type == "reg" and e.size == 0)
    no_data = _index(blob, ["d", empty], index_share=None)
    unplanned = _index(blob, [plain.find("big0").name], hot_checkpoints=False)
    for index in (no_data, unplanned):
        for name in ("spans", "files", "windows"):
            assert index.header.sections[name].length == plain.header.sections[name].length
        assert [s.digest for s in index.spans()] == [s.digest for s in plain.spans()]
        assert list(index.entries()) == list(plain.entries())


def test_the_index_budget_merges_the_closest_runs() -> None:
    extents = [(0, 10), (100, 110), (115, 120), (1000, 1010), (1030, 1040)]
    assert merge_runs(extents, 0) == extents
    assert merge_runs(extents, 10) == [(0, 10), (100, 120), (1000, 1010), (1030, 1040)]
    assert merge_runs(extents, 0, max_runs=3) == [(0, 10), (100, 120), (1000, 1040)]
    assert merge_runs(extents, 0, max_runs=1) == [(0, 1040)]
    assert merge_runs(extents, 0, max_runs=0) == [(0, 1040)]
    assert plan_cuts([(105, 118)], [50, 100, 104, 118, 130]) == {104, 118}
    assert plan_cuts([(0, 10)], [5, 12]) == {12}  # the layer's start needs no cut
    assert plan_cuts([(40, 60)], []) == set()


def test_the_budget_keeps_the_index_small() -> None:
    rng = random.Random(4)
    tar = random_tar(4)
    blob = gzip_layer(tar, 6, 1, rng)
    plain = _index(blob, [])
    hot = [e.name for e in plain.entries() if e.type == "reg" and e.size][::3]

    unlimited = _index(blob, hot, gap=0, index_share=None)
    budgeted = _index(blob, hot, gap=0, index_share=0.05)

    def size(index: GzipIndex) -> int:
        return sum(index.header.sections[name].length for name in ("spans", "files", "windows"))

    assert size(plain) < 0.05 * len(blob) < size(unlimited)
    assert unlimited.span_count > budgeted.span_count > plain.span_count
    assert size(budgeted) <= 0.05 * len(blob)
