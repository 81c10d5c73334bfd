"""The content-addressed chunk cache: verification on write and read, LRU eviction
under a byte limit, the memory tier, restarts, dedup, protection and atomic writes."""

import hashlib
import io
import os
import tarfile
import threading
from pathlib import Path

import pytest

import estargz
from snapshotter.lazy.chunk_cache import ChunkCache
from snapshotter.lazy.metrics import REGISTRY
from tests.layers import big_payload

KiB = 1024


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


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def test_put_then_get_returns_the_bytes_and_counts_them(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=64 * KiB, memory_bytes=0)
    data = chunk_bytes(1)
    digest = stored(cache, data)
    assert digest in cache
    assert cache.get(digest) == data
    assert cache.size_bytes == len(data) and len(cache) == 1
    assert Path(cache.path_of(digest)).read_bytes() == data
    missing = digest_of(b"never stored")
    assert missing not in cache and cache.get(missing) is None
    assert (cache.stats.disk_hits, cache.stats.misses) == (1, 1)


def test_put_refuses_bytes_that_do_not_match_their_digest(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=64 * KiB)
    data = chunk_bytes(1)
    with pytest.raises(estargz.DigestMismatch):
        cache.put(digest_of(data), data + b"x")
    with pytest.raises(ValueError):
        cache.put("md5:abc", data)
    assert digest_of(data) not in cache
    assert cache.size_bytes == 0 and chunk_files(tmp_path) == []
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
    assert not Path(cache.path_of(digests[1])).exists()
    for index in [0, *range(3, 12)]:
        assert cache.get(digest_of(chunks[index])) == chunks[index]
    assert len(chunk_files(tmp_path)) == 10


def test_a_chunk_larger_than_the_whole_cache_is_not_kept(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=2 * KiB, memory_bytes=0)
    small = stored(cache, chunk_bytes(1))
    large = stored(cache, chunk_bytes(2, 3 * KiB))
    assert large not in cache and small not in cache
    assert cache.size_bytes == 0 and chunk_files(tmp_path) == []


def test_memory_tier_serves_small_hot_chunks_within_its_bound(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 20, memory_bytes=3 * KiB,
                       memory_item_limit=KiB)
    small = [chunk_bytes(i) for i in range(5)]
    digests = [stored(cache, data) for data in small]
    big = chunk_bytes(9, 2 * KiB)
    big_digest = stored(cache, big)
    assert cache.memory_size_bytes == 3 * KiB  # the last three small ones
    assert cache.get(digests[4]) == small[4]
    assert cache.stats.memory_hits == 1 and cache.stats.disk_hits == 0
    # A memory hit never reads the file: even a damaged file does not matter to it.
    flip_byte(Path(cache.path_of(digests[4])), 0)
    assert cache.get(digests[4]) == small[4]
    assert cache.get(digests[0]) == small[0]  # from disk, then promoted
    assert cache.stats.disk_hits == 1
    assert cache.get_from_memory(digests[0]) == small[0]
    assert cache.memory_size_bytes == 3 * KiB
    assert cache.get(big_digest) == big and cache.get(big_digest) == big  # over the item limit
    assert cache.stats.disk_hits == 3
    assert cache.get_from_memory(big_digest) is None


def test_corrupt_chunk_file_reads_as_a_miss_and_is_deleted(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=64 * KiB, memory_bytes=0)
    flipped, truncated, good = (chunk_bytes(i) for i in range(3))
    flipped_digest = stored(cache, flipped)
    truncated_digest = stored(cache, truncated)
    good_digest = stored(cache, good)
    corrupt_before = sample("lazypull_chunk_cache_corrupt_chunks_total")
    flip_byte(Path(cache.path_of(flipped_digest)), 100)
    Path(cache.path_of(truncated_digest)).write_bytes(truncated[:500])  # a power loss
    assert cache.get(flipped_digest) is None
    assert cache.get(truncated_digest) is None
    assert cache.stats.corrupt == 2 and cache.stats.misses == 2
    assert sample("lazypull_chunk_cache_corrupt_chunks_total") == corrupt_before + 2
    for digest in (flipped_digest, truncated_digest):
        assert digest not in cache
        assert not Path(cache.path_of(digest)).exists()
    assert cache.size_bytes == len(good)
    assert cache.get(good_digest) == good
    cache.put(flipped_digest, flipped)  # fetched again
    assert cache.get(flipped_digest) == flipped


def test_restart_sees_the_old_chunks_in_their_lru_order(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=64 * KiB, memory_bytes=0)
    chunks = [chunk_bytes(i) for i in range(6)]
    digests = [stored(cache, data) for data in chunks]
    for age, digest in enumerate(digests):  # chunk 0 used longest ago
        when = 1_700_000_000 + age * 100
        os.utime(cache.path_of(digest), (when, when))
    reopened = ChunkCache(str(tmp_path), max_bytes=64 * KiB, memory_bytes=0)
    assert reopened.size_bytes == 6 * KiB
    assert all(reopened.get(d) == data for d, data in zip(digests, chunks, strict=True))
    for age, digest in enumerate(digests):
        when = 1_700_000_000 + age * 100
        os.utime(cache.path_of(digest), (when, when))
    smaller = ChunkCache(str(tmp_path), max_bytes=4 * KiB, memory_bytes=0)  # limit shrank
    assert smaller.size_bytes == 4 * KiB
    assert [d in smaller for d in digests] == [False, False, True, True, True, True]
    assert len(chunk_files(tmp_path)) == 4


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
    assert len(cache) == 6 and len(chunk_files(tmp_path / "cache")) == 6
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


def test_writes_are_atomic_and_crash_leftovers_are_cleaned_at_start(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=1 << 20)
    digests = [stored(cache, chunk_bytes(i, 300)) for i in range(200)]
    assert list(Path(cache.temp_dir).iterdir()) == []
    assert len(chunk_files(tmp_path)) == 200
    # A crash during a write leaves a temp file; an old bug may leave a stray file.
    half = Path(cache.temp_dir) / (digests[0][7:] + ".0123456789ab")
    half.write_bytes(b"half a chunk")
    stray = Path(cache.path_of(digests[1])).parent / "not-a-chunk"
    stray.write_bytes(b"junk")
    reopened = ChunkCache(str(tmp_path), max_bytes=1 << 20)
    assert not half.exists() and not stray.exists()
    assert len(reopened) == 200 and reopened.size_bytes == 200 * 300
    assert reopened.get(digests[0]) == chunk_bytes(0, 300)


def test_threads_putting_and_getting_keep_the_index_and_files_consistent(tmp_path):
    cache = ChunkCache(str(tmp_path), max_bytes=40 * KiB, memory_bytes=8 * KiB,
                       memory_item_limit=KiB)
    chunks = [chunk_bytes(i, 700 + 50 * (i % 7)) for i in range(120)]
    wrong: list[str] = []

    def worker(offset: int) -> None:
        for step in range(300):
            data = chunks[(offset * 31 + step * 7) % len(chunks)]
            digest = digest_of(data)
            if step % 3:
                got = cache.get(digest)
                if got is not None and got != data:
                    wrong.append(digest)
            else:
                cache.put(digest, data)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    files = chunk_files(tmp_path)
    assert cache.size_bytes <= 40 * KiB
    assert cache.size_bytes == sum(f.stat().st_size for f in files)
    assert len(files) == len(cache)
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
    first = stored(cache, chunk_bytes(1))
    second = stored(cache, chunk_bytes(2, 512))  # pushes the first out of memory
    assert cache.get(second) is not None  # memory
    assert cache.get(first) is not None  # disk
    assert cache.get(digest_of(b"absent")) is None
    stored(cache, chunk_bytes(3))  # evicts the least recently used: second
    assert second not in cache
    assert sample("lazypull_chunk_cache_hits_total", tier="memory") == before["memory"] + 1
    assert sample("lazypull_chunk_cache_hits_total", tier="disk") == before["disk"] + 1
    assert sample("lazypull_chunk_cache_misses_total") == before["misses"] + 1
    assert sample("lazypull_chunk_cache_evictions_total") == before["evictions"] + 1
    assert sample("lazypull_chunk_cache_bytes") == before["bytes"] + cache.size_bytes


def test_on_disk_notices_files_removed_behind_its_back(tmp_path):
    cache = ChunkCache(str(tmp_path / "c"), max_bytes=1 << 20)
    data = b"chunk bytes" * 100
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cache.put(digest, data)
    assert cache.on_disk(digest) and digest in cache
    os.unlink(cache.path_of(digest))
    assert digest in cache  # the index alone still believes it
    assert not cache.on_disk(digest)
    assert digest not in cache and cache.size_bytes == 0
