"""A content-addressed cache of verified chunks on local disk, shared by all layers.

The key is a chunk's sha256 digest from the TOC, so a chunk that several layers or
images hold is stored once.

Where chunks live. An SQLite index, ROOT/chunks.db (see chunk_index), has a row per
chunk: its size, its LRU clock and, for a chunk of at most PACK_LIMIT bytes, the bytes
themselves ("packed"). Larger chunks are files, ROOT/sha256/<2 hex>/<64 hex>, with a
row that says so.

Why SQLite now. The directory used to be the index: a file per chunk, mtimes as the
LRU order, the index rebuilt in memory by a stat of every chunk at start. A layer of
a million tiny files has a million tiny chunks, and that cost a 4 KiB block and an
inode per chunk and about 310 bytes of Python objects per chunk (perf chunk-cache, a
million chunks: 4.1 GB of disk, 367 MB of RSS, 15 s to start). Packed in a B-tree they
cost their bytes and about 125 bytes of index each, memory does not grow with their
number (each connection keeps at most 2 MiB of pages; nothing is listed in memory),
a start reads an index rather than a file per chunk (0.1 s for a million), and a
transaction changes rows, LRU order and protection together, so a crash cannot
leave them disagreeing. The layer index (estargz.layer)
made the same choice for the same reason.

Verification. Bytes are hashed on the way in (a mismatch is refused) and again on
reads from disk: a row or file that no longer matches its digest is deleted, counted
and reads as a miss, so the cache never returns bytes that were not verified. A chunk
file is written once and never changed, and this process seals the files it places:
their modification time set to SEALED_MTIME_NS, their identity (inode, size, change
time) noted in memory. A read that finds both at open skips the hash (a 4 MiB chunk
costs 15 ms of sha256 on the 2-core test machine; a warm node's first start read
every chunk it needed from disk that way). Any write or truncation sets the
modification time to the present, and any change at all moves the change time, so
such a file is hashed again and refused if it no longer matches. Files found at a
start, packed chunks (at most PACK_LIMIT bytes) and files past SEALS_LIMIT are hashed
on every read from disk, as before. A sealed file may also be read in part
(`read_sealed`: the seal checked after the read, as for a whole one), so a FUSE read
of 128 KiB from a 4 MiB chunk reads 128 KiB, and the chunk need not be kept in memory
for the reads that follow.

Crashes. Rows change in transactions (WAL, synchronous=NORMAL: no fsync per chunk; a
power loss may lose the last transactions, never tear one). A file is written to
ROOT/tmp and renamed into place before the transaction that adds its row commits; an
evicted file is unlinked after the transaction that removes its row. So a crash
leaves at worst a temp file (removed at the next start), a file without its row
(adopted at the next start) or, if files were removed behind the cache's back, a row
without its file (dropped at the next start, or when a read or `on_disk` finds it
gone). The start (chunk_repair) visits the rows of file chunks and the files, never the
packed rows.

A full disk. A store that fails stores nothing (its temp files, and files renamed
into place for a transaction that rolled back, are removed), is counted in
lazypull_chunk_cache_write_failures_total and raises OSError: the fetcher hands the
verified chunks out uncached. First, though, least recently used chunks worth twice
the store are evicted and the store tried once more, so a disk smaller than
`max_bytes` keeps the newest chunks. That eviction unlinks its files before its commit
(which needs room in the WAL), then checkpoints the WAL.

LRU. Each chunk's `used` clock orders eviction. A hit does not write: it notes the
chunk in a bounded buffer of touches (TOUCH_BUFFER; beyond it, touches are dropped and
only the LRU order's precision suffers), which the next write, or a reader finding
the writer idle, writes out in one statement; eviction always writes them out first.

Memory tier. Recently used chunks' bytes are also kept in memory (memory_tier: a
probation segment for chunks just stored, a main one for chunks read; per-entry
overhead counted). Chunks stored ahead of any reader (prefetch, background fetch:
`put_many(..., keep_in_memory=False)`) stay out of it until a read takes them from
disk: they would fill it with bytes the disk and the kernel's page cache hold
already, and which no reader may ask for. Nor do chunks stored as files, whoever
fetched them: a file written here is sealed, and `read_sealed` serves ranges of it
from the page cache without hashing. It holds only chunks that are on disk:
forgetting a chunk drops it from memory as well. `get_from_memory` never touches the
disk or the index, so an event loop may call it directly.

Protection. `protect(digests, owner)` keeps chunks (e.g. an image's warm set) from
eviction, up to `protected_share` of `max_bytes`; beyond that the chunks protected
longest ago are evictable again, so protection can never fill the cache. Who
protects what is kept in the index (it survives restarts until released), and the
set of shielded chunks is never listed: chunk_shield keeps its boundary.

Threads. One writer connection, under a write lock, makes every change to the index
and to the files (renames, unlinks); reads use a small pool of reader connections and
never wait for the writer. One process owns a root at a time.
"""

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from estargz import DigestMismatch

from ..crash_points import crash_point
from ..prometheus import Counter, Gauge
from .chunk_index import HEX, PACK_LIMIT, connect, one, open_index
from .chunk_repair import chunk_path, repair, unlink_quietly
from .chunk_shield import Shield, add_holds, drop_owner
from .memory_tier import MemoryTier
from .metrics import REGISTRY

log = logging.getLogger(__name__)

_PREFIX = "sha256:"
TOUCH_BUFFER = 16384  # LRU touches kept in memory until a write
TOUCH_FLUSH = 1024  # a reader writes the touches out from this many, if the writer is idle
EVICT_BATCH = 1024  # chunks evicted per transaction
READERS = 4  # reader connections kept open
_LOOKUP_BATCH = 64  # digests per membership query (a fixed count: one prepared statement)
_LOOKUP_LIST = "(" + ", ".join("?" * _LOOKUP_BATCH) + ")"
# Both answered from an index alone: reading the rows, data inline, costs several times more.
_STORED_SQL = "SELECT digest FROM chunks WHERE digest IN " + _LOOKUP_LIST
_FILES_SQL = ("SELECT digest FROM chunks INDEXED BY chunk_files "
              "WHERE data IS NULL AND digest IN " + _LOOKUP_LIST)

CACHE_HITS = Counter("lazypull_chunk_cache_hits_total", "Chunk cache hits, by tier",
                     ["tier"], registry=REGISTRY)
CACHE_MISSES = Counter("lazypull_chunk_cache_misses_total", "Chunk cache misses",
                       registry=REGISTRY)
CACHE_EVICTIONS = Counter("lazypull_chunk_cache_evictions_total",
                          "Chunks evicted from disk to stay under the size limit",
                          registry=REGISTRY)
CACHE_CORRUPT = Counter("lazypull_chunk_cache_corrupt_chunks_total",
                        "Chunks (packed or files) that no longer matched their digest and "
                        "were deleted",
                        registry=REGISTRY)
CACHE_WRITE_FAILURES = Counter("lazypull_chunk_cache_write_failures_total",
                               "Stores of chunks that failed (reason: disk-full or error); "
                               "their chunks were handed out without being cached",
                               ["reason"], registry=REGISTRY)
CACHE_BYTES = Gauge("lazypull_chunk_cache_bytes", "Bytes of chunks stored on disk",
                    registry=REGISTRY)
_MEMORY_HITS, _DISK_HITS = CACHE_HITS.labels("memory"), CACHE_HITS.labels("disk")


@dataclass
class CacheStats:
    """What this cache did since it was opened (the prometheus metrics sum all caches)."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    evictions: int = 0
    corrupt: int = 0
    hashed_reads: int = 0  # disk hits served after hashing the chunk (not sealed)
    sealed_range_reads: int = 0  # parts of sealed files read (read_sealed)


@dataclass
class _Changes:
    """What a write transaction did; counted once it commits."""

    bytes: int = 0
    count: int = 0
    evictions: int = 0
    corrupt: int = 0
    unlinks: list[str] = field(default_factory=list)  # files of forgotten chunks
    admit: dict[str, bytes] = field(default_factory=dict)  # stored, for the memory tier


def _hex_of(digest: str) -> str:
    if not isinstance(digest, str) or not digest.startswith(_PREFIX) \
            or not HEX.fullmatch(digest[len(_PREFIX):]):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest[len(_PREFIX):]


def _key_of(digest: object) -> bytes | None:
    """The index key of a digest, None for anything that could never be one."""
    try:
        return bytes.fromhex(_hex_of(digest))  # type: ignore[arg-type]
    except ValueError:
        return None


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


# The modification time of a sealed chunk file: one second after the epoch, which no
# write gives a file (a write sets the present time).
SEALED_MTIME_NS = 1_000_000_000
# Sealed files noted at most (about 150 bytes each); beyond, the oldest are forgotten
# and hashed again at each read.
SEALS_LIMIT = 1 << 15
Seal = tuple[int, int, int]


def _seal_of(stat: os.stat_result) -> Seal | None:
    if stat.st_mtime_ns != SEALED_MTIME_NS:
        return None
    return (stat.st_ino, stat.st_size, stat.st_ctime_ns)


class ChunkCache:
    def __init__(self, root: str, max_bytes: int, memory_bytes: int = 64 << 20,
                 memory_item_limit: int = 1 << 20, protected_share: float = 0.5):
        if max_bytes < 0 or memory_bytes < 0 or memory_item_limit < 0:
            raise ValueError("cache sizes must not be negative")
        if not 0.0 <= protected_share <= 1.0:
            raise ValueError("protected_share must be between 0 and 1")
        self.root = root
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self.memory_item_limit = memory_item_limit
        self.protected_share = protected_share
        self.temp_dir = os.path.join(root, "tmp")
        self._chunk_dir = os.path.join(root, "sha256")
        self._index_path = os.path.join(root, "chunks.db")
        self.stats = CacheStats()
        self._seals: dict[bytes, Seal] = {}  # chunk key -> the seal this process gave it
        self._lock = threading.Lock()  # the memory tier, touches, counters, reader pool
        self._write_lock = threading.Lock()  # the writer connection, renames and unlinks
        self._memory = MemoryTier(memory_bytes, memory_item_limit)
        self._touches: dict[str, int] = {}  # digest -> LRU clock not yet written
        self._clock = 0
        self._readers: list[sqlite3.Connection] = []
        self._shield = Shield(protected_share * max_bytes)
        self._rank = 0  # the latest protection's rank
        self._bytes = 0
        self._count = 0
        self._closed = False
        self._db = self._open_index()
        self._load()

    def close(self) -> None:
        """Write out the pending LRU touches and close the index."""
        with self._write_lock:
            if self._closed:
                return
            try:
                with self._transaction():
                    self._write_touches()
            finally:
                with self._lock:
                    self._closed = True
                    readers, self._readers = self._readers, []
                    CACHE_BYTES.dec(self._bytes)
                for db in (self._db, *readers):
                    db.close()

    def __enter__(self) -> "ChunkCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ---------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes of chunks on disk."""
        with self._lock:
            return self._bytes

    @property
    def memory_size_bytes(self) -> int:
        """Bytes the memory tier holds, its per-entry overhead included."""
        with self._lock:
            return self._memory.used_bytes

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def __contains__(self, digest: object) -> bool:
        key = _key_of(digest)
        if key is None:
            return False
        with self._lock:
            if digest in self._memory:
                return True
        with self._reading() as db:
            return one(db, "SELECT 1 FROM chunks WHERE digest = ?", (key,)) is not None

    def stored_among(self, digests: Iterable[str], check_files: bool = False) -> set[str]:
        """Which of these digests are stored. One read of the index for all of them:
        asked one at a time, each question costs a transaction of its own, several
        times the lookup. With `check_files`, a file chunk counts only if its file is
        really there, as in `on_disk`."""
        found: set[str] = set()
        wanted: dict[bytes, str] = {}
        for digest in digests:
            key = _key_of(digest)
            if key is not None:
                wanted[key] = digest
        if not check_files:
            with self._lock:
                for key, digest in list(wanted.items()):
                    if digest in self._memory:
                        found.add(digest)
                        del wanted[key]
        if not wanted:
            return found
        keys = list(wanted)
        gone: list[bytes] = []
        with self._reading() as db:
            db.execute("BEGIN")
            try:
                for start in range(0, len(keys), _LOOKUP_BATCH):
                    batch = keys[start:start + _LOOKUP_BATCH]
                    batch += [batch[0]] * (_LOOKUP_BATCH - len(batch))  # one statement for all
                    stored = {key for (key,) in db.execute(_STORED_SQL, batch)}
                    if check_files:
                        for (key,) in db.execute(_FILES_SQL, batch):
                            if not os.path.exists(self.path_of(wanted[key])):
                                stored.discard(key)
                                gone.append(key)
                    found.update(wanted[key] for key in stored)
            finally:
                db.execute("COMMIT")
        for key in gone:
            self._forget_missing_file(key, self.path_of(wanted[key]))
        return found

    def on_disk(self, digest: str) -> bool:
        """Whether the chunk is really there. A file chunk's row alone goes stale when
        files are removed behind the cache's back (disk cleaners, an operator); a row
        whose file is found gone is forgotten."""
        key = _key_of(digest)
        if key is None:
            return False
        with self._reading() as db:
            row = one(db, "SELECT data IS NULL FROM chunks WHERE digest = ?", (key,))
        if row is None:
            return False
        path = self.path_of(digest)
        if not row[0] or os.path.exists(path):
            return True
        self._forget_missing_file(key, path)
        return False

    def path_of(self, digest: str) -> str:
        """Where the chunk's file is (or would be, for a chunk too large to pack)."""
        return chunk_path(self._chunk_dir, _hex_of(digest))

    def owners(self) -> list[str]:
        """The owners that protect chunks now."""
        with self._reading() as db:
            return [name for (name,) in db.execute("SELECT name FROM owners ORDER BY id")]

    # -- reading ---------------------------------------------------------------------

    def get_from_memory(self, digest: str) -> bytes | None:
        """The chunk if the memory tier holds it; never touches the disk (so an event
        loop may call it directly). A None here is not counted as a miss."""
        with self._lock:
            data = self._memory.get(digest)
            if data is None:
                return None
            self._touch(digest)
            self.stats.memory_hits += 1
        _MEMORY_HITS.inc()
        return data

    def get(self, digest: str) -> bytes | None:
        """The verified chunk, or None. A chunk that fails its hash is deleted."""
        hex_digest = _hex_of(digest)
        data = self.get_from_memory(digest)
        if data is not None:
            return data
        key = bytes.fromhex(hex_digest)
        with self._lock:
            mark = self._memory.mark()
        try:
            with self._reading() as db:
                row = one(db, "SELECT data IS NULL, data FROM chunks WHERE digest = ?", (key,))
        except sqlite3.DatabaseError as exc:  # a damaged index: fetched again, not served
            log.warning("chunk cache: cannot read the index: %s", exc)
            return self._miss()
        if row is None:
            return self._miss()
        is_file, data = row
        identity = seal = None
        if is_file:
            path = self.path_of(digest)
            try:
                with open(path, "rb") as file:
                    data = file.read()
                    # after the read: a write that began before it shows in the times
                    stat = os.fstat(file.fileno())
                identity, seal = _identity(stat), _seal_of(stat)
            except FileNotFoundError:  # evicted since the lookup, or removed behind our back
                self._forget_missing_file(key, path)
                return self._miss()
        with self._lock:
            sealed = seal is not None and self._seals.get(key) == seal
        if not sealed and hashlib.sha256(data).hexdigest() != hex_digest:
            self._drop_corrupt(key, data, identity)
            return self._miss()
        with self._lock:
            self.stats.hashed_reads += not sealed
            self._memory.admit_read(digest, data, since=mark)
        self._count_disk_hit(digest)
        self.write_touches_if_due()
        return data

    def read_sealed(self, digest: str, start: int, stop: int) -> bytes | None:
        """Bytes start..stop of a chunk, if the memory tier holds it or it is a file
        this process sealed and the seal still holds after the read; None otherwise
        (then `get` reads, and if need be hashes, the whole chunk). Nothing enters the
        memory tier: the kernel's page cache keeps the file's pages. Made to be called
        on an event loop, it leaves the recent uses it gathers to be written out by
        `write_touches_if_due` (a transaction), which its caller runs elsewhere."""
        if not 0 <= start <= stop:
            raise ValueError(f"bad range {start}..{stop}")
        data = self.get_from_memory(digest)
        if data is not None:
            return data[start:stop]
        key = bytes.fromhex(_hex_of(digest))
        with self._lock:
            noted = self._seals.get(key)
        if noted is None:
            return None
        try:
            with open(self.path_of(digest), "rb") as file:
                # A reader asks 128 KiB at a time and each read opens the file anew, so
                # the kernel sees no sequence to read ahead on: ask for the whole chunk.
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
                part = os.pread(file.fileno(), stop - start, start)
                stat = os.fstat(file.fileno())  # after the read, as in `get`
        except OSError:
            return None  # evicted meanwhile, or unreadable: `get` finds out and counts it
        if _seal_of(stat) != noted or stop > stat.st_size:
            return None
        with self._lock:
            self.stats.sealed_range_reads += 1
        self._count_disk_hit(digest)
        return part

    def read_packed(self, digest: str, start: int, stop: int) -> bytes | None:
        """Bytes start..stop of a packed chunk, read from the index and hashed here: a
        point query and the hash of at most PACK_LIMIT bytes cost less than a worker
        thread's hand-off, and a workload's small files are packed chunks. None when
        the chunk is not packed here or does not match its digest (then `get` reads it
        again, and drops and counts it: nothing is written here, so an event loop may
        call this). The chunk enters the memory tier as it does through `get`."""
        if not 0 <= start <= stop:
            raise ValueError(f"bad range {start}..{stop}")
        hex_digest = _hex_of(digest)
        key = bytes.fromhex(hex_digest)
        with self._lock:
            mark = self._memory.mark()
        try:
            with self._reading() as db:
                row = one(db, "SELECT data FROM chunks WHERE digest = ? AND data IS NOT NULL",
                          (key,))
        except (sqlite3.DatabaseError, ValueError):
            return None  # `get` says why
        if row is None or hashlib.sha256(row[0]).hexdigest() != hex_digest:
            return None
        data = bytes(row[0])
        with self._lock:
            self.stats.hashed_reads += 1
            self._memory.admit_read(digest, data, since=mark)
        self._count_disk_hit(digest)
        return data[start:stop]

    @property
    def touches_due(self) -> bool:
        """Enough recent uses have gathered to be written out."""
        return len(self._touches) >= TOUCH_FLUSH

    def write_touches_if_due(self) -> None:
        """Write the recent uses out if enough have gathered and no writer is busy."""
        if self.touches_due:
            self._write_touches_if_idle()

    def _count_disk_hit(self, digest: str) -> None:
        """Note a chunk served from disk: its use for the LRU and the hit counters."""
        with self._lock:
            self._touch(digest)
            self.stats.disk_hits += 1
        _DISK_HITS.inc()

    # -- writing ---------------------------------------------------------------------

    def put(self, digest: str, data: bytes) -> None:
        """Store a chunk after checking that it hashes to `digest` (DigestMismatch if
        not). A failure of the disk or the index raises OSError."""
        self.put_many([(digest, data)])

    def put_many(self, chunks: Iterable[tuple[str, bytes]], keep_in_memory: bool = True,
                 hashed: bool = False) -> None:
        """Store (digest, bytes) pairs in one transaction: one commit for all rather
        than one each. Every chunk is hashed first; a mismatch refuses them all
        (DigestMismatch) before anything is stored. `hashed`: the caller has just
        checked each against its digest (estargz.decode_chunk does), so it is not
        hashed twice. A failure of the disk or the index raises OSError.
        `keep_in_memory`: packed chunks also into the memory tier (for a reader's
        chunks; chunks fetched ahead of readers stay on disk only). Larger chunks
        never enter it here: they are sealed files."""
        incoming: dict[str, tuple[bytes, bytes]] = {}  # digest -> (key, data)
        for digest, data in chunks:
            hex_digest = _hex_of(digest)
            if not hashed:
                actual = hashlib.sha256(data).hexdigest()
                if actual != hex_digest:
                    raise DigestMismatch(f"chunk hashes to sha256:{actual}, not {digest}")
            incoming[digest] = (bytes.fromhex(hex_digest), data)
        with self._lock:
            for digest in list(incoming):
                if digest in self._memory:  # the same chunk from another layer: stored once
                    self._touch(digest)
                    del incoming[digest]
        if not incoming:
            return
        try:
            self._store(incoming, keep_in_memory)
        except OSError as exc:
            if not _disk_full(exc) or not self._make_room(
                    sum(len(data) for _, data in incoming.values())):
                CACHE_WRITE_FAILURES.labels("disk-full" if _disk_full(exc) else "error").inc()
                raise
            try:  # once more, now that least recently used chunks made room
                self._store(incoming, keep_in_memory)
            except OSError as again:
                CACHE_WRITE_FAILURES.labels("disk-full" if _disk_full(again) else "error").inc()
                raise

    def _store(self, incoming: dict[str, tuple[bytes, bytes]], keep_in_memory: bool
               ) -> None:
        """Write chunks already verified: large ones as files, then every row in one
        transaction. OSError if the disk or the index fails; nothing is stored then."""
        temps: dict[str, str] = {}  # digest -> temp file, for chunks too large to pack
        placed: list[str] = []  # files renamed into place whose rows are not committed
        try:
            large = [d for d, (_, data) in incoming.items() if len(data) > PACK_LIMIT]
            for digest in self._absent_files(large):
                temps[digest] = self._write_temp(incoming[digest][0], incoming[digest][1])
            if temps:
                crash_point("chunk.written")
            with self._write_lock:
                with self._transaction() as changes:
                    for digest, (key, data) in incoming.items():
                        if len(data) <= PACK_LIMIT:
                            stored = self._insert(changes, key, len(data), data)
                            crash_point("chunk.packed")
                        else:
                            stored = self._place_file(changes, digest, key, data, temps,
                                                      placed)
                        if not stored:
                            self._touch_now(digest)
                        # A large chunk is a sealed file now: readers take their
                        # ranges from it (and the kernel's page cache) instead.
                        if keep_in_memory and len(data) <= PACK_LIMIT:
                            changes.admit[digest] = data
                    over = self._evict(changes)
                placed.clear()
                crash_point("chunk.committed")
                self._evict_rest(over)
        except (OSError, sqlite3.DatabaseError) as exc:
            # Files placed for rows that were rolled back go too, so that a full disk
            # is not filled further by chunks that no row counts.
            for path in placed:
                unlink_quietly(path)
            raise _cache_error(self.root, exc) from exc
        finally:
            for temp in temps.values():
                unlink_quietly(temp)

    def _make_room(self, nbytes: int) -> bool:
        """After the disk was found full: evict least recently used chunks (never
        shielded ones) worth twice `nbytes`, so that new chunks replace old ones rather
        than go uncached. True if any were evicted."""
        try:
            with self._write_lock, self._transaction() as changes:
                self._evict(changes, limit=max(0, self._bytes - 2 * nbytes))
                # The commit needs room in the WAL, which a full disk may not have: the
                # evicted files go first. A crash (or a failed commit) in between leaves
                # rows without files, which reads and the next start drop.
                for path in changes.unlinks:
                    unlink_quietly(path)
        except (OSError, sqlite3.DatabaseError) as exc:
            log.warning("chunk cache %s: the disk is full and evicting failed too: %s",
                        self.root, exc)
            return False
        with self._write_lock, contextlib.suppress(sqlite3.Error):
            # The WAL holds a second copy of recent pages until a checkpoint: on a
            # full disk, give that room back too.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        if changes.evictions:
            log.warning("chunk cache %s: the disk is full; evicted %d chunks (%d bytes) to "
                        "make room", self.root, changes.evictions, -changes.bytes)
        return changes.evictions > 0

    def _absent_files(self, digests: list[str]) -> list[str]:
        """The large chunks among these that need writing (no temp file for the rest)."""
        if not digests:
            return []
        present = self.stored_among(digests, check_files=True)
        return [digest for digest in digests if digest not in present]

    def _write_temp(self, key: bytes, data: bytes) -> str:
        temp = os.path.join(self.temp_dir, f"{key.hex()}.{secrets.token_hex(6)}")
        try:
            with open(temp, "xb") as file:
                file.write(data)
        except BaseException:
            unlink_quietly(temp)
            raise
        return temp

    def _place_file(self, changes: _Changes, digest: str, key: bytes, data: bytes,
                    temps: dict[str, str], placed: list[str]) -> bool:
        """Rename a large chunk's temp file into place and add its row; False if it is
        stored already."""
        path = self.path_of(digest)
        row = one(self._db, "SELECT data IS NULL FROM chunks WHERE digest = ?", (key,))
        if _present(row, path):
            return False
        if digest not in temps:  # its file went away since we looked: write it now
            temps[digest] = self._write_temp(key, data)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Sealed (its bytes were hashed on the way in), then renamed before the row
        # commits: a crash leaves a file without a row, which the next start adopts.
        os.utime(temps[digest], ns=(SEALED_MTIME_NS, SEALED_MTIME_NS))
        os.replace(temps[digest], path)
        del temps[digest]
        placed.append(path)
        crash_point("chunk.renamed")
        self._note_seal(key, os.stat(path))
        if row is None:
            self._insert(changes, key, len(data), None)
        return True

    # -- protection ------------------------------------------------------------------

    def protect(self, digests: Iterable[str], owner: str) -> None:
        """Keep these chunks from eviction until `owner` releases them (adds to what
        `owner` protects already). Chunks not stored yet are protected once stored.
        `digests` may be an iterator of any length: it is staged on disk, not in
        memory. A bad digest refuses the whole call (ValueError)."""
        staging = connect(self._index_path)
        try:
            staging.execute("CREATE TEMP TABLE staged (digest BLOB NOT NULL)")
            staging.execute("BEGIN")
            staging.executemany("INSERT INTO temp.staged VALUES (?)",
                                ((bytes.fromhex(_hex_of(d)),) for d in digests))
            # Sorted once, after the fact: the merges below then read it in order and
            # fill the index's B-trees in order (several times faster than unsorted).
            staging.execute("CREATE INDEX temp.staged_by_digest ON staged (digest)")
            staging.execute("COMMIT")
            with self._write_lock:
                self._rank += 1
                add_holds(staging, owner, self._rank)
                self._shield.recompute(self._db)
        finally:
            staging.close()

    def release(self, owner: str) -> None:
        with self._write_lock:
            with self._transaction() as changes:
                row = one(self._db, "SELECT id FROM owners WHERE name = ?", (owner,))
                if row is not None:
                    drop_owner(self._db, row[0])
                    self._shield.recompute(self._db)
                over = self._evict(changes)
            self._evict_rest(over)

    # -- the write path (the callers hold the write lock) ----------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[_Changes]:
        """A write transaction. What it changed is counted, and the files of the
        chunks it forgot are unlinked, once it commits; if it fails, the shield's
        state is put back as it was."""
        changes = _Changes()
        shield_before = self._shield.snapshot()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield changes
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._shield.restore(shield_before)
            raise
        for path in changes.unlinks:
            unlink_quietly(path)
        with self._lock:
            self._bytes += changes.bytes
            self._count += changes.count
            self.stats.evictions += changes.evictions
            self.stats.corrupt += changes.corrupt
            for digest, data in changes.admit.items():
                self._memory.admit_stored(digest, data)
        CACHE_BYTES.inc(changes.bytes)
        CACHE_EVICTIONS.inc(changes.evictions)
        CACHE_CORRUPT.inc(changes.corrupt)

    def _insert(self, changes: _Changes, key: bytes, size: int, data: bytes | None) -> bool:
        """Add a chunk's row (data None: a file); False if it is stored already."""
        with self._lock:
            used = self._tick()
        cursor = self._db.execute("""
            INSERT INTO chunks (digest, size, used, data) VALUES (?, ?, ?, ?)
            ON CONFLICT (digest) DO NOTHING""", (key, size, used, data))
        if cursor.rowcount != 1:
            return False
        changes.bytes += size
        changes.count += 1
        if self._shield.state.active:
            row = one(self._db, "UPDATE shield SET size = ? WHERE digest = ? RETURNING rank",
                      (size, key))
            if row is not None:
                self._shield.stored(self._db, row[0], key, size)
        return True

    def _forget(self, changes: _Changes, key: bytes, size: int, is_file: bool) -> None:
        """Remove a chunk's row (and, once committed, its file)."""
        self._db.execute("DELETE FROM chunks WHERE digest = ?", (key,))
        changes.bytes -= size
        changes.count -= 1
        if self._shield.state.active:
            row = one(self._db, "UPDATE shield SET size = NULL WHERE digest = ? RETURNING rank",
                      (key,))
            if row is not None:
                self._shield.removed(self._db, row[0], key, size)
        digest = _PREFIX + key.hex()
        if is_file:
            changes.unlinks.append(self.path_of(digest))
        changes.admit.pop(digest, None)  # stored and evicted at once
        with self._lock:
            self._memory.forget(digest)
            self._touches.pop(digest, None)

    def _evict(self, changes: _Changes, limit: int | None = None) -> bool:
        """Forget least recently used chunks that the shield does not cover until
        under `limit` (default `max_bytes`), at most EVICT_BATCH of them; True if more
        must go."""
        excess = self._bytes + changes.bytes - (self.max_bytes if limit is None else limit)
        if excess <= 0:
            return False
        self._write_touches()
        shield = self._shield
        evicted = 0
        while excess > 0 and evicted < EVICT_BATCH:
            floor = shield.state.floor
            if floor is None:
                evictable, floor_key = "s.rank IS NULL", ()
            else:
                evictable, floor_key = "(s.rank IS NULL OR (s.rank, s.digest) <= (?, ?))", \
                    floor.key
            rows = self._db.execute(f"""
                SELECT c.digest, c.size, c.used, c.rowid, c.data IS NULL, s.rank
                FROM chunks c LEFT JOIN shield s ON s.digest = c.digest
                WHERE (c.used, c.size, c.rowid) > (?, ?, ?) AND {evictable}
                ORDER BY c.used, c.size, c.rowid LIMIT 64""",
                                    (*shield.state.hand, *floor_key)).fetchall()
            if not rows:
                break  # the rest is shielded
            for key, size, used, rowid, is_file, rank in rows:
                if excess <= 0 or evicted >= EVICT_BATCH:
                    break
                if not shield.covers(rank, key):  # it may have joined the shield meanwhile
                    self._forget(changes, key, size, bool(is_file))
                    excess -= size
                    evicted += 1
                shield.state.hand = (used, size, rowid)
        changes.evictions += evicted
        return excess > 0 and evicted >= EVICT_BATCH

    def _evict_rest(self, over: bool) -> None:
        while over:
            with self._transaction() as changes:
                over = self._evict(changes)

    def _write_touches(self) -> None:
        with self._lock:
            if not self._touches:
                return
            touches, self._touches = self._touches, {}
        self._db.executemany("UPDATE chunks SET used = ? WHERE digest = ?",
                             ((used, bytes.fromhex(digest[len(_PREFIX):]))
                              for digest, used in touches.items()))

    def _write_touches_if_idle(self) -> None:
        if not self._write_lock.acquire(blocking=False):
            return  # the writer will write them out with its next change
        try:
            with self._transaction():
                self._write_touches()
        except sqlite3.Error as exc:  # a read must not fail over LRU bookkeeping
            log.warning("chunk cache: cannot record recent uses: %s", exc)
        finally:
            self._write_lock.release()

    # -- bookkeeping from the read path --------------------------------------------------

    def _drop_corrupt(self, key: bytes, data: bytes,
                      identity: tuple[int, int, int] | None) -> None:
        """Delete a chunk that failed its hash, unless it was replaced since it was
        read (identity: the file's, None for a packed chunk)."""
        path = self.path_of(_PREFIX + key.hex())
        try:
            changes = self._forget_corrupt(key, data, identity, path)
        except sqlite3.Error as exc:  # a full disk: the read is a miss all the same
            log.warning("chunk cache: cannot forget corrupt sha256:%s: %s", key.hex(), exc)
            return
        if changes.corrupt:
            log.warning("chunk cache: sha256:%s failed its hash on read; deleted", key.hex())

    def _forget_corrupt(self, key: bytes, data: bytes, identity: tuple[int, int, int] | None,
                        path: str) -> _Changes:
        with self._write_lock, self._transaction() as changes:
            if identity is None:
                row = one(self._db, "SELECT size FROM chunks WHERE digest = ? AND data = ?",
                          (key, data))
            else:
                row = one(self._db, "SELECT size FROM chunks WHERE digest = ? "
                          "AND data IS NULL", (key,))
                with contextlib.suppress(FileNotFoundError):
                    if _identity(os.stat(path)) != identity:
                        row = None
            if row is not None:
                self._forget(changes, key, row[0], is_file=identity is not None)
                changes.corrupt += 1
        return changes

    def _note_seal(self, key: bytes, stat: os.stat_result) -> None:
        seal = _seal_of(stat)
        with self._lock:
            self._seals.pop(key, None)
            if seal is not None:
                self._seals[key] = seal
                if len(self._seals) > SEALS_LIMIT:
                    del self._seals[next(iter(self._seals))]

    def _forget_missing_file(self, key: bytes, path: str) -> None:
        try:
            with self._write_lock, self._transaction() as changes:
                row = one(self._db, "SELECT size FROM chunks WHERE digest = ? "
                          "AND data IS NULL", (key,))
                if row is not None and not os.path.exists(path):
                    self._forget(changes, key, row[0], is_file=False)
        except sqlite3.Error as exc:  # a full disk: the chunk reads as a miss all the same
            log.warning("chunk cache: cannot forget sha256:%s, whose file is gone: %s",
                        key.hex(), exc)

    def _touch(self, digest: str) -> None:
        """Note a use of the chunk (the caller holds the lock)."""
        if digest in self._touches or len(self._touches) < TOUCH_BUFFER:
            self._touches[digest] = self._tick()

    def _touch_now(self, digest: str) -> None:
        with self._lock:
            self._touch(digest)

    def _tick(self) -> int:
        """The LRU clock: microseconds, strictly increasing (the caller holds the lock)."""
        self._clock = max(self._clock + 1, time.time_ns() // 1000)
        return self._clock

    def _miss(self) -> None:
        with self._lock:
            self.stats.misses += 1
        CACHE_MISSES.inc()
        return None

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A reader connection from the pool (a new one if all are in use)."""
        with self._lock:
            if self._closed:
                raise ValueError("the chunk cache is closed")
            db = self._readers.pop() if self._readers else None
        if db is None:
            db = connect(self._index_path)
        try:
            yield db
        finally:
            with self._lock:
                keep = not self._closed and len(self._readers) < READERS
                if keep:
                    self._readers.append(db)
            if not keep:
                db.close()

    # -- opening -----------------------------------------------------------------------

    def _open_index(self) -> sqlite3.Connection:
        os.makedirs(self._chunk_dir, exist_ok=True)
        os.makedirs(self.temp_dir, exist_ok=True)
        return open_index(self._index_path)

    def _load(self) -> None:
        with self._write_lock:
            repair(self._db, self._chunk_dir, self.temp_dir)
            count, total = one(self._db, "SELECT count(*), coalesce(sum(size), 0) FROM chunks")
            self._count, self._bytes = count, total
            CACHE_BYTES.inc(total)
            self._clock = one(self._db, "SELECT coalesce(max(used), 0) FROM chunks")[0]
            self._rank = one(self._db, "SELECT coalesce(max(last_rank), 0) FROM owners")[0]
            self._shield.recompute(self._db)
            self._evict_rest(True)  # the limit may have shrunk since the last run


def _disk_full(exc: BaseException) -> bool:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        (getattr(cause, "sqlite_errorcode", None) or 0) & 0xFF == sqlite3.SQLITE_FULL


def _cache_error(root: str, exc: OSError | sqlite3.DatabaseError) -> OSError:
    """An OSError that names the cache (an index error becomes one too)."""
    if isinstance(exc, sqlite3.DatabaseError):
        return OSError(f"chunk cache {root}: index: {exc}")
    if exc.errno is None:
        return OSError(f"chunk cache {root}: {exc}")
    return OSError(exc.errno, f"chunk cache {root}: {exc.strerror or exc}")


def _present(row: tuple | None, path: str) -> bool:
    """Whether a chunk with this `data IS NULL` row (None: no row) is stored."""
    return row is not None and (not row[0] or os.path.exists(path))
