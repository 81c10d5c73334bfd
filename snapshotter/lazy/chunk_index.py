"""The chunk cache's index: one SQLite database, ROOT/chunks.db.

Tables:

- `chunks`: a row per stored chunk, keyed by the 32 bytes of its sha256: its size, its
  LRU clock (`used`, microseconds; larger is more recent) and, for a packed chunk, its
  bytes (`data`); a chunk too large to pack is a file and has `data` NULL.
- `owners` and `holds`: who protects which digests, and since when (`rank`, larger is
  more recent). A digest may be held before it is stored.
- `shield`: a row per held digest: its latest rank over all owners, and its size while
  it is stored. What eviction must skip is computed from this table alone.

WAL with synchronous=NORMAL: a transaction is durable once the WAL reaches the disk,
a crash at any moment leaves the last committed state, and readers never wait for the
writer. Each connection keeps at most PAGE_CACHE_KIB of pages in memory: the kernel's
page cache holds the file as well, and with 2 MiB each SQLite held 6 to 8 MB of the FUSE
manager with the python workspace image (these connections and the layer indexes).
"""

import contextlib
import logging
import os
import re
import sqlite3

log = logging.getLogger(__name__)

INDEX_FORMAT = 1  # bumped whenever the tables change: an index of another format is rebuilt
PACK_LIMIT = 64 << 10  # chunks up to this size are stored in the index, larger ones as files
HEX = re.compile(r"[0-9a-f]{64}")  # a digest's hex, as the files under sha256/ are named
PAGE_CACHE_KIB = 512
WAL_LIMIT = 64 << 20

_SCHEMA = """
CREATE TABLE chunks (
    digest BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    used INTEGER NOT NULL,
    data BLOB
);
CREATE INDEX chunks_by_use ON chunks (used, size);
CREATE INDEX chunk_files ON chunks (digest) WHERE data IS NULL;
CREATE TABLE owners (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    last_rank INTEGER NOT NULL
);
CREATE TABLE holds (
    digest BLOB NOT NULL,
    owner INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    PRIMARY KEY (digest, owner)
) WITHOUT ROWID;
CREATE INDEX holds_by_owner ON holds (owner);
CREATE TABLE shield (
    digest BLOB PRIMARY KEY,
    rank INTEGER NOT NULL,
    size INTEGER
) WITHOUT ROWID;
CREATE INDEX shield_stored ON shield (rank, digest, size) WHERE size IS NOT NULL;
"""


class IndexUnusable(sqlite3.DatabaseError):
    """The file is not an index this code can use (another format, not a database)."""


def connect(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode; the callers serialize their use of it."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=60)
    db.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
    db.execute("PRAGMA synchronous = NORMAL")
    # A large transaction (protecting a million chunks) grows the WAL; once it is
    # checkpointed, the file shrinks back to this.
    db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
    return db


def open_index(path: str) -> sqlite3.Connection:
    """The index at `path`, created if missing. One that cannot be read (torn by a
    disk fault, of another format) is replaced by an empty one: a cache may forget."""
    try:
        return _open(path)
    except sqlite3.OperationalError:
        raise  # locked, read-only, I/O errors: not the file's fault
    except sqlite3.DatabaseError as exc:
        log.warning("chunk cache: index %s cannot be used (%s); starting an empty one",
                    path, exc)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)
    return _open(path)


def one(db: sqlite3.Connection, sql: str, args: tuple = ()) -> tuple | None:
    """The first row of a query, or None. The statement runs to its end, so no read
    transaction stays open behind a half-read cursor."""
    rows = db.execute(sql, args).fetchall()
    return rows[0] if rows else None


def _open(path: str) -> sqlite3.Connection:
    db = connect(path)
    try:
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise IndexUnusable(f"journal mode {mode!r}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            db.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {INDEX_FORMAT}; COMMIT;")
        elif version != INDEX_FORMAT:
            raise IndexUnusable(f"index format {version}, not {INDEX_FORMAT}")
    except BaseException:
        db.close()
        raise
    return db
