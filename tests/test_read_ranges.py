"""The read-ranges annotation: what the converter writes is what the snapshotter
accepts, whatever the profile held, and the same chunks match after merging."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estargz.read_ranges import (
    MARGIN_BYTES,
    MAX_ANNOTATION_BYTES,
    MAX_RANGES_PER_FILE,
    chunk_was_read,
    decode_read_ranges,
    encode_read_ranges,
)

MIB = 1 << 20


def test_ranges_round_trip_sorted() -> None:
    ranges = {"usr/lib/libnode.so": [(40 * MIB, 4096), (0, 8192)], "etc/a": [(0, 1)]}
    assert decode_read_ranges(encode_read_ranges(ranges)) == {
        "etc/a": [(0, 1)], "usr/lib/libnode.so": [(0, 8192), (40 * MIB, 4096)]}


def test_ranges_whose_margins_meet_are_merged() -> None:
    close = [(0, 4096), (4096 + 2 * MARGIN_BYTES, 10)]  # widened, they touch
    apart = [(0, 4096), (4096 + 2 * MARGIN_BYTES + 1, 10)]
    assert decode_read_ranges(encode_read_ranges({"f": close})) == {
        "f": [(0, 4096 + 2 * MARGIN_BYTES + 10)]}
    assert decode_read_ranges(encode_read_ranges({"f": apart})) == {"f": apart}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 64 * MIB), st.integers(0, 2 * MIB)), max_size=40),
       st.integers(0, 70 * MIB), st.integers(1, 4 * MIB))
def test_merging_keeps_which_chunks_were_read(spans, chunk_offset, chunk_size) -> None:
    merged = decode_read_ranges(encode_read_ranges({"f": spans})).get("f", [])
    assert chunk_was_read(chunk_offset, chunk_size, merged) == \
        chunk_was_read(chunk_offset, chunk_size, spans)


def test_a_file_with_too_many_ranges_is_left_to_a_whole_prefetch() -> None:
    step = 2 * MARGIN_BYTES + 4096 + 1  # never merged
    scattered = [(i * step, 4096) for i in range(MAX_RANGES_PER_FILE + 1)]
    text = encode_read_ranges({"big": scattered, "small": [(0, 10)]})
    assert decode_read_ranges(text) == {"small": [(0, 10)]}


def test_the_annotation_stays_under_its_limit_largest_files_left_out() -> None:
    step = 2 * MARGIN_BYTES + 4096 + 1
    files = {f"lib/lib{i:03d}.so": [(k * step + i, 4096)
                                    for k in range(MAX_RANGES_PER_FILE - i)]
             for i in range(40)}
    files["etc/hot"] = [(0, 100)]
    text = encode_read_ranges(files)
    assert len(text) <= MAX_ANNOTATION_BYTES < len(json.dumps(files))
    kept = decode_read_ranges(text)
    assert kept["etc/hot"] == [(0, 100)]
    left_out = set(files) - set(kept)
    assert left_out and min(len(files[p]) for p in left_out) >= \
        max(len(files[p]) for p in kept)


@pytest.mark.parametrize("text", ["[]", '{"f": [[1]]}', '{"f": [[-1, 2]]}', '{"f": [[true, 1]]}',
                                  "not json", "[" * 100_000])
def test_malformed_annotations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        decode_read_ranges(text)
