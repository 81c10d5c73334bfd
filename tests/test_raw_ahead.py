"""RawAhead: a blob's prefetch region fetched before its index exists, handed to the
layer's fetcher once, byte for byte, as its bytes arrive. The registry here is a bytes
object behind a read_range (and stream_range) that logs every request."""

import asyncio
import functools
import io
import os
import tarfile
import tracemalloc
from collections.abc import AsyncIterator

import pytest

import estargz
from estargz import prefetch_region
from estargz.prefetch_region import region_to_fetch
from estargz.read_ranges import MARGIN_BYTES
from estargz.reader import spool_toc_json
from snapshotter.lazy import raw_ahead
from snapshotter.lazy.raw_ahead import RawAhead

BLOB = os.urandom(3 << 20)


class Blob:
    def __init__(self, fail_first: int = 0):
        self.requests: list[tuple[int, int]] = []
        self.fail_first = fail_first

    async def read_range(self, offset: int, length: int) -> bytes:
        return b"".join([part async for part in self.stream_range(offset, length)])

    async def stream_range(self, offset: int, length: int) -> AsyncIterator[bytes]:
        self.requests.append((offset, length))
        await asyncio.sleep(0)
        if len(self.requests) <= self.fail_first:
            raise OSError("registry down")
        for start in range(offset, offset + length, 64 << 10):
            yield BLOB[start:min(start + (64 << 10), offset + length)]
            await asyncio.sleep(0)


def test_bytes_come_once_from_the_pieces_then_from_the_registry(monkeypatch) -> None:
    monkeypatch.setattr(raw_ahead, "PIECE_BYTES", 1 << 20)
    ahead, registry = Blob(), Blob()

    async def run() -> None:
        raw = RawAhead(ahead.stream_range, [(0, 2_500_000)]).start()
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
        raw = RawAhead(ahead.stream_range, [(0, 1_000_000)]).start()
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
        raw = RawAhead(ahead.stream_range, [(0, 1 << 20), (2 << 20, 2_500_000)]).start()
        assert await raw.read(0, 2_500_000, registry.read_range) == BLOB[:2_500_000]
        assert sorted(ahead.requests) == [(0, 1 << 20), (2 << 20, 2_500_000 - (2 << 20))]
        assert registry.requests == [(1 << 20, 1 << 20)]

    asyncio.run(run())


# -- the region, from the TOC -------------------------------------------------------------

def prioritized_blob(extra_files: int) -> tuple[bytes, "estargz.BuildResult"]:
    """An eStargz blob whose prefetch region holds app/big (1 MiB, chunks of 64 KiB)
    and app/small, followed by `extra_files` small files."""
    files = {"app/big": os.urandom(1 << 20), "app/small": b"hello\n"}
    files.update({f"lib/f{i:06d}": f"file {i}\n".encode() for i in range(extra_files)})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    result = estargz.build(io.BytesIO(buf.getvalue()), out, estargz.BuildOptions(
        chunk_size=64 << 10, prioritized_files=["app/big", "app/small"]))
    return out.getvalue(), result


def toc_of(blob: bytes) -> tuple["estargz.Footer", bytes]:
    footer = estargz.parse_footer(blob[-estargz.footer.MAX_FOOTER_SIZE:], len(blob))
    return footer, blob[footer.toc_offset:footer.toc_offset + footer.toc_length]


def test_the_region_ends_at_the_landmark_less_the_unread_members() -> None:
    blob, result = prioritized_blob(extra_files=50)
    footer, toc = toc_of(blob)
    layer = estargz.load_toc(footer, toc, result.toc_digest)
    end = layer.prefetch_end
    assert end and end < len(blob)
    region = functools.partial(region_to_fetch, footer, toc, result.toc_digest,
                               1 << 30)
    assert region() == [(0, end)]
    assert region({"lib/f000001": [(0, 1)]}) == [(0, end)]  # a file after the region
    # app/big read in its first 64 KiB only: its chunks past the margin are left out.
    chunks = layer.lookup("app/big").chunks
    got = region({"app/big": [(0, 1)], "app/small": [(0, 6)]})
    kept = [(c.blob_offset, c.blob_end) for c in chunks if c.file_offset <= MARGIN_BYTES]
    left = [(c.blob_offset, c.blob_end) for c in chunks if c.file_offset > MARGIN_BYTES]
    assert left and kept

    def covered(start: int, stop: int) -> bool:
        return any(a <= start and stop <= b for a, b in got)

    assert all(covered(a, b) for a, b in kept)
    assert not any(covered(a, b) for a, b in left)
    small = layer.lookup("app/small").chunks[0]
    assert covered(small.blob_offset, small.blob_end) and got[-1][1] == end
    assert region({"app/big": [(0, 1)]}) == got  # app/small absent: kept whole
    assert region_to_fetch(footer, toc, "sha256:" + "0" * 64, 1 << 30) == []
    layer.close()


def test_a_large_toc_is_left_to_the_index_build_and_a_small_one_parsed_lean(
        monkeypatch) -> None:
    """The TOC's JSON is parsed only up to MAX_TOC_JSON_BYTES, and keeps what the region
    needs: the parse takes little more than the JSON's own text."""
    blob, result = prioritized_blob(extra_files=20_000)
    footer, toc = toc_of(blob)
    spooled = io.BytesIO()
    spool_toc_json(footer, toc, 1 << 30, spooled)
    json_bytes = len(spooled.getvalue())
    read = {"app/big": [(0, 1)]}
    tracemalloc.start()
    try:
        region = region_to_fetch(footer, toc, result.toc_digest, 1 << 30, read)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert region and peak < 3 * json_bytes
    monkeypatch.setattr(prefetch_region, "MAX_TOC_JSON_BYTES", json_bytes - 1)
    assert region_to_fetch(footer, toc, result.toc_digest, 1 << 30, read) == []


def test_pieces_come_in_blob_order_a_few_streams_at_a_time(monkeypatch) -> None:
    """At most STREAMS requests at once, started in blob order, so the first pieces
    arrive (and are verified) while later ones are on their way."""
    monkeypatch.setattr(raw_ahead, "PIECE_BYTES", 100_000)
    monkeypatch.setattr(raw_ahead, "STREAMS", 3)
    in_flight, most, started = 0, 0, []
    release = asyncio.Event()

    async def stream_range(offset: int, length: int) -> AsyncIterator[bytes]:
        nonlocal in_flight, most
        started.append(offset)
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        await asyncio.sleep(0.001 * (offset // 100_000 % 2))  # finish out of order
        in_flight -= 1
        yield BLOB[offset:offset + length]

    async def run() -> None:
        raw = RawAhead(stream_range, [(0, 1_000_000)]).start()
        await asyncio.sleep(0.01)
        assert started == [0, 100_000, 200_000]  # the first three, and no more yet
        release.set()
        assert await raw.read(0, 1_000_000, Blob().read_range) == BLOB[:1_000_000]

    asyncio.run(run())
    assert started == list(range(0, 1_000_000, 100_000)) and most == 3


def test_a_pieces_first_bytes_are_handed_out_before_its_request_ends() -> None:
    """A reader of the first bytes of a piece gets them as soon as they are in; one of
    bytes further on waits for those; a request that breaks fails only the readers of
    bytes that never came."""
    sent = asyncio.Queue[bytes | Exception]()

    async def stream_range(offset: int, length: int) -> AsyncIterator[bytes]:
        while True:
            part = await sent.get()
            if isinstance(part, Exception):
                raise part
            yield part

    async def run() -> None:
        registry = Blob()
        raw = RawAhead(stream_range, [(0, 300_000)]).start()
        sent.put_nowait(BLOB[:100_000])
        assert await asyncio.wait_for(raw.read(0, 60_000, registry.read_range), 5) == \
            BLOB[:60_000]
        later = asyncio.ensure_future(raw.read(60_000, 90_000, registry.read_range))
        await asyncio.sleep(0.01)
        assert not later.done()  # bytes 100_000.. are not here yet
        sent.put_nowait(BLOB[100_000:200_000])
        assert await asyncio.wait_for(later, 5) == BLOB[60_000:150_000]
        beyond = asyncio.ensure_future(raw.read(150_000, 100_000, registry.read_range))
        sent.put_nowait(OSError("connection reset"))
        with pytest.raises(OSError):
            await asyncio.wait_for(beyond, 5)
        assert registry.requests == []
        # The piece failed: what is asked from here on comes from the registry.
        assert await raw.read(200_000, 100_000, registry.read_range) == \
            BLOB[200_000:300_000]
        assert registry.requests == [(200_000, 100_000)]

    asyncio.run(run())


def test_a_piece_longer_than_asked_fails_its_readers() -> None:
    async def stream_range(offset: int, length: int) -> AsyncIterator[bytes]:
        yield BLOB[offset:offset + length + 1]

    async def run() -> None:
        raw = RawAhead(stream_range, [(0, 1000)]).start()
        with pytest.raises(ValueError):
            await raw.read(0, 10, Blob().read_range)

    asyncio.run(run())


def test_a_reader_of_a_piece_whose_request_never_started_is_told_when_it_is_dropped(
        monkeypatch) -> None:
    """close() drops pieces still waiting for a stream: a reader already waiting for
    one of them gets an error at once, not a wait until its deadline."""
    monkeypatch.setattr(raw_ahead, "PIECE_BYTES", 100_000)
    monkeypatch.setattr(raw_ahead, "STREAMS", 1)
    first_sent = asyncio.Event()

    async def stream_range(offset: int, length: int) -> AsyncIterator[bytes]:
        first_sent.set()
        await asyncio.Event().wait()  # the first piece never ends; the second never starts
        yield b""

    async def run() -> None:
        raw = RawAhead(stream_range, [(0, 200_000)]).start()
        await first_sent.wait()
        waiting = asyncio.ensure_future(raw.read(150_000, 10, Blob().read_range))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        raw.close()
        # The request's cancellation, as the piece's task had before it streamed.
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 5)

    asyncio.run(run())
