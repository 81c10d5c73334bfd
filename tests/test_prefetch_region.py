"""The prefetch-region annotation: written as the TOC gives the region, read back only
when it is ranges in order, apart and inside the blob."""

import pytest

from estargz.prefetch_region import MAX_REGION_RANGES, decode_region, encode_region


def test_a_region_reads_back_as_it_was_written() -> None:
    region = [(0, 1_000), (4_096, 70_000), (70_001, 1 << 30)]
    assert encode_region(region) == "0-1000,4096-70000,70001-1073741824"
    assert decode_region(encode_region(region), 1 << 30) == region


@pytest.mark.parametrize("text", [
    "", "0-", "-5", "5", "a-b", "0-10,", "10-5", "0-0", "0-10,10-20", "20-30,0-10",
    "0-101", "+1-5", " 0-5", "0-5 ", "0x1-5", "\uff11-5", "0-10;20-30",  # a fullwidth digit
    ",".join(f"{2 * i}-{2 * i + 1}" for i in range(MAX_REGION_RANGES + 1)),
])
def test_a_malformed_region_is_not_followed(text: str) -> None:
    assert decode_region(text, 100) is None


def test_the_longest_region_accepted_and_the_blobs_last_byte() -> None:
    longest = ",".join(f"{2 * i}-{2 * i + 1}" for i in range(MAX_REGION_RANGES))
    assert len(decode_region(longest, 2 * MAX_REGION_RANGES) or []) == MAX_REGION_RANGES
    assert decode_region("0-100", 100) == [(0, 100)]
