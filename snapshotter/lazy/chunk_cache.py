"""A content-addressed cache of verified chunks on local disk, shared by all layers.

The key is a chunk's sha256 digest from the TOC, so a chunk that several layers or
images hold is stored once. Each chunk is one file, ROOT/sha256/<2 hex>/<64 hex>.

Bytes are hashed on the way in (a mismatch is refused) and again on every read from
disk: a file that no longer matches its name is deleted, counted and reads as a miss,
so the cache never returns bytes that were not verified.

Persistence uses the directory itself as the index, with the files' mtime as the LRU
order, rather than a SQLite index: a chunk is stored if and only if its file exists, so
there is no second structure that a crash could leave disagreeing with the files, and
a start-up scan (one stat per chunk) rebuilds sizes and order. atime is not used because
nodes mount with noatime/relatime; a hit refreshes the mtime at most once a minute, so
hot chunks cost no metadata write per read.

Writes go to a temp file in ROOT/tmp and are renamed into place (same filesystem), so
a crash leaves at worst a temp file, which the next start removes. There is no fsync:
a chunk that a power loss left short reads as corrupt, is deleted and is fetched again.

Small chunks are also kept in memory (a bounded LRU of their own). Memory holds only
chunks that are on disk, so evicting a chunk from disk drops it from memory as well.

`protect(digests, owner)` keeps chunks (e.g. an image's warm set) from eviction, up to
`protected_share` of `max_bytes`; beyond that the chunks protected longest ago are
evictable again, so protection can never fill the cache.

Thread-safe: one lock guards the index; file reads and writes happen outside it (the
rename and unlinks that change what the index describes happen under it). One process
owns a root at a time.
"""

import contextlib
import hashlib
import itertools
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from estargz import DigestMismatch

from ..prometheus import Counter, Gauge
from .metrics import REGISTRY

log = logging.getLogger(__name__)

_HEX = re.compile(r"[0-9a-f]{64}")
_PREFIX = "sha256:"
TOUCH_INTERVAL = 60.0  # seconds between mtime refreshes of one chunk

CACHE_HITS = Counter("lazypull_chunk_cache_hits_total", "Chunk cache hits, by tier",
                     ["tier"], registry=REGISTRY)
CACHE_MISSES = Counter("lazypull_chunk_cache_misses_total", "Chunk cache misses",
                       registry=REGISTRY)
CACHE_EVICTIONS = Counter("lazypull_chunk_cache_evictions_total",
                          "Chunks evicted from disk to stay under the size limit",
                          registry=REGISTRY)
CACHE_CORRUPT = Counter("lazypull_chunk_cache_corrupt_chunks_total",
                        "Chunk files that no longer matched their digest and were deleted",
                        registry=REGISTRY)
CACHE_BYTES = Gauge("lazypull_chunk_cache_bytes", "Bytes of chunks stored on disk",
                    registry=REGISTRY)


@dataclass
class CacheStats:
    """What this cache did since it was opened (the prometheus metrics sum all caches)."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    evictions: int = 0
    corrupt: int = 0


@dataclass(eq=False)
class _Entry:
    """A chunk on disk. A new object per stored file, so a reader can tell whether the
    file it read is still the one the index describes."""

    size: int
    touched: float  # wall-clock time of the last mtime refresh


def _hex_of(digest: str) -> str:
    if not isinstance(digest, str) or not digest.startswith(_PREFIX) \
            or not _HEX.fullmatch(digest[len(_PREFIX):]):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest[len(_PREFIX):]


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
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._disk: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._disk_bytes = 0
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_used = 0
        self._holders: dict[str, dict[str, int]] = {}  # digest -> owner -> protection order
        self._owned: dict[str, set[str]] = {}  # owner -> digests
        self._protection_order = itertools.count()
        self._shielded: frozenset[str] | None = None  # protected within the share; lazily
        self._load()

    # -- queries ---------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes of chunks on disk."""
        with self._lock:
            return self._disk_bytes

    @property
    def memory_size_bytes(self) -> int:
        with self._lock:
            return self._memory_used

    def __len__(self) -> int:
        with self._lock:
            return len(self._disk)

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._disk

    def on_disk(self, digest: str) -> bool:
        """Whether the chunk's file is really there. The index alone goes stale when
        files are removed behind the cache's back (disk cleaners, an operator); a file
        found gone is forgotten."""
        with self._lock:
            entry = self._disk.get(digest)
        if entry is None:
            return False
        if os.path.exists(self.path_of(digest)):
            return True
        with self._lock:
            if self._disk.get(digest) is entry:
                self._forget(digest)
        return False

    def path_of(self, digest: str) -> str:
        """Where the chunk's file is (or would be)."""
        hex_digest = _hex_of(digest)
        return os.path.join(self._chunk_dir, hex_digest[:2], hex_digest)

    # -- reading ---------------------------------------------------------------------

    def get_from_memory(self, digest: str) -> bytes | None:
        """The chunk if the memory tier holds it; never touches the disk (so an event
        loop may call it directly). A None here is not counted as a miss."""
        with self._lock:
            data = self._memory.get(digest)
            if data is None:
                return None
            entry = self._use(digest)
            self.stats.memory_hits += 1
        CACHE_HITS.labels("memory").inc()
        self._touch_if_due(digest, entry)
        return data

    def get(self, digest: str) -> bytes | None:
        """The verified chunk, or None. A chunk file that fails its hash is deleted."""
        hex_digest = _hex_of(digest)
        data = self.get_from_memory(digest)
        if data is not None:
            return data
        with self._lock:
            entry = self._disk.get(digest)
        if entry is None:
            return self._miss()
        path = os.path.join(self._chunk_dir, hex_digest[:2], hex_digest)
        try:
            with open(path, "rb") as file:
                data = file.read()
        except FileNotFoundError:  # evicted since the lookup, or removed behind our back
            with self._lock:
                if self._disk.get(digest) is entry:
                    self._forget(digest)
            return self._miss()
        if hashlib.sha256(data).hexdigest() != hex_digest:
            self._drop_corrupt(digest, entry, path)
            return self._miss()
        with self._lock:
            if self._disk.get(digest) is entry:
                self._use(digest)
                self._remember_in_memory(digest, data)
            self.stats.disk_hits += 1
        CACHE_HITS.labels("disk").inc()
        self._touch_if_due(digest, entry)
        return data

    # -- writing ---------------------------------------------------------------------

    def put(self, digest: str, data: bytes) -> None:
        """Store a chunk after checking that it hashes to `digest` (DigestMismatch if not)."""
        hex_digest = _hex_of(digest)
        actual = hashlib.sha256(data).hexdigest()
        if actual != hex_digest:
            raise DigestMismatch(f"chunk hashes to sha256:{actual}, not {digest}")
        with self._lock:
            if digest in self._disk:  # the same chunk from another layer: stored once
                self._use(digest)
                self._remember_in_memory(digest, data)
                return
        directory = os.path.join(self._chunk_dir, hex_digest[:2])
        os.makedirs(directory, exist_ok=True)
        temp = os.path.join(self.temp_dir, f"{hex_digest}.{secrets.token_hex(6)}")
        renamed = False
        try:
            with open(temp, "xb") as file:
                file.write(data)
            with self._lock:
                if digest in self._disk:  # another thread stored it meanwhile
                    self._use(digest)
                    return
                os.replace(temp, os.path.join(directory, hex_digest))
                renamed = True
                self._disk[digest] = _Entry(len(data), time.time())
                self._disk_bytes += len(data)
                CACHE_BYTES.inc(len(data))
                if digest in self._holders:
                    self._shielded = None
                self._remember_in_memory(digest, data)
                self._evict_over_limit()
        finally:
            if not renamed:
                _unlink_quietly(temp)

    # -- protection ------------------------------------------------------------------

    def protect(self, digests: Iterable[str], owner: str) -> None:
        """Keep these chunks from eviction until `owner` releases them (adds to what
        `owner` protects already). Chunks not stored yet are protected once stored."""
        wanted = list(digests)
        for digest in wanted:
            _hex_of(digest)  # refuse anything that could never be a key
        with self._lock:
            order = next(self._protection_order)
            owned = self._owned.setdefault(owner, set())
            for digest in wanted:
                self._holders.setdefault(digest, {})[owner] = order
                owned.add(digest)
            self._shielded = None

    def owners(self) -> list[str]:
        """The owners that protect chunks now."""
        with self._lock:
            return list(self._owned)

    def release(self, owner: str) -> None:
        with self._lock:
            for digest in self._owned.pop(owner, set()):
                holders = self._holders.get(digest, {})
                holders.pop(owner, None)
                if not holders:
                    self._holders.pop(digest, None)
            self._shielded = None
            self._evict_over_limit()

    # -- internals (the callers hold the lock unless said otherwise) ------------------

    def _load(self) -> None:
        os.makedirs(self._chunk_dir, exist_ok=True)
        os.makedirs(self.temp_dir, exist_ok=True)
        for leftover in os.scandir(self.temp_dir):  # writes that a crash interrupted
            _remove_quietly(leftover.path)
        found: list[tuple[float, str, int]] = []
        for prefix in os.scandir(self._chunk_dir):
            if not prefix.is_dir(follow_symlinks=False):
                _remove_quietly(prefix.path)
                continue
            for item in os.scandir(prefix.path):
                if not (_HEX.fullmatch(item.name) and item.name[:2] == prefix.name
                        and item.is_file(follow_symlinks=False)):
                    log.info("chunk cache: removing stray %s", item.path)
                    _remove_quietly(item.path)
                    continue
                stat = item.stat(follow_symlinks=False)
                found.append((stat.st_mtime, _PREFIX + item.name, stat.st_size))
        found.sort()
        with self._lock:
            for mtime, digest, size in found:
                self._disk[digest] = _Entry(size, mtime)
                self._disk_bytes += size
            CACHE_BYTES.inc(self._disk_bytes)
            self._evict_over_limit()  # the limit may have shrunk since the last run

    def _use(self, digest: str) -> _Entry | None:
        """Mark a chunk as just used in both tiers."""
        if digest in self._memory:
            self._memory.move_to_end(digest)
        entry = self._disk.get(digest)
        if entry is not None:
            self._disk.move_to_end(digest)
        return entry

    def _remember_in_memory(self, digest: str, data: bytes) -> None:
        size = len(data)
        if size > self.memory_item_limit or size > self.memory_bytes:
            return
        if digest in self._memory:
            self._memory.move_to_end(digest)
            return
        self._memory[digest] = data
        self._memory_used += size
        while self._memory_used > self.memory_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._memory_used -= len(dropped)

    def _forget(self, digest: str) -> None:
        entry = self._disk.pop(digest)
        self._disk_bytes -= entry.size
        CACHE_BYTES.dec(entry.size)
        data = self._memory.pop(digest, None)
        if data is not None:
            self._memory_used -= len(data)
        if digest in self._holders:
            self._shielded = None

    def _shielded_digests(self) -> frozenset[str]:
        """Protected chunks on disk, most recently protected first, up to the share."""
        if self._shielded is None:
            budget = self.protected_share * self.max_bytes
            ranked = sorted(((max(holders.values()), digest)
                             for digest, holders in self._holders.items()
                             if digest in self._disk), reverse=True)
            shielded, used = set(), 0
            for _, digest in ranked:
                used += self._disk[digest].size
                if used > budget:
                    break  # this one and everything protected before it is evictable
                shielded.add(digest)
            self._shielded = frozenset(shielded)
        return self._shielded

    def _evict_over_limit(self) -> None:
        excess = self._disk_bytes - self.max_bytes
        if excess <= 0:
            return
        shielded = self._shielded_digests()
        victims = []
        for digest, entry in self._disk.items():
            if excess <= 0:
                break
            if digest not in shielded:
                victims.append(digest)
                excess -= entry.size
        for digest in victims:
            # Under the lock, so a concurrent put of the same chunk cannot lose its file.
            _unlink_quietly(self.path_of(digest))
            self._forget(digest)
        self.stats.evictions += len(victims)
        CACHE_EVICTIONS.inc(len(victims))

    # -- bookkeeping without the lock held ---------------------------------------------

    def _drop_corrupt(self, digest: str, entry: _Entry, path: str) -> None:
        with self._lock:
            if self._disk.get(digest) is not entry:
                return  # replaced or removed since we read it
            _unlink_quietly(path)
            self._forget(digest)
            self.stats.corrupt += 1
        CACHE_CORRUPT.inc()
        log.warning("chunk cache: %s failed its hash on read; deleted", digest)

    def _touch_if_due(self, digest: str, entry: _Entry | None) -> None:
        now = time.time()
        if entry is None or now - entry.touched < TOUCH_INTERVAL:
            return
        entry.touched = now
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
            os.utime(self.path_of(digest), (now, now))

    def _miss(self) -> None:
        with self._lock:
            self.stats.misses += 1
        CACHE_MISSES.inc()
        return None


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_quietly(path: str) -> None:
    """Remove a file or a directory tree that is not ours to keep (start-up cleaning)."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            for item in os.scandir(path):
                _remove_quietly(item.path)
            os.rmdir(path)
        else:
            os.unlink(path)
