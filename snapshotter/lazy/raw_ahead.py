"""A layer's prefetch region fetched as raw blob bytes while its index is still being
built (lazy.pull_ahead).

Building a layer's index from its TOC is CPU work: about a second for the 340 kB
TOC of the node image's large layer on a loaded 2-core node, and the chunks of the
prefetch region are known only after it. The region itself is known at once: it
ends at the offset of the TOC's prefetch landmark. So its bytes are requested as
soon as the TOC is verified, and the layer's fetcher, once it exists, takes its
requests' bytes from here instead of the registry. The fetcher still verifies every
chunk, so these bytes are trusted no more than the registry's.

Each byte is handed out once: a second request for bytes already served (the
fetcher's retry of a chunk that failed verification) goes to the registry. Pieces
are dropped once served whole, and everything is dropped when the layer's first
prefetch ends.
"""

import asyncio
import json
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from estargz.errors import FormatError
from estargz.footer import Footer
from estargz.reader import spool_toc_json
from estargz.toc import PREFETCH_LANDMARK

PIECE_BYTES = 8 << 20  # one request each, all under way at once
MAX_BYTES = 256 << 20  # of one layer's region fetched this way, at most


def landmark_offset(footer: Footer, toc_bytes: bytes, toc_digest: str,
                    max_toc_size: int) -> int | None:
    """Where the prefetch region ends: the offset of the TOC's prefetch landmark, if
    the TOC (checked against its digest) has one. Cheap beside the index build: one
    decompression and a JSON parse in C."""
    try:
        with tempfile.TemporaryFile() as spooled:
            if spool_toc_json(footer, toc_bytes, max_toc_size, spooled) != toc_digest:
                return None  # the index build says why
            spooled.seek(0)
            doc = json.load(spooled)
    except (FormatError, ValueError, RecursionError):
        return None  # the index build says why
    entries = doc.get("entries") if isinstance(doc, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("name") == PREFETCH_LANDMARK:
            offset = entry.get("offset")
            if isinstance(offset, int) and not isinstance(offset, bool) and offset > 0:
                return offset
            return None
    return None


@dataclass
class _Piece:
    offset: int
    end: int
    task: "asyncio.Task[bytes]"
    served: int = 0  # bytes handed out
    failed: bool = False


@dataclass
class RawAhead:
    """Bytes [0, stop) of one blob, fetched in pieces through `read_range`."""

    read_range: Callable[[int, int], Awaitable[bytes]]
    stop: int
    _pieces: list[_Piece] = field(default_factory=list)
    _served: list[tuple[int, int]] = field(default_factory=list)
    _closed: bool = False

    def start(self) -> "RawAhead":
        self.stop = min(self.stop, MAX_BYTES)
        for offset in range(0, self.stop, PIECE_BYTES):
            end = min(offset + PIECE_BYTES, self.stop)
            task = asyncio.create_task(self.read_range(offset, end - offset))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._pieces.append(_Piece(offset, end, task))
        return self

    def _usable(self, offset: int, end: int) -> bool:
        if self._closed or offset >= self.stop:
            return False
        if any(a < end and offset < b for a, b in self._served):
            return False  # a retry: the registry's bytes, not these again
        return not any(p.failed and p.offset < end and offset < p.end for p in self._pieces)

    async def read(self, offset: int, length: int,
                   fetch: Callable[[int, int], Awaitable[bytes]]) -> bytes:
        """Bytes offset..offset+length: from the pieces where they can be, the rest
        through `fetch` (the registry)."""
        end = offset + length
        if length <= 0 or not self._usable(offset, min(end, self.stop)):
            return await fetch(offset, length)
        head_end = min(end, self.stop)
        self._served.append((offset, head_end))
        tail = asyncio.ensure_future(fetch(head_end, end - head_end)) if end > head_end \
            else None
        try:
            parts = []
            for piece in [p for p in self._pieces if p.offset < head_end and offset < p.end]:
                try:
                    data = await asyncio.shield(piece.task)
                except Exception:
                    piece.failed = True
                    raise
                if len(data) != piece.end - piece.offset:
                    piece.failed = True
                    raise ValueError(f"a range request for {piece.end - piece.offset} bytes "
                                     f"at {piece.offset} got {len(data)}")
                start, stop = max(offset, piece.offset), min(head_end, piece.end)
                parts.append(data[start - piece.offset:stop - piece.offset])
                piece.served += stop - start
                if piece.served >= piece.end - piece.offset:
                    self._pieces.remove(piece)  # its bytes are in the fetcher's hands
            if tail is not None:
                parts.append(await tail)
            return b"".join(parts)
        except BaseException:
            self._served.remove((offset, head_end))  # not handed out: may be asked again
            if tail is not None:
                tail.cancel()
            raise

    def close(self) -> None:
        """Drop what is left: the layer's prefetch is over."""
        self._closed = True
        for piece in self._pieces:
            piece.task.cancel()
        self._pieces.clear()

