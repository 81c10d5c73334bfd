"""The content-addressed chunk cache: verification on write and read, LRU eviction
under a byte limit across packed and file chunks, the memory tier, restarts and
crashes, dedup, protection, atomic writes and bounded memory."""

import contextlib
import hashlib
import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import tracemalloc
from collections import OrderedDict
from pathlib import Path

import pytest

import estargz
from snapshotter.lazy.chunk_cache import PACK_LIMIT, ChunkCache
from snapshotter.lazy.memory_tier import ENTRY_OVERHEAD
from snapshotter.lazy.metrics import REGISTRY
from tests.layers import big_payload

KiB = 1024
BIG = 80 * KiB  # stored as a file: larger than PACK_LIMIT
REPO_ROOT = Path(__file__).resolve().parent.parent
assert BIG > PACK_LIMIT


def chunk_bytes(index: int, size: int = KiB) -> bytes:
    return big_payload(size, seed=index + 1)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stored(cache: ChunkCache, data: bytes) -> str:
    digest = digest_of(data)
    cache.put(digest, data)
    return digest


def chunk_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "sha256").rglob("*") if p.is_file())


def index_rows(root: Path) -> dict[str, tuple[int, bool]]:
    """digest -> (size, is a file), as the index on disk says."""
    with contextlib.closing(sqlite3.connect(root / "chunks.db")) as db:
        return {"sha256:" + key.hex(): (size, bool(is_file)) for key, size, is_file
                in db.execute("SELECT digest, size, data IS NULL FROM chunks")}


def tamper_packed(root: Path, digest: str, position: int = 0) -> None:
    """Flip a byte of a packed chunk's bytes in the index, behind the cache's back."""
    key = bytes.fromhex(digest[len("sha256:"):])
    with contextlib.closing(sqlite3.connect(root / "chunks.db")) as db:
        (data,) = db.execute("SELECT data FROM chunks WHERE digest = ?", (key,)).fetchone()
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        db.execute("UPDATE chunks SET data = ? WHERE digest = ?", (bytes(damaged), key))
        db.commit()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def test_put_then_get_returns_the_bytes_and_counts_them(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 20, memory_bytes=0)
    small, big = chunk_bytes(1), chunk_bytes(2, BIG)
    small_digest, big_digest = stored(cache, small), stored(cache, big)
    assert small_digest in cache and big_digest in cache
    assert cache.get(small_digest) == small and cache.get(big_digest) == big
    assert cache.size_bytes == KiB + BIG and len(cache) == 2
    # The small chunk is packed in the index; the large one is a file.
    assert index_rows(tmp_path) == {small_digest: (KiB, False), big_digest: (BIG, True)}
    assert not Path(cache.path_of(small_digest)).exists()
    assert Path(cache.path_of(big_digest)).read_bytes() == big
    missing = digest_of(b"never stored")
    assert missing not in cache and cache.get(missing) is None
    assert "not a digest" not in cache
    assert (cache.stats.disk_hits, cache.stats.misses) == (2, 1)


def test_put_refuses_bytes_that_do_not_match_their_digest(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 20)
    for data in (chunk_bytes(1), chunk_bytes(2, BIG)):
        with pytest.raises(estargz.DigestMismatch):
            cache.put(digest_of(data), data + b"x")
        assert digest_of(data) not in cache
    with pytest.raises(ValueError):
        cache.put("md5:abc", b"data")
    assert cache.size_bytes == 0 and chunk_files(tmp_path) == []
    assert index_rows(tmp_path) == {}
    assert list(Path(cache.temp_dir).iterdir()) == []


def test_put_many_stores_them_all_in_one_go_or_refuses_them_all(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 20, memory_bytes=0)
    good = [chunk_bytes(i, size) for i, size in enumerate((KiB, BIG, 300))]
    bad = chunk_bytes(9)
    with pytest.raises(estargz.DigestMismatch):
        cache.put_many([(digest_of(good[1]), good[1]), (digest_of(bad), bad + b"x")])
    assert len(cache) == 0 and index_rows(tmp_path) == {} and chunk_files(tmp_path) == []
    cache.put_many([(digest_of(data), data) for data in good] + [(digest_of(good[1]), good[1])])
    assert len(cache) == 3 and cache.size_bytes == KiB + BIG + 300
    assert all(cache.get(digest_of(data)) == data for data in good)
    assert chunk_files(tmp_path) == [Path(cache.path_of(digest_of(good[1])))]
    assert list(Path(cache.temp_dir).iterdir()) == []


def test_eviction_removes_least_recently_used_chunks_until_under_the_limit(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=10 * KiB, memory_bytes=0)
    chunks = [chunk_bytes(i) for i in range(12)]
    digests = [stored(cache, data) for data in chunks[:10]]
    assert cache.size_bytes == 10 * KiB and cache.stats.evictions == 0
    assert cache.get(digests[0]) == chunks[0]  # now the most recently used
    stored(cache, chunks[10])
    stored(cache, chunks[11])
    assert cache.size_bytes == 10 * KiB
    assert cache.stats.evictions == 2
    assert digests[1] not in cache and digests[2] not in cache
    for index in [0, *range(3, 12)]:
        assert cache.get(digest_of(chunks[index])) == chunks[index]
    assert len(cache) == 10 and len(index_rows(tmp_path)) == 10


def test_eviction_follows_use_across_packed_and_file_chunks(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=2 * BIG + 4 * KiB, memory_bytes=0)
    s0, b0, s1, b1, s2, s3 = (stored(cache, chunk_bytes(i, size)) for i, size
                              in enumerate((KiB, BIG, KiB, BIG, KiB, KiB)))
    assert cache.size_bytes == cache.max_bytes and cache.stats.evictions == 0
    cache.get(b0)
    cache.get(s0)  # the order of use: s1 b1 s2 s3 b0 s0
    b2 = stored(cache, chunk_bytes(7, BIG))  # 80 KiB must go: s1, then b1
    assert [d in cache for d in (s0, b0, s1, b1, s2, s3, b2)] == \
        [True, True, False, False, True, True, True]
    assert not Path(cache.path_of(b1)).exists()
    assert Path(cache.path_of(b0)).exists() and Path(cache.path_of(b2)).exists()
    stored(cache, chunk_bytes(8))  # fills the room s1 left
    stored(cache, chunk_bytes(9))  # the least recently used now: s2
    assert s2 not in cache and s3 in cache and cache.stats.evictions == 3
    assert cache.size_bytes == cache.max_bytes
    assert sorted(chunk_files(tmp_path)) == sorted(Path(cache.path_of(d)) for d in (b0, b2))


def test_a_chunk_larger_than_the_whole_cache_is_not_kept(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=2 * KiB, memory_bytes=1 << 20)
    small = stored(cache, chunk_bytes(1))
    large = stored(cache, chunk_bytes(2, 3 * KiB))
    assert large not in cache and small not in cache
    assert cache.size_bytes == 0 and cache.memory_size_bytes == 0
    file_sized = ChunkCache(str(tmp_path / "f"), max_bytes=BIG - 1, memory_bytes=0)
    assert stored(file_sized, chunk_bytes(3, BIG)) not in file_sized
    assert chunk_files(tmp_path / "f") == [] and index_rows(tmp_path / "f") == {}


def test_memory_tier_serves_small_hot_chunks_within_its_bound(tmp_path):
    cost = KiB + ENTRY_OVERHEAD
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 20, memory_bytes=4 * cost,
                       memory_item_limit=KiB)
    small = [chunk_bytes(i) for i in range(5)]
    digests = [stored(cache, data) for data in small]
    big = chunk_bytes(9, 2 * KiB)
    big_digest = stored(cache, big)
    assert cache.memory_size_bytes == cost  # only stored: a quarter of the tier, the last
    assert cache.get(digests[4]) == small[4]
    assert cache.stats.memory_hits == 1 and cache.stats.disk_hits == 0
    # A memory hit never reads the index: even a damaged row does not matter to it.
    tamper_packed(tmp_path, digests[4])
    assert cache.get(digests[4]) == small[4]
    for index in range(4):  # from disk, then kept in memory
        assert cache.get(digests[index]) == small[index]
    assert cache.stats.disk_hits == 4
    assert cache.get_from_memory(digests[4]) is None  # the least recently read
    assert all(cache.get_from_memory(digests[i]) == small[i] for i in range(4))
    assert cache.memory_size_bytes == 4 * cost
    assert cache.get(big_digest) == big and cache.get(big_digest) == big  # over the item limit
    assert cache.stats.disk_hits == 6
    assert cache.get_from_memory(big_digest) is None


def test_chunks_only_stored_do_not_push_read_chunks_out_of_memory(tmp_path):
    cost = KiB + ENTRY_OVERHEAD
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 20, memory_bytes=8 * cost,
                       memory_item_limit=KiB)
    hot = [stored(cache, chunk_bytes(i)) for i in range(6)]
    for digest in hot:
        assert cache.get(digest) is not None  # read: the chunks a workload uses
    for index in range(100, 300):  # a background fetch stores many more
        stored(cache, chunk_bytes(index))
    assert all(cache.get_from_memory(digest) is not None for digest in hot)
    assert cache.memory_size_bytes <= 8 * cost
    # The stored ones use the rest: the last two.
    assert cache.get_from_memory(digest_of(chunk_bytes(299))) is not None
    assert cache.get_from_memory(digest_of(chunk_bytes(297))) is None


def test_chunks_stored_ahead_of_readers_enter_memory_only_when_read(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 20, memory_bytes=64 * KiB,
                       memory_item_limit=8 * KiB)
    ahead = [chunk_bytes(i) for i in range(4)]
    cache.put_many([(digest_of(data), data) for data in ahead], keep_in_memory=False)
    assert all(digest_of(data) in cache for data in ahead)
    assert cache.memory_size_bytes == 0
    assert cache.get_from_memory(digest_of(ahead[0])) is None
    assert cache.get(digest_of(ahead[0])) == ahead[0]  # read: from disk, then in memory
    assert cache.get_from_memory(digest_of(ahead[0])) == ahead[0]
    assert cache.memory_size_bytes == KiB + ENTRY_OVERHEAD
    # Stored again ahead of readers (the same chunk in another layer): still disk only.
    cache.put_many([(digest_of(ahead[1]), ahead[1])], keep_in_memory=False)
    assert cache.get_from_memory(digest_of(ahead[1])) is None


def test_a_readers_large_chunk_is_served_from_its_sealed_file_not_memory(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=8 << 20, memory_bytes=1 << 20,
                       memory_item_limit=1 << 20)
    large, packed = chunk_bytes(1, size=2 * PACK_LIMIT), chunk_bytes(2)
    cache.put_many([(digest_of(large), large), (digest_of(packed), packed)])
    assert cache.get_from_memory(digest_of(large)) is None
    assert cache.get_from_memory(digest_of(packed)) == packed
    assert cache.memory_size_bytes == len(packed) + ENTRY_OVERHEAD
    assert cache.read_sealed(digest_of(large), 100, 100_000) == large[100:100_000]
    assert cache.stats.sealed_range_reads == 1 and cache.stats.hashed_reads == 0


def test_a_sealed_chunk_file_is_read_in_part_and_never_once_changed(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=8 << 20, memory_bytes=1 << 20,
                       memory_item_limit=1 << 20)
    large, packed = chunk_bytes(1, size=2 * PACK_LIMIT), chunk_bytes(2)
    cache.put_many([(digest_of(large), large), (digest_of(packed), packed)],
                   keep_in_memory=False)
    assert cache.read_sealed(digest_of(large), 1000, 70_000) == large[1000:70_000]
    assert cache.read_sealed(digest_of(large), 5, 5) == b""
    assert cache.stats.sealed_range_reads == 2 and cache.stats.hashed_reads == 0
    assert cache.memory_size_bytes == 0  # the kernel's page cache keeps the pages
    assert cache.read_sealed(digest_of(packed), 0, 10) is None  # not a file: `get` reads it
    assert cache.read_sealed(digest_of(chunk_bytes(3)), 0, 10) is None  # not stored
    assert cache.read_sealed(digest_of(large), 0, len(large) + 1) is None  # past its end
    with pytest.raises(ValueError):
        cache.read_sealed(digest_of(large), 10, 5)
    flip_byte(Path(cache.path_of(digest_of(large))), 70_000)  # outside the range read
    assert cache.read_sealed(digest_of(large), 1000, 2000) is None  # the seal is broken
    assert cache.get(digest_of(large)) is None and cache.stats.corrupt == 1
    assert digest_of(large) not in cache


def test_corrupt_chunks_read_as_a_miss_and_are_deleted(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 20, memory_bytes=0)
    packed, flipped, truncated, good = (chunk_bytes(0), chunk_bytes(1, BIG),
                                        chunk_bytes(2, BIG), chunk_bytes(3))
    packed_digest, flipped_digest, truncated_digest, good_digest = \
        (stored(cache, data) for data in (packed, flipped, truncated, good))
    corrupt_before = sample("lazypull_chunk_cache_corrupt_chunks_total")
    tamper_packed(tmp_path, packed_digest, 100)
    flip_byte(Path(cache.path_of(flipped_digest)), 100)
    Path(cache.path_of(truncated_digest)).write_bytes(truncated[:500])  # a power loss
    for digest in (packed_digest, flipped_digest, truncated_digest):
        assert cache.get(digest) is None
    assert cache.stats.corrupt == 3 and cache.stats.misses == 3
    assert sample("lazypull_chunk_cache_corrupt_chunks_total") == corrupt_before + 3
    for digest in (packed_digest, flipped_digest, truncated_digest):
        assert digest not in cache
        assert not Path(cache.path_of(digest)).exists()
    assert index_rows(tmp_path) == {good_digest: (KiB, False)}
    assert cache.size_bytes == len(good)
    assert cache.get(good_digest) == good
    cache.put(packed_digest, packed)  # fetched again
    cache.put(flipped_digest, flipped)
    assert cache.get(packed_digest) == packed and cache.get(flipped_digest) == flipped


def test_sealed_files_are_not_hashed_again_and_never_served_changed(tmp_path):
    """A chunk file this process placed (hashed on the way in) is read without a hash
    while it is as placed; written to at once after (within the same clock tick as its
    seal, very likely) it is hashed again and refused. Packed chunks and the files of
    a reopened cache are hashed at each read from disk."""
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 20, memory_bytes=0)
    kept, changed, small = chunk_bytes(1, BIG), chunk_bytes(2, BIG), chunk_bytes(3)
    kept_digest, changed_digest, small_digest = (stored(cache, d) for d in (kept, changed,
                                                                           small))
    flip_byte(Path(cache.path_of(changed_digest)), 100)
    assert cache.get(kept_digest) == kept and cache.get(kept_digest) == kept
    assert cache.stats.hashed_reads == 0
    assert cache.get(changed_digest) is None
    assert cache.stats.corrupt == 1 and changed_digest not in cache
    assert cache.get(small_digest) == small and cache.stats.hashed_reads == 1
    cache.close()
    reopened = ChunkCache(str(tmp_path), max_bytes=1 << 20, memory_bytes=0)
    assert reopened.get(kept_digest) == kept and reopened.stats.hashed_reads == 1
    reopened.close()


def test_restart_sees_the_old_chunks_in_their_lru_order(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 20, memory_bytes=1 << 20)
    sizes = [KiB, BIG, KiB, BIG, KiB, KiB]
    chunks = [chunk_bytes(i, size) for i, size in enumerate(sizes)]
    digests = [stored(cache, data) for data in chunks]
    for index in (2, 0, 1):  # used again: the order becomes 3 4 5 2 0 1
        assert cache.get(digests[index]) == chunks[index]  # from memory: a touch only
    cache.close()
    reopened = ChunkCache(str(tmp_path), max_bytes=1 << 20, memory_bytes=0)
    assert reopened.size_bytes == sum(sizes) and len(reopened) == 6
    for index in (3, 4, 5, 2, 0, 1):  # read in the order of use: the order stays
        assert reopened.get(digests[index]) == chunks[index]
    reopened.close()
    limit = sizes[0] + sizes[1] + sizes[2] + 1
    smaller = ChunkCache(str(tmp_path), max_bytes=limit, memory_bytes=0)  # the limit shrank
    assert [d in smaller for d in digests] == [True, True, True, False, False, False]
    assert smaller.size_bytes == limit - 1
    assert chunk_files(tmp_path) == [Path(smaller.path_of(digests[1]))]


def test_lru_order_and_protection_survive_a_reopen(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 20, memory_bytes=0)
    digests = [stored(cache, chunk_bytes(i)) for i in range(8)]
    cache.protect(digests[:2], owner="image-a")  # the two least recently used
    cache.protect([digest_of(chunk_bytes(20))], owner="image-b")  # not stored yet
    for index in (3, 2):
        cache.get(digests[index])  # the order of use: 0 1 4 5 6 7 3 2
    cache.close()
    reopened = ChunkCache(str(tmp_path), max_bytes=6 * KiB, memory_bytes=0)
    assert reopened.owners() == ["image-a", "image-b"]
    # Two had to go at once, the least recently used that are not protected.
    assert [d in reopened for d in digests] == [True, True, True, True,
                                                False, False, True, True]
    stored(reopened, chunk_bytes(20))  # protected before the restart: kept
    stored(reopened, chunk_bytes(21))
    assert digest_of(chunk_bytes(20)) in reopened
    assert [d in reopened for d in digests] == [True, True, True, True,
                                                False, False, False, False]
    reopened.release("image-a")
    assert reopened.owners() == ["image-b"]
    stored(reopened, chunk_bytes(22))
    stored(reopened, chunk_bytes(23))
    assert digests[0] not in reopened and digests[1] not in reopened


def _layer_with(files: dict[str, bytes], out: Path) -> estargz.BlobReader:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(out, "wb") as blob:
        result = estargz.build(io.BytesIO(buf.getvalue()), blob,
                               estargz.BuildOptions(chunk_size=4 * KiB, workers=1))
    return estargz.BlobReader.open(estargz.FileSource.open(str(out)), result.toc_digest)


def test_the_same_chunk_from_two_layers_is_stored_once(tmp_path):
    shared = big_payload(10 * KiB, seed=42)
    readers = [_layer_with({"usr/lib/shared.so": shared, "own": big_payload(3000, seed=n)},
                           tmp_path / f"layer{n}.blob") for n in range(2)]
    cache = ChunkCache(str(tmp_path / "cache"), max_bytes=1 << 20, memory_bytes=0)
    sizes: dict[str, int] = {}
    puts = 0
    for reader in readers:
        for chunk in reader.layer.payload_chunks():
            cache.put(chunk.digest, reader.read_chunk(chunk))
            sizes[chunk.digest] = chunk.size
            puts += 1
        reader.source.close()
    shared_chunks = [reader.layer.lookup("usr/lib/shared.so").chunks for reader in readers]
    assert [c.digest for c in shared_chunks[0]] == [c.digest for c in shared_chunks[1]]
    assert len(shared_chunks[0]) == 3  # 4 + 4 + 2 KiB
    # Each layer: three chunks of the shared file, its own file, the landmark file.
    assert puts == 10 and len(sizes) == 6
    assert len(cache) == 6 and len(index_rows(tmp_path / "cache")) == 6
    assert cache.size_bytes == sum(sizes.values()) < 2 * len(shared)


def test_protected_chunks_survive_eviction_until_released(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=8 * KiB, memory_bytes=0)
    warm = [stored(cache, chunk_bytes(i)) for i in range(2)]  # the least recently used
    cache.protect(warm, owner="image-a")
    for index in range(2, 12):
        stored(cache, chunk_bytes(index))
    assert all(d in cache for d in warm)
    assert cache.size_bytes <= 8 * KiB
    cache.protect([digest_of(chunk_bytes(20))], owner="image-b")  # not stored yet
    stored(cache, chunk_bytes(20))
    stored(cache, chunk_bytes(21))
    assert digest_of(chunk_bytes(20)) in cache
    cache.release("image-a")
    stored(cache, chunk_bytes(22))
    stored(cache, chunk_bytes(23))
    assert not any(d in cache for d in warm)
    assert digest_of(chunk_bytes(20)) in cache  # image-b still protects it


def test_protection_covers_at_most_its_share_of_the_cache(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=8 * KiB, memory_bytes=0, protected_share=0.5)
    older = [stored(cache, chunk_bytes(i)) for i in range(3)]
    newer = [stored(cache, chunk_bytes(i)) for i in range(3, 6)]
    cache.protect(older, owner="old-image")
    cache.protect(newer, owner="new-image")  # 6 KiB protected, the share is 4 KiB
    for index in range(10, 20):
        stored(cache, chunk_bytes(index))
    assert cache.size_bytes <= 8 * KiB
    # The most recently protected 4 KiB stay; older protection yields to the share.
    assert all(d in cache for d in newer)
    assert sum(d in cache for d in older) == 1


def test_protect_refuses_a_bad_digest_and_protects_nothing(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=2 * KiB, memory_bytes=0)
    kept = digest_of(chunk_bytes(1))
    with pytest.raises(ValueError, match="not a sha256 digest"):
        cache.protect(iter([kept, "md5:0123"]), owner="image")
    assert cache.owners() == []
    stored(cache, chunk_bytes(1))
    stored(cache, chunk_bytes(2))
    stored(cache, chunk_bytes(3))
    assert kept not in cache


class _Model:
    """The eviction rules, as plainly as they can be said: LRU order; protected chunks
    ranked by their latest protection (then by digest), shielded while the best
    ranked fit in the share; after each chunk evicted, the shield is decided again."""

    def __init__(self, max_bytes: int, share: float):
        self.max_bytes, self.budget = max_bytes, share * max_bytes
        self.lru: OrderedDict[str, int] = OrderedDict()
        self.holders: dict[str, dict[str, int]] = {}
        self.rank = 0

    def shielded(self) -> set[str]:
        ranked = sorted(((max(owners.values()), bytes.fromhex(d[7:])), d)
                        for d, owners in self.holders.items() if owners and d in self.lru)
        shielded, used = set(), 0
        for _, digest in reversed(ranked):
            used += self.lru[digest]
            if used > self.budget:
                break
            shielded.add(digest)
        return shielded

    def evict(self) -> None:
        while sum(self.lru.values()) > self.max_bytes:
            shielded = self.shielded()
            victim = next((d for d in self.lru if d not in shielded), None)
            if victim is None:
                return
            del self.lru[victim]

    def put(self, digest: str, size: int) -> None:
        self.lru[digest] = size
        self.lru.move_to_end(digest)
        self.evict()

    def get(self, digest: str) -> None:
        if digest in self.lru:
            self.lru.move_to_end(digest)

    def protect(self, digests: list[str], owner: str) -> None:
        self.rank += 1
        for digest in digests:
            self.holders.setdefault(digest, {})[owner] = self.rank

    def release(self, owner: str) -> None:
        for owners in self.holders.values():
            owners.pop(owner, None)
        self.evict()


def test_eviction_and_protection_agree_with_a_plain_model_through_reopens(tmp_path):
    rng = random.Random(7)
    sizes = [rng.choice([300, 700, KiB, 2 * KiB, 3 * KiB, BIG]) for _ in range(120)]
    chunks = [chunk_bytes(i, size) for i, size in enumerate(sizes)]
    digests = [digest_of(data) for data in chunks]
    limit = BIG + 24 * KiB

    def open_cache() -> ChunkCache:
        return ChunkCache(str(tmp_path), max_bytes=limit, memory_bytes=4 * KiB,
                          memory_item_limit=KiB)

    cache, model = open_cache(), _Model(limit, 0.5)
    for step in range(1500):
        roll, index = rng.random(), rng.randrange(len(chunks))
        if roll < 0.55:
            cache.put(digests[index], chunks[index])
            model.put(digests[index], sizes[index])
        elif roll < 0.85:
            cache.get(digests[index])
            model.get(digests[index])
        elif roll < 0.93:
            owner = f"owner-{rng.randrange(4)}"
            picked = rng.sample(digests, rng.randrange(1, 12))
            cache.protect(picked, owner)
            model.protect(picked, owner)
        elif roll < 0.99:
            owner = f"owner-{rng.randrange(4)}"
            cache.release(owner)
            model.release(owner)
        else:
            cache.close()
            cache = open_cache()
        assert [d for d in digests if d in cache] == [d for d in digests if d in model.lru], step
        assert cache.size_bytes == sum(model.lru.values()) <= limit
    cache.close()


def test_writes_are_atomic_and_crash_leftovers_are_cleaned_at_start(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 30)
    digests = [stored(cache, chunk_bytes(i, 300 if i % 2 else BIG)) for i in range(40)]
    assert list(Path(cache.temp_dir).iterdir()) == []
    assert len(chunk_files(tmp_path)) == 20
    cache.close()
    # A crash during a write leaves a temp file; an old bug may leave a stray file.
    half = Path(cache.temp_dir) / (digests[0][7:] + ".0123456789ab")
    half.write_bytes(b"half a chunk")
    stray = Path(cache.path_of(digests[0])).parent / "not-a-chunk"
    stray.write_bytes(b"junk")
    reopened = ChunkCache(str(tmp_path), max_bytes=1 << 30)
    assert not half.exists() and not stray.exists()
    assert len(reopened) == 40 and reopened.size_bytes == 20 * 300 + 20 * BIG
    assert reopened.get(digests[0]) == chunk_bytes(0, BIG)
    assert reopened.get(digests[1]) == chunk_bytes(1, 300)


def test_start_repairs_what_a_crash_or_an_older_cache_left(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 30, memory_bytes=0)
    kept = stored(cache, chunk_bytes(1, BIG))
    gone = stored(cache, chunk_bytes(2, BIG))
    cache.protect([digest_of(chunk_bytes(3, BIG))], owner="image")
    cache.close()
    os.unlink(cache.path_of(gone))  # removed while the cache was down

    def place(data: bytes) -> Path:  # a file without a row
        path = Path(cache.path_of(digest_of(data)))
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return path

    orphan = chunk_bytes(3, BIG)  # renamed into place, the row never committed
    place(orphan)
    old_small = chunk_bytes(4, 500)  # an older cache kept every chunk as a file
    old_small_path = place(old_small)
    bad_small = Path(cache.path_of(digest_of(b"what it should be")))
    bad_small.parent.mkdir(exist_ok=True)
    bad_small.write_bytes(b"something else")
    reopened = ChunkCache(str(tmp_path), max_bytes=1 << 30, memory_bytes=0)
    assert gone not in reopened and kept in reopened
    assert reopened.get(digest_of(orphan)) == orphan
    assert reopened.get(digest_of(old_small)) == old_small
    assert not old_small_path.exists()  # packed now
    assert not bad_small.exists() and digest_of(b"what it should be") not in reopened
    assert reopened.size_bytes == 2 * BIG + 500 and len(reopened) == 3
    assert index_rows(tmp_path)[digest_of(old_small)] == (500, False)
    # The adopted chunk was protected before it had a row: it still is.
    reopened.close()
    shrunk = ChunkCache(str(tmp_path), max_bytes=BIG, protected_share=1.0)
    assert [d in shrunk for d in (kept, digest_of(orphan), digest_of(old_small))] == \
        [False, True, False]


def test_an_unreadable_index_is_replaced_and_the_files_adopted(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 30, memory_bytes=0)
    small = stored(cache, chunk_bytes(1))
    big = stored(cache, chunk_bytes(2, BIG))
    cache.close()
    (tmp_path / "chunks.db").write_bytes(b"not a database " * 1000)
    reopened = ChunkCache(str(tmp_path), max_bytes=1 << 30, memory_bytes=0)
    assert small not in reopened  # its bytes went with the index
    assert reopened.get(big) == chunk_bytes(2, BIG)
    assert reopened.size_bytes == BIG and len(reopened) == 1


_PUT_FOREVER = """
import hashlib, sys
from snapshotter.lazy.chunk_cache import ChunkCache
cache = ChunkCache(sys.argv[1], max_bytes=1 << 40, memory_bytes=0)
index = 0
while True:
    data = b"%d " % index * (20000 if index % 7 == 0 else 1 + index % 50)
    cache.put("sha256:" + hashlib.sha256(data).hexdigest(), data)
    print(index, flush=True)
    index += 1
"""


def _expected(index: int) -> bytes:
    return b"%d " % index * (20000 if index % 7 == 0 else 1 + index % 50)


@pytest.mark.parametrize("puts_before_kill", [1, 150, 700])
def test_a_cache_killed_in_the_middle_of_puts_reopens_consistent(tmp_path, puts_before_kill):
    child = subprocess.Popen([sys.executable, "-c", _PUT_FOREVER, str(tmp_path)],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert child.stdout is not None
        for _ in range(puts_before_kill):
            last = int(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)  # by PID, while it is still putting
        child.wait()
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 40, memory_bytes=0)
    rows = index_rows(tmp_path)
    # Every put that returned is there (the index is durable against a kill -9).
    for index in range(last + 1):
        assert cache.get(digest_of(_expected(index))) == _expected(index), index
    # Whatever else is there verifies, and the sizes add up.
    for digest, (size, is_file) in rows.items():
        data = cache.get(digest)
        assert data is not None and len(data) == size and digest_of(data) == digest
        assert Path(cache.path_of(digest)).exists() == is_file
    assert cache.stats.corrupt == 0
    assert cache.size_bytes == sum(size for size, _ in rows.values())
    assert len(cache) == len(rows) >= last + 1
    assert sorted(chunk_files(tmp_path)) == \
        sorted(Path(cache.path_of(d)) for d, (_, is_file) in rows.items() if is_file)
    assert list(Path(cache.temp_dir).iterdir()) == []


def test_threads_putting_and_getting_keep_the_index_and_files_consistent(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=40 * KiB + 2 * BIG, memory_bytes=8 * KiB,
                       memory_item_limit=KiB)
    chunks = [chunk_bytes(i, BIG if i % 17 == 0 else 700 + 50 * (i % 7)) for i in range(120)]
    wrong: list[str] = []

    def worker(offset: int) -> None:
        for step in range(300):
            data = chunks[(offset * 31 + step * 7) % len(chunks)]
            digest = digest_of(data)
            if step % 3:
                got = cache.get(digest)
                if got is not None and got != data:
                    wrong.append(digest)
            elif step % 50 == 0:
                cache.protect([digest], owner=f"worker-{offset}")
                cache.release(f"worker-{(offset + 1) % 8}")
            else:
                cache.put(digest, data)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    rows = index_rows(tmp_path)
    assert cache.size_bytes <= cache.max_bytes
    assert cache.size_bytes == sum(size for size, _ in rows.values())
    assert len(rows) == len(cache)
    assert sorted(chunk_files(tmp_path)) == \
        sorted(Path(cache.path_of(d)) for d, (_, is_file) in rows.items() if is_file)
    assert cache.memory_size_bytes <= 8 * KiB
    assert list(Path(cache.temp_dir).iterdir()) == []


def test_metrics_count_hits_by_tier_misses_and_evictions(tmp_path):
    before = {
        "memory": sample("lazypull_chunk_cache_hits_total", tier="memory"),
        "disk": sample("lazypull_chunk_cache_hits_total", tier="disk"),
        "misses": sample("lazypull_chunk_cache_misses_total"),
        "evictions": sample("lazypull_chunk_cache_evictions_total"),
        "bytes": sample("lazypull_chunk_cache_bytes"),
    }
    cache = ChunkCache(str(tmp_path), max_bytes=2 * KiB, memory_bytes=KiB,
                       memory_item_limit=KiB)
    first = stored(cache, chunk_bytes(1))  # too large for memory with its overhead
    second = stored(cache, chunk_bytes(2, 512))
    assert cache.get(second) is not None  # disk, then kept in memory
    assert cache.get(second) is not None  # memory
    assert cache.get(first) is not None  # disk
    assert cache.get(digest_of(b"absent")) is None
    stored(cache, chunk_bytes(3))  # evicts the least recently used: second
    assert second not in cache
    assert sample("lazypull_chunk_cache_hits_total", tier="memory") == before["memory"] + 1
    assert sample("lazypull_chunk_cache_hits_total", tier="disk") == before["disk"] + 2
    assert sample("lazypull_chunk_cache_misses_total") == before["misses"] + 1
    assert sample("lazypull_chunk_cache_evictions_total") == before["evictions"] + 1
    assert sample("lazypull_chunk_cache_bytes") == before["bytes"] + cache.size_bytes
    cache.close()
    assert sample("lazypull_chunk_cache_bytes") == before["bytes"]


def test_on_disk_notices_files_removed_behind_its_back(tmp_path):
    cache = ChunkCache(str(tmp_path / "c"), max_bytes=1 << 20)
    small, big = chunk_bytes(1), chunk_bytes(2, BIG)
    small_digest, big_digest = stored(cache, small), stored(cache, big)
    assert cache.on_disk(big_digest) and big_digest in cache
    os.unlink(cache.path_of(big_digest))
    assert big_digest in cache  # the index alone still believes it
    assert not cache.on_disk(big_digest)
    assert big_digest not in cache and cache.size_bytes == len(small)
    assert cache.on_disk(small_digest) and not cache.on_disk("sha256:nothing")
    cache.put(big_digest, big)  # fetched again
    assert cache.on_disk(big_digest) and cache.get(big_digest) == big


def test_stored_among_answers_for_many_and_checks_files_on_request(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 30, memory_bytes=0)
    digests = [stored(cache, chunk_bytes(i, BIG if i % 10 == 0 else 200)) for i in range(300)]
    absent = [digest_of(b"absent %d" % i) for i in range(100)]
    asked = digests + absent + ["not a digest"]
    assert cache.stored_among(asked) == set(digests)
    os.unlink(cache.path_of(digests[10]))  # removed behind the cache's back
    assert cache.stored_among(asked) == set(digests)  # the index alone
    assert cache.stored_among(iter(asked), check_files=True) == set(digests) - {digests[10]}
    assert digests[10] not in cache and len(cache) == 299


def test_a_hundred_thousand_tiny_chunks_take_bounded_memory_and_no_files(tmp_path):
    def tiny(index: int) -> bytes:
        return b"tiny file %d\n" % index

    tracemalloc.start()
    try:
        cache = ChunkCache(str(tmp_path), max_bytes=1 << 30, memory_bytes=1 << 20)
        for start in range(0, 100_000, 250):  # as a fetcher stores a request's chunks
            cache.put_many((digest_of(tiny(i)), tiny(i)) for i in range(start, start + 250))
        for index in range(100_000, 101_000):  # and one at a time
            cache.put(digest_of(tiny(index)), tiny(index))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The index of Python objects this replaced held ~47 MB for these (perf chunk-cache).
    assert peak < 8 << 20, peak
    assert len(cache) == 101_000
    assert cache.size_bytes == sum(len(tiny(i)) for i in range(101_000))
    assert chunk_files(tmp_path) == []  # packed: no file, no inode per chunk
    for index in range(0, 101_000, 997):
        assert cache.get(digest_of(tiny(index))) == tiny(index)


def test_protecting_a_million_digests_takes_bounded_memory(tmp_path):
    def data(index: int) -> bytes:
        return index.to_bytes(4, "little")

    cache = ChunkCache(str(tmp_path), max_bytes=64, memory_bytes=0)
    tracemalloc.start()
    try:
        cache.protect((digest_of(data(i)) for i in range(1_000_000)), owner="big-image")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A set of a million digests alone is ~120 MB of Python objects.
    assert peak < 8 << 20, peak
    assert cache.owners() == ["big-image"]
    for index in range(8):  # 32 bytes of protected chunks: the share
        cache.put(digest_of(data(index)), data(index))
    for index in range(20):
        filler = b"unprotected %d" % index
        cache.put(digest_of(filler), filler)
    assert all(digest_of(data(i)) in cache for i in range(8))
    cache.release("big-image")
    assert cache.owners() == []
    cache.put(digest_of(b"x" * 60), b"x" * 60)
    assert not any(digest_of(data(i)) in cache for i in range(8))


def test_range_reads_leave_their_uses_to_be_written_by_the_caller(tmp_path, monkeypatch):
    monkeypatch.setattr("snapshotter.lazy.chunk_cache.TOUCH_FLUSH", 2)
    cache = ChunkCache(str(tmp_path), max_bytes=8 << 20, memory_bytes=1 << 20,
                       memory_item_limit=1 << 20)
    files = [chunk_bytes(n, size=2 * PACK_LIMIT) for n in (1, 2)]
    cache.put_many([(digest_of(data), data) for data in files], keep_in_memory=False)
    db = sqlite3.connect(tmp_path / "chunks.db")
    before = dict(db.execute("SELECT digest, used FROM chunks"))
    for data in files:
        assert cache.read_sealed(digest_of(data), 0, 10) == data[:10]
    assert cache.touches_due  # gathered, not written on the reading thread
    assert dict(db.execute("SELECT digest, used FROM chunks")) == before
    cache.write_touches_if_due()
    assert not cache.touches_due
    after = dict(db.execute("SELECT digest, used FROM chunks"))
    assert all(after[key] > before[key] for key in before)
    db.close()


def test_a_packed_chunk_is_read_hashed_and_never_once_changed(tmp_path, monkeypatch):
    monkeypatch.setattr("snapshotter.lazy.chunk_cache.TOUCH_FLUSH", 2)
    cache = ChunkCache(str(tmp_path), max_bytes=8 << 20, memory_bytes=1 << 20,
                       memory_item_limit=1 << 20)
    packed, other, large = chunk_bytes(1), chunk_bytes(2), chunk_bytes(3, size=2 * PACK_LIMIT)
    cache.put_many([(digest_of(d), d) for d in (packed, other, large)], keep_in_memory=False)
    db = sqlite3.connect(tmp_path / "chunks.db")
    before = dict(db.execute("SELECT digest, used FROM chunks"))
    assert cache.read_packed(digest_of(packed), 10, 100) == packed[10:100]
    assert cache.stats.hashed_reads == 1 and cache.stats.disk_hits == 1
    assert cache.get_from_memory(digest_of(packed)) == packed  # read: now in memory
    assert cache.read_packed(digest_of(large), 0, 10) is None  # a file: read_sealed's
    assert cache.read_packed(digest_of(chunk_bytes(4)), 0, 10) is None  # not stored
    with pytest.raises(ValueError):
        cache.read_packed(digest_of(packed), 10, 5)
    # Its use is gathered, not written: a reader on an event loop writes nothing.
    assert dict(db.execute("SELECT digest, used FROM chunks")) == before
    db.close()
    tamper_packed(tmp_path, digest_of(other), position=700)
    assert cache.read_packed(digest_of(other), 0, 10) is None  # outside the range, refused
    assert digest_of(other) in cache  # left for `get`, which counts and drops it
    assert cache.get(digest_of(other)) is None and cache.stats.corrupt == 1
    assert digest_of(other) not in cache
