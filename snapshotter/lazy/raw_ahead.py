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

Each byte is handed out once: a second request for bytes already served (the
fetcher's retry of a chunk that failed verification) goes to the registry. Pieces
are dropped once served whole, and everything is dropped when the layer's first
prefetch ends.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

# One request each, at most STREAMS of a layer's at once, in blob order: the pieces
# then arrive one after another and the fetcher verifies each while the next ones
# come, where pieces all under way at once (8 MiB each, as before) shared the link and
# all arrived at its end, the verification of the whole region still to come. A
# single stream does not fill a 100 Mbit link at 40 ms; several, each ramped up and
# kept busy by the next piece, do.
PIECE_BYTES = 1 << 20
STREAMS = 4
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
    offset: int
    end: int
    task: "asyncio.Task[bytes]"
    served: int = 0  # bytes handed out
    failed: bool = False


@dataclass
class RawAhead:
    """The blob's bytes in `region` ([start, end) ranges, in order), fetched in pieces
    through `read_range`."""

    read_range: Callable[[int, int], Awaitable[bytes]]
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
            pieces.append((offset, end))
        streams = asyncio.Semaphore(STREAMS)  # first come, first served: blob order
        for offset, end in pieces:
            task = asyncio.create_task(self._read_piece(streams, offset, end - offset))
            task.add_done_callback(self._arrival)
            self._pieces.append(_Piece(offset, end, task))
        self._started, self._count = time.monotonic(), len(pieces)
        log.info("layer %s: %d bytes of its prefetch region requested ahead in %d pieces",
                 self.name, sum(end - offset for offset, end in pieces), len(pieces))
        return self

    def _arrival(self, task: "asyncio.Task[bytes]") -> None:
        if task.cancelled() or task.exception() is not None:
            return
        self._arrived += 1
        if self._arrived == self._count:
            log.info("layer %s: its prefetch region arrived ahead in %.3fs", self.name,
                     time.monotonic() - self._started)

    async def _read_piece(self, streams: asyncio.Semaphore, offset: int, length: int
                          ) -> bytes:
        async with streams:
            return await self.read_range(offset, length)

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
            data = await asyncio.shield(piece.task)
        except Exception:
            piece.failed = True
            raise
        if len(data) != piece.end - piece.offset:
            piece.failed = True
            raise ValueError(f"a range request for {piece.end - piece.offset} bytes at "
                             f"{piece.offset} got {len(data)}")
        piece.served += stop - start
        if piece.served >= piece.end - piece.offset and piece in self._pieces:
            self._pieces.remove(piece)  # its bytes are all in the fetcher's hands
        return data[start - piece.offset:stop - piece.offset]

    def close(self) -> None:
        """Drop what is left: the layer's prefetch is over."""
        self._closed = True
        for piece in self._pieces:
            piece.task.cancel()
        self._pieces.clear()
