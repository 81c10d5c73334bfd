"""`lazypull check` of the chunk cache (ROOT/cache): every chunk must hash to its digest.

Packed chunks are read from chunks.db, file chunks from sha256/; each is hashed. What
is reported:
- `chunk-corrupt`: a packed row or a chunk file whose bytes do not match its digest
  (a torn write, a disk fault, a hand). Repair drops the row and the file. The cache
  hashes what it reads from disk, but for the files its running manager wrote and
  finds unchanged (sealed, see chunk_cache); this also finds a disk fault in those;
- `chunk-file-missing`: a row that names a file no longer there. Repair drops the row
  (the cache does the same when it opens or reads it).
A chunk file without a row (a crash between its rename and the commit) is not a
problem if its bytes are right: the cache adopts it when it opens.

Repairs change chunks.db, which the FUSE manager writes: they are done only while no
manager holds the root (its lock file); otherwise they are left for later, and said so.
"""

import contextlib
import fcntl
import hashlib
import os
import sqlite3

from .check_types import Finding
from .lazy.chunk_index import HEX

BATCH = 256  # packed rows read at a time


def check_chunk_cache(cache_dir: str) -> list[Finding]:
    index = os.path.join(cache_dir, "chunks.db")
    files = os.path.join(cache_dir, "sha256")
    found: list[Finding] = []
    rows: set[str] = set()
    if os.path.exists(index):
        try:
            db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            return [Finding("chunk-index-unreadable", index, str(exc), False)]
        try:
            found += _check_rows(db, index, files, rows)
        except sqlite3.Error as exc:
            found.append(Finding("chunk-index-unreadable", index, str(exc), False))
        finally:
            db.close()
    for path in _chunk_files(files):
        name = os.path.basename(path)
        if name in rows:
            continue  # hashed with its row, or redundant beside a packed one
        if _file_digest(path) != name:
            found.append(Finding("chunk-corrupt", path, "a chunk file without a row that "
                                 f"does not hash to sha256:{name}", True))
    return found


def manager_holds(root: str) -> bool:
    """Whether a FUSE manager runs on `root` (it holds the lock file while it runs)."""
    try:
        fd = os.open(os.path.join(root, "fuse-manager.lock"), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if it was taken
    return False


def repair_chunk(finding: Finding, cache_dir: str) -> None:
    """Drop the chunk a finding names: its row (if any) and its file (if any)."""
    name = os.path.basename(finding.path)
    hex_digest = name if HEX.fullmatch(name) else finding.path.rpartition("sha256:")[2]
    with contextlib.suppress(FileNotFoundError):
        if os.path.isfile(finding.path):
            os.unlink(finding.path)
    index = os.path.join(cache_dir, "chunks.db")
    if not os.path.exists(index) or not HEX.fullmatch(hex_digest):
        return
    db = sqlite3.connect(index, isolation_level=None, timeout=60)
    try:
        key = bytes.fromhex(hex_digest)
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM chunks WHERE digest = ?", (key,))
        db.execute("UPDATE shield SET size = NULL WHERE digest = ?", (key,))
        db.execute("COMMIT")
    finally:
        db.close()


def _check_rows(db: sqlite3.Connection, index: str, files: str, rows: set[str]
                ) -> list[Finding]:
    found: list[Finding] = []
    after = b""
    while True:
        batch = db.execute("SELECT digest, data FROM chunks WHERE digest > ? "
                           "ORDER BY digest LIMIT ?", (after, BATCH)).fetchall()
        if not batch:
            return found
        after = batch[-1][0]
        for key, data in batch:
            hex_digest = key.hex()
            rows.add(hex_digest)  # a file beside a packed row is removed when the cache opens
            if data is not None:
                if hashlib.sha256(data).hexdigest() != hex_digest:
                    found.append(Finding("chunk-corrupt", f"{index}#sha256:{hex_digest}",
                                         f"a packed chunk of {len(data)} bytes that does "
                                         "not hash to its digest", True))
                continue
            path = os.path.join(files, hex_digest[:2], hex_digest)
            actual = _file_digest(path)
            if actual is None:
                found.append(Finding("chunk-file-missing", path,
                                     "its row in chunks.db names a file that is gone", True))
            elif actual != hex_digest:
                found.append(Finding("chunk-corrupt", path, "a chunk file that does not "
                                     f"hash to sha256:{hex_digest}", True))


def _chunk_files(files: str) -> list[str]:
    if not os.path.isdir(files):
        return []
    return sorted(os.path.join(prefix.path, item.name)
                  for prefix in os.scandir(files) if prefix.is_dir(follow_symlinks=False)
                  for item in os.scandir(prefix.path) if item.is_file(follow_symlinks=False))


def _file_digest(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()
