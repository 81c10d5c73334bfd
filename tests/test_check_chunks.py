"""`lazypull check` hashes every chunk of the cache: a packed row or a chunk file whose
bytes do not match its digest is reported, and dropped by --repair (only while no FUSE
manager runs); the cache opens afterwards with the good chunks only."""

import hashlib
import os
import sqlite3
from pathlib import Path

from snapshotter.check import check
from snapshotter.check_chunks import manager_holds
from snapshotter.lazy.chunk_cache import ChunkCache


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_corrupt_chunks_are_reported_and_repaired(tmp_path: Path) -> None:
    root = tmp_path / "root"
    cache_dir = root / "cache"
    small, large, fine = os.urandom(3000), os.urandom(200 << 10), os.urandom(4000)
    with ChunkCache(str(cache_dir), 1 << 30) as cache:
        for data in (small, large, fine):
            cache.put(digest_of(data), data)
        large_path = Path(cache.path_of(digest_of(large)))
    assert check(str(root)) == []
    db = sqlite3.connect(cache_dir / "chunks.db")
    db.execute("UPDATE chunks SET data = ? WHERE digest = ?",
               (b"x" * 3000, bytes.fromhex(digest_of(small)[7:])))
    db.commit()
    db.close()
    large_path.write_bytes(b"y" * len(large))
    stray = os.urandom(100 << 10)  # a crash between rename and commit, then a bad disk
    stray_path = cache_dir / "sha256" / digest_of(stray)[7:9] / digest_of(stray)[7:]
    stray_path.parent.mkdir(exist_ok=True)
    stray_path.write_bytes(stray[:-1] + b"z")

    found = check(str(root))
    assert sorted((f.problem, f.repairable, f.repaired) for f in found) == \
        [("chunk-corrupt", True, False)] * 3
    assert {os.path.basename(f.path).rpartition("sha256:")[2] for f in found} == \
        {digest_of(d)[7:] for d in (small, large, stray)}

    repaired = check(str(root), repair=True)
    assert all(f.repaired for f in repaired) and len(repaired) == 3
    assert check(str(root)) == []
    assert not large_path.exists() and not stray_path.exists()
    with ChunkCache(str(cache_dir), 1 << 30) as cache:
        assert cache.get(digest_of(fine)) == fine
        assert cache.get(digest_of(small)) is None and cache.get(digest_of(large)) is None
        assert len(cache) == 1


def test_a_missing_chunk_file_is_reported_and_its_row_dropped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    large = os.urandom(100 << 10)
    with ChunkCache(str(root / "cache"), 1 << 30) as cache:
        cache.put(digest_of(large), large)
        os.unlink(cache.path_of(digest_of(large)))
    (found,) = check(str(root))
    assert (found.problem, found.repairable) == ("chunk-file-missing", True)
    check(str(root), repair=True)
    assert check(str(root)) == []


def test_chunk_repairs_wait_for_the_fuse_manager_to_stop(tmp_path: Path) -> None:
    import fcntl

    root = tmp_path / "root"
    data = os.urandom(2000)
    with ChunkCache(str(root / "cache"), 1 << 30) as cache:
        cache.put(digest_of(data), data)
    db = sqlite3.connect(root / "cache" / "chunks.db")
    db.execute("UPDATE chunks SET data = ?", (b"bad",))
    db.commit()
    db.close()
    lock = os.open(root / "fuse-manager.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a running manager holds it
    try:
        assert manager_holds(str(root))
        (found,) = check(str(root), repair=True)
        assert not found.repaired and "a FUSE manager runs" in found.detail
    finally:
        os.close(lock)
    assert not manager_holds(str(root))
    (found,) = check(str(root), repair=True)
    assert found.repaired
    assert check(str(root)) == []
