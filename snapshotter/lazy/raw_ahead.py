"""A layer's prefetch region fetched as raw blob bytes while its index is still being
built (lazy.pull_ahead).

Building a layer's index from its TOC is CPU work: about a second for the 340 kB
TOC of the node image's large layer on a loaded 2-core node, and the chunks of the
prefetch region are known only after it. The region itself is known at once: it
ends at the offset of the TOC's prefetch landmark (less the members of chunks the
layer's read ranges say went unread, lazy.prefetch_plan). So its bytes are requested as
soon as the TOC is verified, and the layer's fetcher, once it exists, takes its
requests' bytes from here instead of the registry. The fetcher still verifies every
chunk, so these bytes are trusted no more than the registry's.

Each piece's bytes are handed out as they arrive, not when its request ends: the
region is in the order the workload first read it, so a reader waits for the bytes it
needs, not for those behind them in the same request.

Each byte is handed out once: a second request for bytes already served (the
fetcher's retry of a chunk that failed verification) goes to the registry. Pieces
are dropped once served whole, and everything is dropped when the layer's first
prefetch ends.
"""

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

# One request each, at most STREAMS of a layer's at once, in blob order. Their bytes
# are handed out as they arrive, so a reader waits for the bytes it needs, not for the
# rest of their request. A single stream does not fill a 100 Mbit link at 40 ms;
# several, each kept busy by the next piece, do. At 100 Mbit python's start took 1.07 s
# with 4 pieces of 1 MiB at a time, 1.18 s with 2 of 4 MiB (gcc's and node's, whose
# starts wait for nearly all of their regions, 0.05 to 0.1 s longer with 2).
PIECE_BYTES = 1 << 20
STREAMS = 4
# The layer's fetcher takes the region in runs of this much (not its 1 MiB prefetch
# requests): each run is verified and handed to its readers once its bytes are in, so
# this is how far behind the wire a reader may wait.
FETCHER_RUN_BYTES = 256 << 10
# Of one layer's region fetched this way, at most: the pieces are held in memory until
# the fetcher takes them (after the index build); the rest is the fetcher's to fetch.
MAX_BYTES = 64 << 20
log = logging.getLogger(__name__)


def _pieces_of(region: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for start, stop in region:
        for offset in range(start, stop, PIECE_BYTES):
            yield offset, min(offset + PIECE_BYTES, stop)


@dataclass
class _Piece:
    """A range request's bytes as they arrive; readers wait for a prefix of them."""

    offset: int
    end: int
    data: bytearray = field(default_factory=bytearray)
    task: "asyncio.Task[None] | None" = None
    served: int = 0  # bytes handed out
    failed: bool = False
    error: BaseException | None = None
    # (bytes wanted from the piece's start, future) of the readers waiting: a few at most
    _waiting: list[tuple[int, "asyncio.Future[None]"]] = field(default_factory=list)

    def arrived(self, data: bytes) -> None:
        if len(self.data) + len(data) > self.end - self.offset:
            raise ValueError(f"a range request for {self.end - self.offset} bytes at "
                             f"{self.offset} got more")
        self.data += data
        self._wake(lambda wanted: wanted <= len(self.data))

    def ended(self, error: BaseException | None) -> None:
        if error is None and len(self.data) != self.end - self.offset:
            error = ValueError(f"a range request for {self.end - self.offset} bytes at "
                               f"{self.offset} got {len(self.data)}")
        self.error = error
        self._wake(lambda wanted: True)

    def _wake(self, ready: Callable[[int], bool]) -> None:
        waiting = []
        for wanted, future in self._waiting:
            if not ready(wanted):
                waiting.append((wanted, future))
            elif not future.done():
                future.set_result(None)
        self._waiting = waiting

    async def prefix(self, length: int) -> None:
        """Until the piece's first `length` bytes are here; raises its request's
        failure if they never will be."""
        if len(self.data) < length and self.error is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting.append((length, future))
            await future
        if len(self.data) < length:
            raise self.error or ValueError("the piece's request ended early")


@dataclass
class RawAhead:
    """The blob's bytes in `region` ([start, end) ranges, in order), fetched in pieces
    through `stream_range` (offset, length -> the bytes as they arrive)."""

    stream_range: Callable[[int, int], AsyncIterator[bytes]]
    region: list[tuple[int, int]]
    name: str = ""  # the layer, in log lines
    _pieces: list[_Piece] = field(default_factory=list)
    _count: int = 0  # pieces requested
    _arrived: int = 0  # of them, those whose request ended
    _started: float = 0.0
    _served: list[tuple[int, int]] = field(default_factory=list)
    _closed: bool = False

    def start(self) -> "RawAhead":
        pieces, budget = [], MAX_BYTES
        for offset, end in _pieces_of(self.region):
            if end - offset > budget:
                break
            budget -= end - offset
            pieces.append(_Piece(offset, end))
        streams = asyncio.Semaphore(STREAMS)  # first come, first served: blob order
        for piece in pieces:
            piece.task = asyncio.create_task(self._read_piece(streams, piece))
            piece.task.add_done_callback(functools.partial(self._ended, piece))
            self._pieces.append(piece)
        self._started, self._count = time.monotonic(), len(pieces)
        log.info("layer %s: %d bytes of its prefetch region requested ahead in %d pieces",
                 self.name, sum(p.end - p.offset for p in pieces), len(pieces))
        return self

    def _ended(self, piece: _Piece, task: "asyncio.Task[None]") -> None:
        # A callback, not a `finally`: it also runs for a task cancelled before it started.
        if task.cancelled():
            piece.ended(asyncio.CancelledError())
            return
        piece.ended(task.exception())
        if task.exception() is not None:
            return
        self._arrived += 1
        if self._arrived == self._count:
            log.info("layer %s: its prefetch region arrived ahead in %.3fs", self.name,
                     time.monotonic() - self._started)

    async def _read_piece(self, streams: asyncio.Semaphore, piece: _Piece) -> None:
        async with streams, contextlib.aclosing(
                self.stream_range(piece.offset, piece.end - piece.offset)) as body:
            async for data in body:
                piece.arrived(data)

    def _meeting(self, offset: int, end: int) -> list[_Piece]:
        """The pieces with bytes in [offset, end), if those bytes may come from them:
        none handed out before (a retry gets the registry's) and no piece failed."""
        if self._closed or any(a < end and offset < b for a, b in self._served):
            return []
        pieces = [p for p in self._pieces if p.offset < end and offset < p.end]
        return [] if any(p.failed for p in pieces) else pieces

    async def read(self, offset: int, length: int,
                   fetch: Callable[[int, int], Awaitable[bytes]]) -> bytes:
        """Bytes offset..offset+length: from the pieces where they can be, the gaps
        between them through `fetch` (the registry)."""
        end = offset + length
        pieces = self._meeting(offset, end) if length > 0 else []
        if not pieces:
            return await fetch(offset, length)
        self._served.append((offset, end))
        parts: list[asyncio.Future[bytes]] = []
        position = offset
        try:
            for piece in pieces:
                if position < piece.offset:
                    parts.append(asyncio.ensure_future(fetch(position, piece.offset - position)))
                parts.append(asyncio.ensure_future(self._take(piece, max(offset, piece.offset),
                                                              min(end, piece.end))))
                position = min(end, piece.end)
            if position < end:
                parts.append(asyncio.ensure_future(fetch(position, end - position)))
            return b"".join(await asyncio.gather(*parts))
        except BaseException:
            self._served.remove((offset, end))  # not handed out: may be asked again
            for part in parts:
                part.cancel()
            raise

    async def _take(self, piece: _Piece, start: int, stop: int) -> bytes:
        try:
            await piece.prefix(stop - piece.offset)
        except Exception:
            piece.failed = True
            raise
        piece.served += stop - start
        if piece.served >= piece.end - piece.offset and piece in self._pieces:
            self._pieces.remove(piece)  # its bytes are all in the fetcher's hands
        with memoryview(piece.data) as view:  # one copy, not two
            return bytes(view[start - piece.offset:stop - piece.offset])

    def close(self) -> None:
        """Drop what is left: the layer's prefetch is over."""
        self._closed = True
        for piece in self._pieces:
            if piece.task is not None:
                piece.task.cancel()
        self._pieces.clear()
