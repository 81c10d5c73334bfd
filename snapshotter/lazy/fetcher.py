"""Fetch the verified chunks of one layer blob through single-range requests.

A chunk lives in a span of the blob (`blob_offset .. blob_end`: the compressed member
that starts with it; zstd:chunked may put several chunks in one span). Spans follow
each other without gaps, so one range request can carry many of them:

- a miss fetches the missing chunk's span and the not-yet-cached, not-in-flight spans
  right after it, up to `max_request_bytes`; for a chunk of a small file up to
  `window_bytes` and `window_chunks` (small files of one directory are neighbours in
  the blob, so a process that opens hundreds of them pays tens of round trips, not
  hundreds; the chunk bound keeps a window over tiny files from verifying and storing
  thousands of chunks before the read that asked for one can return). Only
  forward: reads and TOC order both run forward, and a backward miss opens its own
  window;
- every chunk of a planned request has a future in `_inflight` from the moment the
  request is planned, so any other reader of it waits for that request (single
  flight, also for chunks inside another request, for a queued prefetch stream and
  for background fetches);
- planning is synchronous on the event loop, and a chunk leaves `_inflight` only once
  it is in the cache, so a reader sees it either cached or in flight. A prefetch's or
  background fetch's chunk has its future resolved before that, as soon as it is
  verified: readers waiting for it need not wait for the cache's write. A reader's
  own request caches first. A background run is looked up in a worker thread, then
  registered on the loop a slice at a time, cut before the first span that went in
  flight or got cached meanwhile;
- every chunk is checked with `decode_chunk` before it is cached or returned. A chunk
  that fails is fetched once more on its own; failing again raises
  ChunkVerificationError (the FUSE layer answers EIO) and nothing is cached. A failed
  request (the registry client's StoreError) reaches every reader of its chunks
  unchanged, and is not remembered: the next read asks the registry again;
- with `stream_range`, a reader's own request (a miss and its window) is read as a
  stream, and the chunk that was missed, first in the request, is verified and handed
  out as soon as its bytes are in, not after the window behind it;
- a read waits at most `read_timeout` seconds for its chunks, then fails with
  ChunkFetchError. The request it waited for goes on until the registry client gives
  up (a read that joins it later, such as the kernel's read of a page whose readahead
  failed, waits for that or for its own deadline) and may still serve later reads.
  Every failed read is counted in lazypull_read_failures_total by layer and reason,
  and logged with the layer, the file and the chunk.

Requests run in at most `concurrency` slots. Background requests take a slot only while
no on-demand or prefetch request waits for one, and hold at most one slot; with
`foreground_idle` (seconds since the last FUSE request) each also waits for a quiet
moment first (GIVE_WAY_QUIET, GIVE_WAY_MAX).
"""

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from estargz import Chunk, FormatError, Layer, Node, Span, decode_chunk
from estargz.footer import Compression

from ..crash_points import crash_point
from ..prometheus import Counter, Histogram
from .chunk_cache import ChunkCache
from .chunk_index import PACK_LIMIT
from .metrics import REGISTRY

log = logging.getLogger(__name__)

DEMAND, PREFETCH, BACKGROUND = "demand", "prefetch", "background"
# A prefetch or background request holds at most this many chunks. It is planned on the
# event loop, span by span: over a layer of tiny files, 8 MiB of spans took long enough
# to delay FUSE lookups by milliseconds.
RUN_CHUNKS = 2048
# A prefetch request fetches at most this much, so that each is verified and its
# chunks handed out while the next ones arrive (and several fill the link together).
PREFETCH_REQUEST_BYTES = 1 << 20
# A background request fetches at most this much: a container that starts reading
# while one is under way waits for its end (0.2 s at 100 Mbit) before background
# fetching yields (LazyLayers' quiet wait), not for the 8 MiB a prefetch request takes.
BACKGROUND_REQUEST_BYTES = 2 << 20
# Planning asks the cache about spans' chunks a block at a time (one query each: asked
# one by one, each question costs an index transaction), in blocks growing from the
# first to the last size, so a short run looks up little beyond its end.
LOOKUP_BLOCKS = (16, 64, 256)
# Work on the event loop for many chunks at once (a background run's registration, the
# resolution of its futures) goes this many at a time, letting FUSE requests in between:
# 2048 at once delayed lookups by milliseconds.
LOOP_SLICE = 128
# A background request starts once the tree has had no FUSE request for GIVE_WAY_QUIET
# seconds, or after waiting GIVE_WAY_MAX seconds: its threads' work takes the GIL from
# the loop that answers lookups, and a busy tree must slow the fetch, never stop it.
GIVE_WAY_QUIET = 0.05
GIVE_WAY_MAX = 1.0

# The threads that decompress, hash and store prefetched and background-fetched
# chunks, as many as cores (started at their first job). In the default executor
# these jobs queued ahead of the small ones a start waits for: FUSE reads' cache
# lookups, a mount's files.
_BULK_VERIFIERS = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                     thread_name_prefix="verify")


FETCH_BYTES = Counter("lazypull_fetch_bytes_total",
                      "Compressed blob bytes fetched from registries, by kind of fetch",
                      ["kind"], registry=REGISTRY)
FETCH_REQUESTS = Counter("lazypull_fetch_requests_total",
                         "Range requests sent to registries, by kind of fetch", ["kind"],
                         registry=REGISTRY)
FETCH_LATENCY = Histogram("lazypull_fetch_duration_seconds",
                          "Time of one range request, by kind of fetch", ["kind"],
                          registry=REGISTRY,
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                   1, 2.5, 5, 10, 30))
VERIFICATION_FAILURES = Counter("lazypull_fetch_verification_failures_total",
                                "Chunks that failed verification twice and were refused",
                                registry=REGISTRY)
# Why a read failed: its deadline passed, a chunk failed verification twice, or the
# registry (or the fetch) failed.
DEADLINE, VERIFICATION, FETCH = "deadline", "verification", "fetch"
READ_FAILURES = Counter("lazypull_read_failures_total",
                        "Reads of lazy files that failed (EIO), by layer blob and reason",
                        ["layer", "reason"], registry=REGISTRY)


class ChunkFetchError(FormatError):
    """A chunk's verified bytes could not be had: its fetch failed or was cancelled, or
    the read's deadline passed first."""


class ChunkVerificationError(ChunkFetchError):
    """A chunk's bytes from the registry failed verification, also when fetched again."""


class _ChunkUnavailable(Exception):
    """A chunk a read needs cannot be had; `error` is what the read raises."""

    def __init__(self, chunk: Chunk, reason: str, error: BaseException):
        super().__init__(str(error))
        self.chunk, self.reason, self.error = chunk, reason, error


@dataclass
class FetchStats:
    demand_bytes: int = 0
    prefetch_bytes: int = 0
    background_bytes: int = 0
    demand_requests: int = 0
    prefetch_requests: int = 0
    background_requests: int = 0
    retries: int = 0  # requests that fetched chunks again after a failed verification
    verification_failures: int = 0  # chunks refused after the retry
    reads: int = 0  # reads served, from the cache or not: containers at work

    @property
    def requests(self) -> int:
        return self.demand_requests + self.prefetch_requests + self.background_requests

    @property
    def bytes_fetched(self) -> int:
        return self.demand_bytes + self.prefetch_bytes + self.background_bytes

    def count(self, kind: str, requests: int = 0, nbytes: int = 0) -> None:
        setattr(self, f"{kind}_requests", getattr(self, f"{kind}_requests") + requests)
        setattr(self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + nbytes)


class RequestSlots:
    """At most `limit` requests at once. Background requests start only while no other
    request waits for a slot, and at most one of them runs at a time."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("at least one request must be allowed")
        self.limit = limit
        self.busy = 0
        self.background = 0
        self.waiting = 0  # on-demand and prefetch requests waiting for a slot
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def slot(self, background: bool) -> AsyncIterator[None]:
        await self._acquire(background)
        try:
            yield
        finally:
            await self._release(background)

    async def _acquire(self, background: bool) -> None:
        async with self._changed:
            if background:
                await self._changed.wait_for(
                    lambda: self.busy < self.limit and not self.waiting and not self.background)
                self.background += 1
            else:
                self.waiting += 1
                try:
                    await self._changed.wait_for(lambda: self.busy < self.limit)
                finally:
                    self.waiting -= 1
                    self._changed.notify_all()  # a background waiter may go now
            self.busy += 1

    async def _release(self, background: bool) -> None:
        async with self._changed:
            self.busy -= 1
            if background:
                self.background -= 1
            self._changed.notify_all()


class TokenBucket:
    """Caps a byte rate. Paid after a request, so a throttled fetch holds neither a
    request slot nor the futures of chunks that readers may want meanwhile."""

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = rate if burst is None else burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp = clock()

    async def spend(self, amount: int) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= amount
        if self._tokens < 0:
            await self._sleep(-self._tokens / self.rate)


class ChunkDecoder(Protocol):
    """Turns a chunk's span of fetched blob bytes into the verified bytes the cache
    keeps under the chunk's digest, and says where the chunk's own bytes start in them."""

    def decode(self, chunk: Chunk, compressed: bytes) -> bytes: ...

    def offset_in_decoded(self, chunk: Chunk) -> int: ...


class MemberDecoder:
    """eStargz and zstd:chunked: a chunk inflates from its member(s) on its own."""

    def __init__(self, compression: Compression):
        self.compression = compression

    def decode(self, chunk: Chunk, compressed: bytes) -> bytes:
        return decode_chunk(self.compression, chunk, compressed)

    @staticmethod
    def offset_in_decoded(chunk: Chunk) -> int:
        return 0


class LayerFetcher:
    """`name` names the layer in logs and metrics (its blob digest); `read_timeout` is
    how long a read may wait for its chunks (None: as long as the requests take)."""

    def __init__(self, layer: Layer, read_range: Callable[[int, int], Awaitable[bytes]],
                 cache: ChunkCache, *, name: str = "", read_timeout: float | None = None,
                 max_request_bytes: int = 8 << 20,
                 concurrency: int = 4, background_bytes_per_second: float | None = None,
                 small_file_bytes: int = 64 << 10, window_bytes: int = 512 << 10,
                 window_chunks: int = 256,
                 demand_readahead_bytes: int = 0,
                 prefetch_request_bytes: int | None = None,
                 stream_range: Callable[[int, int], AsyncIterator[bytes]] | None = None,
                 decoder: ChunkDecoder | None = None,
                 foreground_idle: Callable[[], float] | None = None):
        if max_request_bytes <= 0 or window_bytes <= 0 or \
                (prefetch_request_bytes is not None and prefetch_request_bytes <= 0):
            raise ValueError("request sizes must be positive")
        if read_timeout is not None and read_timeout <= 0:
            raise ValueError("read_timeout must be positive")
        self.layer = layer
        self.name = name
        self.read_timeout = read_timeout
        self.cache = cache
        self.max_request_bytes = max_request_bytes
        self.small_file_bytes = small_file_bytes
        self.window_bytes = window_bytes
        self.window_chunks = window_chunks
        # A miss in a large file fetches its chunk and at most this much more: cold
        # starts read a few blocks of big files here and there. Without a profile, at
        # 100 Mbit: 1 MiB more took python 22.5 MB and 5.22 s to READY, none 14.5 MB
        # and 5.08 s (gcc 6.17 -> 5.79 s, node 7.08 -> 6.81 s); 8 MiB cost more still.
        self.demand_readahead_bytes = demand_readahead_bytes
        # None: PREFETCH_REQUEST_BYTES, read when a prefetch is planned
        self.prefetch_request_bytes = prefetch_request_bytes
        self.stats = FetchStats()
        self._read_range = read_range
        self._stream_range = stream_range
        self._decoder = decoder or MemberDecoder(layer.footer.compression)
        self._slots = RequestSlots(concurrency)
        self._bucket = TokenBucket(background_bytes_per_second) \
            if background_bytes_per_second else None
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self._refused: set[str] = set()  # chunks that failed verification twice
        self._tasks: set[asyncio.Task[int]] = set()
        # While a background run is planned off the loop: chunks other requests settled
        # meanwhile (the plan's view of the cache may predate them).
        self._settled_meanwhile: set[str] | None = None
        self._foreground_idle = foreground_idle
        # The spans prefetch() fetches, as runs of span numbers; None: the layer's
        # whole prefetch region (lazy.prefetch_plan leaves out unread chunks).
        self.prefetch_runs: list[tuple[int, int]] | None = None
        # Set once a prefetch request's chunks are verified and cached: the registry
        # serves this blob (lazy.manager lets a Prepare go on from there).
        self.prefetch_answered = asyncio.Event()

    # -- reading ----------------------------------------------------------------------

    async def chunk(self, chunk: Chunk) -> bytes:
        """The verified bytes of one chunk."""
        try:
            return (await self._gather([chunk]))[chunk.digest]
        except _ChunkUnavailable as failure:
            raise failure.error from None

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        """Bytes `offset .. offset+length` of a regular file (fewer at its end), within
        `read_timeout` seconds."""
        if node.kind != "reg":
            raise FormatError(f"{node.path!r} is not a regular file")
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        self.stats.reads += 1
        chunks = self.layer.chunks_for_range(node, offset, length)
        if not chunks:
            return b""
        end = min(offset + length, node.size)
        ranges = []  # of each chunk, the bytes wanted, in what the cache keeps for it
        for chunk in chunks:
            base = self._decoder.offset_in_decoded(chunk) - chunk.file_offset
            ranges.append((base + max(offset, chunk.file_offset),
                           base + min(end, chunk.file_offset + chunk.size)))
        pieces = self._parts_at_hand(chunks, ranges)
        if any(piece is None for piece in pieces):
            pieces = await asyncio.to_thread(self._parts_on_disk, chunks, ranges, pieces)
        elif self.cache.touches_due:  # a transaction: not on the event loop
            await asyncio.to_thread(self.cache.write_touches_if_due)
        missing = [chunk for chunk, piece in zip(chunks, pieces, strict=True) if piece is None]
        if missing:
            deadline = None if self.read_timeout is None else \
                asyncio.get_running_loop().time() + self.read_timeout
            try:
                found = await self._gather(missing, deadline)
            except _ChunkUnavailable as failure:
                self._report(node, offset, length, failure)
                raise failure.error from None
            pieces = [found[chunk.digest][start:stop] if piece is None else piece
                      for chunk, (start, stop), piece in zip(chunks, ranges, pieces, strict=True)]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)  # type: ignore[arg-type]

    def _parts_at_hand(self, chunks: list[Chunk], ranges: list[tuple[int, int]]
                       ) -> list[bytes | None]:
        """The parts in the memory tier, in chunk files this process sealed (only the
        bytes wanted) or packed in the cache's index, read here: a read of 128 KiB, or
        a query and the hash of a packed chunk, costs less than a worker thread's
        hand-off, measured at about 0.4 ms a read on the warm-set start."""
        parts: list[bytes | None] = []
        for chunk, (start, stop) in zip(chunks, ranges, strict=True):
            part = self.cache.read_sealed(chunk.digest, start, stop)
            if part is None and chunk.size <= PACK_LIMIT:
                part = self.cache.read_packed(chunk.digest, start, stop)
            parts.append(part)
        return parts

    def _parts_on_disk(self, chunks: list[Chunk], ranges: list[tuple[int, int]],
                       parts: list[bytes | None]) -> list[bytes | None]:
        """In a worker thread: the parts still missing, read whole from the cache
        (verified, and then held in its memory tier for the reads that follow); None
        for chunks not cached."""
        found = list(parts)
        for number, (chunk, (start, stop)) in enumerate(zip(chunks, ranges, strict=True)):
            if found[number] is None:
                data = self.cache.get(chunk.digest)
                found[number] = None if data is None else data[start:stop]
        return found

    def _report(self, node: Node, offset: int, length: int,
                failure: _ChunkUnavailable) -> None:
        READ_FAILURES.labels(self.name, failure.reason).inc()
        chunk = failure.chunk
        log.warning("layer %s: read of %s (bytes %d-%d) failed at chunk %s (file offset %d, "
                    "blob offset %d): %s: %s", self.name, node.path, offset,
                    offset + length - 1, chunk.digest, chunk.file_offset, chunk.blob_offset,
                    failure.reason, failure.error)

    def is_complete(self) -> bool:
        """Whether every chunk of the layer is in the cache."""
        digests = self.layer.chunk_digests()
        while block := list(itertools.islice(digests, 1024)):
            if len(self.cache.stored_among(block)) < len(set(block)):
                return False
        return True

    async def _gather(self, chunks: Iterable[Chunk],
                      deadline: float | None = None) -> dict[str, bytes]:
        """The bytes of `chunks` by digest; _ChunkUnavailable for the first that cannot
        be had, or is not had by `deadline` (event loop time)."""
        wanted = {chunk.digest: chunk for chunk in chunks}  # equal digests: equal bytes
        found: dict[str, bytes] = {}
        for digest in wanted:
            data = self.cache.get_from_memory(digest)
            if data is not None:
                found[digest] = data
        first_round = True
        while len(found) < len(wanted):
            missing = [digest for digest in wanted if digest not in found]
            found.update(await asyncio.to_thread(self._load_cached, missing))
            waits = {}
            for digest in missing:
                if digest in found:
                    continue
                future = self._inflight.get(digest)
                if future is None:
                    future = self._request_from(wanted[digest], DEMAND, check_cache=first_round)
                if future is not None:
                    waits[digest] = future
            for digest, future in waits.items():
                found[digest] = await self._wait(wanted[digest], future, deadline)
            first_round = False
        return found

    async def _wait(self, chunk: Chunk, future: asyncio.Future[bytes],
                    deadline: float | None) -> bytes:
        # Shielded: other readers may wait for the same request.
        timer = asyncio.timeout_at(deadline)
        try:
            async with timer:
                return await asyncio.shield(future)
        except TimeoutError as exc:
            if not timer.expired():
                raise _ChunkUnavailable(chunk, FETCH, exc) from None
            raise _ChunkUnavailable(chunk, DEADLINE, ChunkFetchError(
                f"chunk {chunk.digest}: no verified bytes within {self.read_timeout:g}s")
            ) from None
        except ChunkVerificationError as exc:
            raise _ChunkUnavailable(chunk, VERIFICATION, exc) from None
        except Exception as exc:
            raise _ChunkUnavailable(chunk, FETCH, exc) from None

    def _load_cached(self, digests: list[str]) -> dict[str, bytes]:
        found = {}
        for digest in digests:
            data = self.cache.get(digest)
            if data is not None:
                found[digest] = data
        return found

    # -- planning (synchronous on the event loop: nothing can change in between) --------

    def _request_from(self, chunk: Chunk, kind: str,
                      check_cache: bool) -> asyncio.Future[bytes] | None:
        """Start a request for `chunk` and its neighbours; None if it got cached since
        the caller looked (the caller reads it from the cache then)."""
        if check_cache and chunk.digest in self.cache:
            return None
        index = self.layer.span_index(chunk.blob_offset)
        if index is None:  # not a chunk of a reachable file: fetch just its span
            run = [Span(chunk.blob_offset, chunk.blob_end, (chunk,), chunk.size)]
            cached = self._cached_in(run)
        else:
            span = self.layer.span(index)
            max_chunks = None
            if span.smallest_file <= self.small_file_bytes:
                budget, max_chunks = self.window_bytes, self.window_chunks
            elif kind == DEMAND:
                budget = min(self.max_request_bytes, span.size + self.demand_readahead_bytes)
            else:
                budget = self.max_request_bytes
            run, cached = self._run_from(index, budget, self.layer.span_count, max_chunks)
        futures = self._register(run, cached, must=chunk.digest)
        self._start(run, futures, kind)
        return futures[chunk.digest]

    def _needed(self, span: Span, cached: set[str], as_neighbour: bool = False) -> bool:
        """Whether a chunk of `span` is neither in flight nor in `cached` (the span's
        chunks that the cache holds)."""
        # A chunk that failed verification is fetched again only when asked for itself,
        # not as every neighbour's passenger.
        return any(c.digest not in self._inflight and c.digest not in cached
                   and not (as_neighbour and c.digest in self._refused)
                   for c in span.chunks)

    def _cached_in(self, spans: Iterable[Span]) -> set[str]:
        return self.cache.stored_among(c.digest for span in spans for c in span.chunks)

    def _spans_from(self, index: int, stop: int) -> Iterator[tuple[int, Span, set[str]]]:
        """(index, span, cached chunks of its block) for the spans `index .. stop`."""
        for size in itertools.chain(LOOKUP_BLOCKS, itertools.repeat(LOOKUP_BLOCKS[-1])):
            if index >= stop:
                return
            block = [self.layer.span(i) for i in range(index, min(stop, index + size))]
            cached = self._cached_in(block)
            for span in block:
                yield index, span, cached
                index += 1

    def _next_needed(self, index: int, stop: int) -> int:
        """The first span from `index` (`stop` if none) that has a chunk to fetch."""
        for found, span, cached in self._spans_from(index, stop):
            if self._needed(span, cached):
                return found
        return stop

    def _next_uncached(self, index: int, stop: int) -> int:
        """The first span from `index` (`stop` if none) with a chunk the cache lacks.
        Only asks the cache: a worker thread may run it."""
        for found, span, cached in self._spans_from(index, stop):
            if any(c.digest not in cached for c in span.chunks):
                return found
        return stop

    def _run_from(self, index: int, budget: int, stop: int,
                  max_chunks: int | None = None) -> tuple[list[Span], set[str]]:
        """Span `index` and the adjacent needed spans after it (before `stop`) that fit
        in `budget` bytes, and in `max_chunks` chunks, together; and which of their
        chunks are cached."""
        run = [self.layer.span(index)]
        cached = self._cached_in(run)
        total, chunks = run[0].size, len(run[0].chunks)
        for _, span, block_cached in self._spans_from(index + 1, stop):
            # Adjacent: gzip index spans may share their boundary byte.
            if not run[-1].offset < span.offset <= run[-1].end or total + span.size > budget \
                    or (max_chunks is not None and chunks + len(span.chunks) > max_chunks) \
                    or not self._needed(span, block_cached, as_neighbour=True):
                break
            run.append(span)
            cached |= block_cached
            total += span.size
            chunks += len(span.chunks)
        return run, cached

    def _register(self, run: list[Span], cached: set[str], must: str | None = None
                  ) -> dict[str, asyncio.Future[bytes]]:
        """Futures for the chunks of `run` that nobody has (`cached`: those the cache
        holds) or fetches yet."""
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[bytes]] = {}
        for span in run:
            for chunk in span.chunks:
                digest = chunk.digest
                if digest in futures or digest in self._inflight:
                    continue
                if digest != must and digest in cached:
                    continue
                self._inflight[digest] = futures[digest] = loop.create_future()
        return futures

    def _start(self, run: list[Span], futures: dict[str, asyncio.Future[bytes]],
               kind: str) -> asyncio.Task[int]:
        task = asyncio.create_task(self._request(run, futures, kind))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- requests ----------------------------------------------------------------------

    async def _request(self, run: list[Span], futures: dict[str, asyncio.Future[bytes]],
                       kind: str) -> int:
        try:
            async with self._slots.slot(background=kind == BACKGROUND):
                return await self._transfer(run, futures, kind)
        finally:
            # Cancelled while waiting for a slot: the futures must not hang.
            self._fail(futures, ChunkFetchError("the fetch was cancelled"))

    async def _transfer(self, run: list[Span], futures: dict[str, asyncio.Future[bytes]],
                        kind: str) -> int:
        """Fetch `run`, verify, cache and hand out its chunks; fetch failed ones again
        once. Returns the bytes fetched. Every future is done when this returns."""
        fetched = 0
        try:
            if kind == DEMAND and self._stream_range is not None and len(run) > 1:
                fetched, first_failures = await self._settle_as_streamed(run, futures, kind)
            else:
                data = await self._fetch(run[0].offset, run[-1].end - run[0].offset, kind)
                fetched += len(data)
                first_failures = await self._settle(run, data, futures, kind)
            for group in _adjacent_groups([s for s in run if _holds(s, first_failures)]):
                self.stats.retries += 1
                data = await self._fetch(group[0].offset, group[-1].end - group[0].offset, kind)
                fetched += len(data)
                digests = {c.digest for span in group for c in span.chunks} & first_failures.keys()
                failed = await self._settle(group, data, {d: futures[d] for d in digests},
                                            kind)
                for digest, reason in failed.items():
                    self._refused.add(digest)
                    self.stats.verification_failures += 1
                    VERIFICATION_FAILURES.inc()
                    log.warning("chunk %s at blob offset %d failed verification twice: %s",
                                digest, group[0].offset, reason)
                    self._fail({digest: futures[digest]}, ChunkVerificationError(
                        f"chunk {digest} of the layer failed verification twice: {reason}"))
            # Defensive: every registered chunk is in `run`, so none should be left.
            self._fail(futures, ChunkFetchError("chunk was not in the fetched range"))
        except asyncio.CancelledError:
            self._fail(futures, ChunkFetchError("the fetch was cancelled"))
            raise
        except Exception as exc:  # the registry's error goes to every reader of the chunks
            self._fail(futures, exc)
        return fetched

    async def _fetch(self, offset: int, length: int, kind: str) -> bytes:
        started = self._request_began(kind)
        data = await self._read_range(offset, length)
        self._request_ended(kind, started, len(data))
        return data

    def _request_began(self, kind: str) -> float:
        self.stats.count(kind, requests=1)
        FETCH_REQUESTS.labels(kind).inc()
        return time.monotonic()

    def _request_ended(self, kind: str, started: float, nbytes: int) -> None:
        FETCH_LATENCY.labels(kind).observe(time.monotonic() - started)
        self.stats.count(kind, nbytes=nbytes)
        FETCH_BYTES.labels(kind).inc(nbytes)

    async def _settle_as_streamed(self, run: list[Span],
                                  futures: dict[str, asyncio.Future[bytes]], kind: str
                                  ) -> tuple[int, dict[str, str]]:
        """Fetch `run` as a stream: its first span (the missed chunk's) is settled as
        soon as its bytes are in, the rest once the request ends, in one go (each
        settling is a cache transaction and two thread hand-offs). Returns the bytes
        fetched and digest -> reason for the chunks that failed."""
        assert self._stream_range is not None
        started = self._request_began(kind)
        base, first_end = run[0].offset, run[0].end - run[0].offset
        received, failed = bytearray(), {}
        first_settled = False
        async with aclosing(self._stream_range(base, run[-1].end - base)) as body:
            async for data in body:
                received += data
                if not first_settled and len(received) >= first_end:
                    first_settled = True
                    failed.update(await self._settle(
                        run[:1], bytes(received[:first_end]), self._unsettled(run[:1], futures),
                        kind))
        self._request_ended(kind, started, len(received))
        rest = run[1:] if first_settled else run
        failed.update(await self._settle(rest, bytes(received[rest[0].offset - base:]),
                                         self._unsettled(rest, futures), kind))
        return len(received), failed

    @staticmethod
    def _unsettled(spans: list[Span], futures: dict[str, asyncio.Future[bytes]]
                   ) -> dict[str, asyncio.Future[bytes]]:
        return {c.digest: futures[c.digest] for span in spans for c in span.chunks
                if c.digest in futures and not futures[c.digest].done()}

    async def _settle(self, spans: list[Span], data: bytes,
                      futures: dict[str, asyncio.Future[bytes]], kind: str
                      ) -> dict[str, str]:
        """Verify the chunks of `futures` found in `data` (the bytes of `spans`), cache
        them and hand their bytes to their futures; returns digest -> reason for those
        that failed. A chunk stays in `_inflight` until it is cached, so a reader finds
        it either there or in the cache, and nobody asks the registry for it meanwhile.
        A prefetch's or background fetch's chunks go to their readers first, cached
        after; a reader's own request (DEMAND) caches its chunks first, in the memory
        tier as well, where the kernel's next read of the chunk (128 KiB at a time)
        finds them without a worker thread's trip to the disk."""
        loop = asyncio.get_running_loop()
        # A reader waits for a demand fetch: its chunks go to the default executor, not
        # behind a prefetch's or background fetch's in theirs.
        executor = None if kind == DEMAND else _BULK_VERIFIERS
        good, failed = await loop.run_in_executor(executor, self._verify, spans, data,
                                                  set(futures))
        try:
            if kind == DEMAND:
                await loop.run_in_executor(executor, self._store, good, True)
            for number, (digest, chunk_bytes) in enumerate(good.items(), 1):
                self._refused.discard(digest)
                if not futures[digest].done():
                    futures[digest].set_result(chunk_bytes)
                if number % LOOP_SLICE == 0:  # in flight still: readers find them
                    await asyncio.sleep(0)
            if kind != DEMAND:
                await loop.run_in_executor(executor, self._store, good, False)
        finally:
            for digest in good:
                if self._inflight.get(digest) is futures[digest]:
                    del self._inflight[digest]
                    if self._settled_meanwhile is not None:
                        self._settled_meanwhile.add(digest)
        if good and kind == PREFETCH:
            self.prefetch_answered.set()
        return failed

    def _verify(self, spans: list[Span], data: bytes, digests: set[str]
                ) -> tuple[dict[str, bytes], dict[str, str]]:
        """In a worker thread: decompressing and hashing is the slow part."""
        base = spans[0].offset
        good: dict[str, bytes] = {}
        failed: dict[str, str] = {}
        for span in spans:
            compressed = data[span.offset - base:span.end - base]
            for chunk in span.chunks:
                if chunk.digest not in digests or chunk.digest in good:
                    continue
                try:
                    chunk_bytes = self._decoder.decode(chunk, compressed)
                except FormatError as exc:
                    failed[chunk.digest] = str(exc)
                    continue
                failed.pop(chunk.digest, None)  # the same bytes at another place were fine
                good[chunk.digest] = chunk_bytes
        return good, failed

    def _store(self, good: dict[str, bytes], keep_in_memory: bool) -> None:
        """In a worker thread: the verified chunks into the cache, in one transaction
        (a commit per chunk costs more than storing it)."""
        try:
            # decode() checked each against its digest: the cache need not hash it again
            self.cache.put_many(good.items(), keep_in_memory=keep_in_memory, hashed=True)
        except OSError as exc:  # a full disk must not fail the read that needs it
            log.warning("cannot cache %d chunks (handed out uncached): %s", len(good), exc)

    def _fail(self, futures: dict[str, asyncio.Future[bytes]], error: BaseException) -> None:
        for digest, future in futures.items():
            if future.done():
                continue
            if self._inflight.get(digest) is future:
                del self._inflight[digest]
            future.set_exception(error)
            future.exception()  # delivered to whoever awaits it; nobody may: not "unseen"

    # -- prefetch and background ---------------------------------------------------------

    async def prefetch(self, runs: list[tuple[int, int]] | None = None) -> int:
        """Fetch the prioritized files' region [0, prefetch_end) in large requests and
        cache its chunks: `runs` of span numbers, else `prefetch_runs`, else the whole
        region. Returns the bytes fetched; raises the first failure after every
        request has ended."""
        tasks, futures = [], {}
        if runs is None:
            runs = self.prefetch_runs if self.prefetch_runs is not None \
                else self.layer.prefetch_span_ranges()
        for start, stop in runs:
            index = start
            while index < stop:  # plan and register everything before the first await
                index = self._next_needed(index, stop)
                if index == stop:
                    break
                run, cached = self._run_from(
                    index, min(self.max_request_bytes,
                               self.prefetch_request_bytes or PREFETCH_REQUEST_BYTES),
                    stop, RUN_CHUNKS)
                run_futures = self._register(run, cached)
                futures.update(run_futures)
                tasks.append(self._start(run, run_futures, PREFETCH))
                index += len(run)
        # Shielded: readers may wait for these requests even if this prefetch is cancelled.
        fetched = sum(await asyncio.gather(*(asyncio.shield(task) for task in tasks)))
        await self._raise_first(futures.values())
        return fetched

    async def fetch_all(self, before_request: Callable[[], Awaitable[None]] | None = None
                        ) -> int:
        """Fetch every chunk not yet local, in blob order, at low priority, until the
        layer is complete; `before_request` is awaited before each request (to yield to
        containers at work). Returns the bytes fetched. A failed request stops it (its
        error is raised); chunks that fail verification are skipped and reported in a
        ChunkVerificationError at the end."""
        fetched = 0
        index = 0
        # Only the first skipped chunk's error is kept: a step's futures hold their
        # chunks' bytes, and keeping every step's (as once) held the whole layer.
        first_error: ChunkFetchError | None = None
        while index < self.layer.span_count:
            if before_request is not None:
                await before_request()
            await self._give_way()
            task = asyncio.create_task(self._background_step(index))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # Shielded: if fetch_all is cancelled, the request under way still serves
            # the readers that wait for its chunks.
            index, nbytes, step_futures = await asyncio.shield(task)
            if nbytes:
                crash_point("fetch.background")
            fetched += nbytes
            for future in step_futures.values():
                error = future.exception()
                if error is None:
                    continue
                if not isinstance(error, ChunkFetchError):
                    raise error
                first_error = first_error or error
            del step_futures
            if self._bucket is not None and nbytes:
                await self._bucket.spend(nbytes)
        await self.settled()  # chunks that other requests are fetching
        if first_error is not None:
            raise first_error
        return fetched

    async def _give_way(self) -> None:
        """Wait for GIVE_WAY_QUIET seconds without FUSE requests, at most GIVE_WAY_MAX."""
        if self._foreground_idle is None:
            return
        waited = 0.0
        while waited < GIVE_WAY_MAX and (idle := self._foreground_idle()) < GIVE_WAY_QUIET:
            pause = min(GIVE_WAY_QUIET - idle, GIVE_WAY_MAX - waited)
            await asyncio.sleep(pause)
            waited += pause

    async def _background_step(self, index: int
                               ) -> tuple[int, int, dict[str, asyncio.Future[bytes]]]:
        """One background request from span `index` on: (next index, bytes, futures)."""
        async with self._slots.slot(background=True):
            # Planned once the slot is ours, so chunks that reads fetched meanwhile are
            # skipped and no reader waits for a request that is still queued.
            spans = self.layer.span_count
            while True:
                index, run, futures = await self._plan_background(index, spans)
                if run or index == spans:
                    break
                index += 1  # its first span went in flight meanwhile
            if not run:
                return index, 0, {}
            nbytes = await self._transfer(run, futures, BACKGROUND)
            return index + len(run), nbytes, futures

    async def _plan_background(self, index: int, stop: int
                               ) -> tuple[int, list[Span], dict[str, asyncio.Future[bytes]]]:
        """The first span at or after `index` that the cache lacks (`stop` if none), the
        run from it and the run's registered futures. The run is empty if that span's
        chunks went in flight meanwhile.

        The cache and index lookups run in a worker thread: over a layer of tiny files
        they took milliseconds per run on the loop. The loop then registers the run a
        slice at a time and ends it before the first span that is no longer needed
        (in flight, or settled by another request while this was planned)."""
        self._settled_meanwhile = settled = set()
        run: list[Span] = []
        futures: dict[str, asyncio.Future[bytes]] = {}
        try:
            index = await asyncio.to_thread(self._next_uncached, index, stop)
            if index == stop:
                return index, run, futures
            budget = min(self.max_request_bytes, BACKGROUND_REQUEST_BYTES)
            planned, cached = await asyncio.to_thread(
                self._run_from, index, budget, stop, RUN_CHUNKS)
            for start in range(0, len(planned), LOOP_SLICE):
                if start:
                    await asyncio.sleep(0)
                known = cached | settled if settled else cached
                piece = []
                for span in planned[start:start + LOOP_SLICE]:
                    if not self._needed(span, known, as_neighbour=bool(run or piece)):
                        break
                    piece.append(span)
                futures.update(self._register(piece, known))
                run += piece
                if len(piece) < len(planned[start:start + LOOP_SLICE]):
                    break
            return index, run, futures
        except BaseException:  # cancelled between slices: registered futures must not hang
            self._fail(futures, ChunkFetchError("the fetch was cancelled"))
            raise
        finally:
            self._settled_meanwhile = None

    @staticmethod
    async def _raise_first(futures: Iterable[asyncio.Future[bytes]]) -> None:
        for future in futures:
            await asyncio.shield(future)

    async def settled(self) -> None:
        """Wait until the requests under way have ended: their chunks cached, or
        failed. (A reader has its chunks when they are verified, a little earlier.)"""
        await asyncio.gather(*(asyncio.shield(f) for f in list(self._inflight.values())),
                             *(asyncio.shield(t) for t in list(self._tasks)),
                             return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel the requests under way; their readers get ChunkFetchError."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _holds(span: Span, digests: dict[str, str]) -> bool:
    return any(chunk.digest in digests for chunk in span.chunks)


def _adjacent_groups(spans: list[Span]) -> list[list[Span]]:
    groups: list[list[Span]] = []
    for span in spans:
        if groups and groups[-1][-1].offset < span.offset <= groups[-1][-1].end:
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups
