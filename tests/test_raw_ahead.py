"""RawAhead: a blob's prefetch region fetched before its index exists, handed to the
layer's fetcher once, byte for byte. The registry here is a bytes object behind a
read_range that logs every request."""

import asyncio
import os

import pytest

from snapshotter.lazy import raw_ahead
from snapshotter.lazy.raw_ahead import RawAhead

BLOB = os.urandom(3 << 20)


class Blob:
    def __init__(self, fail_first: int = 0):
        self.requests: list[tuple[int, int]] = []
        self.fail_first = fail_first

    async def read_range(self, offset: int, length: int) -> bytes:
        self.requests.append((offset, length))
        await asyncio.sleep(0)
        if len(self.requests) <= self.fail_first:
            raise OSError("registry down")
        return BLOB[offset:offset + length]


def test_bytes_come_once_from_the_pieces_then_from_the_registry(monkeypatch) -> None:
    monkeypatch.setattr(raw_ahead, "PIECE_BYTES", 1 << 20)
    ahead, registry = Blob(), Blob()

    async def run() -> None:
        raw = RawAhead(ahead.read_range, [(0, 2_500_000)]).start()
        await asyncio.sleep(0)  # the pieces' requests go out
        assert ahead.requests == [(0, 1 << 20), (1 << 20, 1 << 20),
                                  (2 << 20, 2_500_000 - (2 << 20))]
        # Across two pieces, and past the region's end: the tail from the registry.
        assert await raw.read(1_000_000, 2_000_000, registry.read_range) == \
            BLOB[1_000_000:3_000_000]
        assert registry.requests == [(2_500_000, 500_000)]
        assert await raw.read(0, 1_000_000, registry.read_range) == BLOB[:1_000_000]
        assert len(registry.requests) == 1
        # A retry of bytes handed out already: the registry's, not the same ones again.
        assert await raw.read(500_000, 10, registry.read_range) == BLOB[500_000:500_010]
        assert registry.requests[-1] == (500_000, 10)
        assert len(ahead.requests) == 3
        raw.close()
        assert await raw.read(0, 10, registry.read_range) == BLOB[:10]
        assert registry.requests[-1] == (0, 10)

    asyncio.run(run())


def test_a_failed_piece_fails_its_read_and_sends_later_ones_to_the_registry() -> None:
    ahead, registry = Blob(fail_first=1), Blob()

    async def run() -> None:
        raw = RawAhead(ahead.read_range, [(0, 1_000_000)]).start()
        with pytest.raises(OSError):
            await raw.read(0, 1000, registry.read_range)
        assert registry.requests == []
        assert await raw.read(0, 1000, registry.read_range) == BLOB[:1000]
        assert registry.requests == [(0, 1000)]

    asyncio.run(run())


def test_gaps_in_the_region_come_from_the_registry(monkeypatch) -> None:
    monkeypatch.setattr(raw_ahead, "PIECE_BYTES", 1 << 20)
    ahead, registry = Blob(), Blob()

    async def run() -> None:
        # An unread chunk's member at 1 MiB .. 2 MiB is left out of the region.
        raw = RawAhead(ahead.read_range, [(0, 1 << 20), (2 << 20, 2_500_000)]).start()
        assert await raw.read(0, 2_500_000, registry.read_range) == BLOB[:2_500_000]
        assert sorted(ahead.requests) == [(0, 1 << 20), (2 << 20, 2_500_000 - (2 << 20))]
        assert registry.requests == [(1 << 20, 1 << 20)]

    asyncio.run(run())
