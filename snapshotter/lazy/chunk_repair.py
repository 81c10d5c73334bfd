"""What a crash, a disk cleaner or an older cache left in a chunk cache's root,
repaired when the cache opens (before anything else uses the index):

- temp files of writes that a crash interrupted are removed;
- rows of file chunks whose files are gone (removed while the cache was down) are
  dropped;
- chunk files without a row (a crash between the rename and the commit, or a cache
  from before the index packed small chunks) are adopted: small ones are verified
  and packed, large ones get a row, with their mtime as the LRU clock, and are
  verified when read;
- anything else under sha256/ is removed.

Only the rows of file chunks and the files are visited, never the packed rows, in
batches: neither time nor memory depends on the number of packed chunks.
"""

import contextlib
import hashlib
import logging
import os
import sqlite3
from collections.abc import Iterator

from .chunk_index import HEX, PACK_LIMIT, one

log = logging.getLogger(__name__)

BATCH = 1000  # rows or files checked per transaction


def chunk_path(chunk_dir: str, hex_digest: str) -> str:
    return os.path.join(chunk_dir, hex_digest[:2], hex_digest)


def repair(db: sqlite3.Connection, chunk_dir: str, temp_dir: str) -> None:
    for leftover in os.scandir(temp_dir):
        remove_quietly(leftover.path)
    _drop_rows_without_files(db, chunk_dir)
    _adopt_files_without_rows(db, chunk_dir)


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def remove_quietly(path: str) -> None:
    """Remove a file or a directory tree that is not ours to keep."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            for item in os.scandir(path):
                remove_quietly(item.path)
            os.rmdir(path)
        else:
            os.unlink(path)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _drop_rows_without_files(db: sqlite3.Connection, chunk_dir: str) -> None:
    after = b""
    while True:
        keys = [key for (key,) in db.execute(
            "SELECT digest FROM chunks WHERE data IS NULL AND digest > ? "
            "ORDER BY digest LIMIT ?", (after, BATCH))]
        if not keys:
            return
        after = keys[-1]
        gone = [key for key in keys if not os.path.exists(chunk_path(chunk_dir, key.hex()))]
        if gone:
            log.info("chunk cache: %d chunk files are gone; forgetting them", len(gone))
            with _transaction(db):
                for key in gone:
                    db.execute("DELETE FROM chunks WHERE digest = ?", (key,))
                    db.execute("UPDATE shield SET size = NULL WHERE digest = ?", (key,))


def _adopt_files_without_rows(db: sqlite3.Connection, chunk_dir: str) -> None:
    batch: list[os.DirEntry[str]] = []
    for prefix in os.scandir(chunk_dir):
        if not prefix.is_dir(follow_symlinks=False):
            remove_quietly(prefix.path)
            continue
        for item in os.scandir(prefix.path):
            if not (HEX.fullmatch(item.name) and item.name[:2] == prefix.name
                    and item.is_file(follow_symlinks=False)):
                log.info("chunk cache: removing stray %s", item.path)
                remove_quietly(item.path)
                continue
            batch.append(item)
            if len(batch) >= BATCH:
                _adopt(db, batch)
                batch = []
    _adopt(db, batch)


def _adopt(db: sqlite3.Connection, items: list[os.DirEntry[str]]) -> None:
    redundant: list[str] = []  # files whose chunks are packed (once committed)
    with _transaction(db):
        for item in items:
            key = bytes.fromhex(item.name)
            row = one(db, "SELECT data IS NULL FROM chunks WHERE digest = ?", (key,))
            if row is not None:
                if not row[0]:
                    redundant.append(item.path)
                continue
            stat = item.stat(follow_symlinks=False)
            data = None
            if stat.st_size <= PACK_LIMIT:
                with open(item.path, "rb") as file:
                    data = file.read()
                redundant.append(item.path)
                if hashlib.sha256(data).hexdigest() != item.name:
                    log.warning("chunk cache: %s failed its hash; deleted", item.path)
                    continue
            db.execute("INSERT INTO chunks (digest, size, used, data) VALUES (?, ?, ?, ?)",
                       (key, stat.st_size, stat.st_mtime_ns // 1000, data))
            db.execute("UPDATE shield SET size = ? WHERE digest = ?", (stat.st_size, key))
    for path in redundant:
        unlink_quietly(path)
