"""The chunk cache's memory tier: its budget counts each entry's overhead, chunks only
stored give way before chunks read, and a read that raced a forget is kept out."""

from snapshotter.lazy.memory_tier import ENTRY_OVERHEAD, FORGET_LOG, MemoryTier

COST = 100 + ENTRY_OVERHEAD


def chunk(index: int) -> tuple[str, bytes]:
    return f"sha256:{index:064x}", bytes([index % 256]) * 100


def test_the_budget_counts_each_entry_with_its_overhead() -> None:
    tier = MemoryTier(max_bytes=4 * COST, item_limit=1000)
    for index in range(10):
        tier.admit_read(*chunk(index), since=tier.mark())
    assert tier.used_bytes == 4 * COST
    assert [chunk(i)[0] in tier for i in range(10)] == [False] * 6 + [True] * 4
    tier.admit_read("sha256:" + "f" * 64, b"x" * 1001, since=tier.mark())  # over the limit
    assert "sha256:" + "f" * 64 not in tier and tier.used_bytes == 4 * COST


def test_chunks_only_stored_take_at_most_their_share() -> None:
    tier = MemoryTier(max_bytes=8 * COST, item_limit=1000, probation_share=0.25)
    for index in range(100):  # a background fetch, nothing read: the share, not more
        tier.admit_stored(*chunk(index))
    assert tier.used_bytes == 2 * COST
    assert [chunk(i)[0] in tier for i in (97, 98, 99)] == [False, True, True]


def test_stored_chunks_give_way_to_read_ones() -> None:
    tier = MemoryTier(max_bytes=8 * COST, item_limit=1000, probation_share=0.25)
    for index in range(6):
        tier.admit_read(*chunk(index), since=tier.mark())
    for index in range(100, 200):
        tier.admit_stored(*chunk(index))
    assert all(chunk(i)[0] in tier for i in range(6))
    assert [chunk(i)[0] in tier for i in (197, 198, 199)] == [False, True, True]
    # A stored chunk read again joins the read ones, and stays.
    assert tier.get(chunk(198)[0]) == chunk(198)[1]
    for index in range(200, 210):
        tier.admit_stored(*chunk(index))
    assert all(chunk(i)[0] in tier for i in (*range(6), 198))
    assert [chunk(i)[0] in tier for i in (208, 209)] == [False, True]
    # More read chunks than fit: the stored one goes first, then the oldest read.
    tier.admit_read(*chunk(7), since=tier.mark())
    assert chunk(209)[0] not in tier and chunk(0)[0] in tier
    tier.admit_read(*chunk(8), since=tier.mark())
    assert chunk(0)[0] not in tier
    assert tier.used_bytes == 8 * COST


def test_a_read_that_raced_a_forget_is_not_admitted() -> None:
    tier = MemoryTier(max_bytes=100 * COST, item_limit=1000)
    digest, data = chunk(1)
    mark = tier.mark()
    tier.forget(digest)  # evicted while it was being read from disk
    tier.forget(chunk(2)[0])
    tier.admit_read(digest, data, since=mark)
    assert digest not in tier
    tier.admit_read(digest, data, since=tier.mark())  # read again afterwards: fine
    assert tier.get(digest) == data
    other, other_data = chunk(3)
    mark = tier.mark()
    for index in range(FORGET_LOG + 1):  # too many forgets to tell: kept out
        tier.forget(chunk(1000 + index)[0])
    tier.admit_read(other, other_data, since=mark)
    assert other not in tier


def test_forget_drops_a_chunk_from_either_segment() -> None:
    tier = MemoryTier(max_bytes=10 * COST, item_limit=1000)
    tier.admit_stored(*chunk(1))
    tier.admit_read(*chunk(2), since=tier.mark())
    assert tier.used_bytes == 2 * COST
    tier.forget(chunk(1)[0])
    tier.forget(chunk(2)[0])
    assert tier.used_bytes == 0 and tier.get(chunk(1)[0]) is None
