"""LayerFetcher against a real docker-registry on loopback: eStargz blobs built here are
pushed, then read through single-range requests, which the tests count at the client's
transport (an httpx hook) or at a fault-injecting proxy in front of the registry."""

import asyncio
import functools
import gc
import io
import itertools
import math
import random
import re
import tarfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import estargz
from oci import mediatypes as mt
from oci.digest import sha256_of
from oci.docker_config import StaticCredentials
from oci.manifest import Descriptor
from oci.reference import Reference
from oci.registry import RegistryClient, RetryPolicy
from oci.store import NotFoundError
from snapshotter.lazy import fetcher as fetcher_module
from snapshotter.lazy.chunk_cache import ChunkCache
from snapshotter.lazy.fetcher import (
    ChunkFetchError,
    LayerFetcher,
    RequestSlots,
    TokenBucket,
)
from snapshotter.lazy.metrics import REGISTRY
from tests.fixtures.fault_proxy import WireFault
from tests.fixtures.registry import RegistryServer
from tests.layers import big_payload

KiB = 1024
CHUNK_SIZE = 64 * KiB
SMALL_FILES = [f"app/lib/pkg{d}/mod{i:02d}.py" for d in range(10) for i in range(20)]
PRIORITIZED = ["app/bin/python", "app/etc/settings.toml", "app/lib/pkg3/mod05.py"]
_WORDS = ["import", "def", "return", "self", "class", "for", "in", "if", "else", "with",
          "yield", "async", "await", "lambda", "print", "len", "range", "dict", "list",
          "tuple", "open", "path", "data", "value", "name", "node", "chunk", "offset",
          "layer", "cache", "fetch", "read", "write", "error", "None", "True", "False"]
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


def source_text(rng: random.Random, size: int) -> bytes:
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words).encode()[:size]


def layer_files(seed: int, shared: bytes | None = None) -> dict[str, bytes]:
    """Many small source files, a few files of several chunks, and the prioritized ones."""
    rng = random.Random(seed)
    files = {
        "app/bin/python": big_payload(150_000, seed=seed),
        "app/etc/settings.toml": source_text(rng, 900),
    }
    for name in SMALL_FILES:
        files[name] = source_text(rng, rng.randrange(300, 3000))
    for index in range(3):
        files[f"app/data/blob{index}.bin"] = big_payload(150_000 + 60_000 * index,
                                                        seed=seed * 10 + index)
    if shared is not None:
        files["app/data/shared.bin"] = shared
    return files


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    directories: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            parts = name.split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    directories.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class Blob:
    path: Path
    digest: str
    size: int
    layer: estargz.Layer
    files: dict[str, bytes]
    reference: Reference

    def node(self, name: str) -> estargz.Node:
        node = self.layer.lookup(name)
        assert node is not None, name
        return node

    def span_of(self, name: str) -> tuple[int, int]:
        chunks = self.node(name).chunks
        return chunks[0].blob_offset, chunks[-1].blob_end


def build_and_push(directory: Path, registry: RegistryServer, repository: str,
                   files: dict[str, bytes], chunk_size: int = CHUNK_SIZE) -> Blob:
    path = directory / f"{repository.replace('/', '-')}.blob"
    with open(path, "wb") as out:
        result = estargz.build(io.BytesIO(make_tar(files)), out, estargz.BuildOptions(
            chunk_size=chunk_size, prioritized_files=PRIORITIZED, workers=2))
    with estargz.FileSource.open(str(path)) as source:
        layer = estargz.BlobReader.open(source, result.toc_digest).layer
    reference = Reference.parse(f"{registry.host}/{repository}")
    descriptor = Descriptor(mt.OCI_LAYER_GZIP, sha256_of(path.read_bytes()), result.blob_size)

    async def push() -> None:
        async with make_client() as client:
            await client.push_blob(reference, descriptor, str(path))

    run(push())
    return Blob(path, descriptor.digest, descriptor.size, layer, files, reference)


class RangeLog:
    """An httpx request hook that records the byte ranges asked of the registry."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []  # (offset, end)

    async def __call__(self, request: httpx.Request) -> None:
        match = _RANGE.fullmatch(request.headers.get("range", ""))
        if request.method == "GET" and "/blobs/" in request.url.path and match:
            self.ranges.append((int(match[1]), int(match[2]) + 1))

    def covering(self, offset: int, end: int) -> int:
        return sum(1 for first, last in self.ranges if first < end and offset < last)

    def assert_no_byte_fetched_twice(self) -> None:
        ordered = sorted(self.ranges)
        for (_, end), (start, _) in itertools.pairwise(ordered):
            assert end <= start, f"ranges overlap: {ordered}"


def make_client(log: RangeLog | None = None) -> RegistryClient:
    # trust_env=False: no proxy from the environment, so traffic stays on loopback.
    return RegistryClient(credentials=StaticCredentials({}), trust_env=False,
                          retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.05),
                          event_hooks={"request": [log]} if log else None)


def reader_of(client: RegistryClient, blob: Blob,
              reference: Reference | None = None) -> Callable[[int, int], Awaitable[bytes]]:
    return functools.partial(client.fetch_range, reference or blob.reference, blob.digest)


def new_cache(directory: Path) -> ChunkCache:
    return ChunkCache(str(directory), max_bytes=64 << 20, memory_bytes=1 << 20,
                      memory_item_limit=16 * KiB)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def blob(registry, tmp_path_factory) -> Blob:
    return build_and_push(tmp_path_factory.mktemp("blob"), registry, "lazy/app",
                          layer_files(seed=1))


def small_files_in_toc_order(blob: Blob) -> list[str]:
    """The non-prioritized small files in the order the TOC (and the blob) holds them."""
    wanted = set(SMALL_FILES) - set(PRIORITIZED)
    with estargz.FileSource.open(str(blob.path)) as source:
        entries = estargz.reader.iter_blob_toc(source, blob.layer.footer)
        return [e.name for e in entries if e.type == "reg" and e.name in wanted]


# -- reading ------------------------------------------------------------------------------


def test_every_file_and_random_ranges_read_as_in_the_tar(blob, tmp_path):
    async def scenario() -> None:
        log = RangeLog()
        async with make_client(log) as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), new_cache(tmp_path))
            rng = random.Random(3)
            names = list(blob.files)
            for _ in range(150):  # random ranges first, while most chunks are missing
                name = rng.choice(names)
                data = blob.files[name]
                offset = rng.randrange(0, len(data) + 10)
                length = rng.randrange(0, 3 * CHUNK_SIZE)
                got = await fetcher.read(blob.node(name), offset, length)
                assert got == data[offset:offset + length], (name, offset, length)
            for name, data in blob.files.items():
                assert await fetcher.read(blob.node(name), 0, len(data) + 100) == data, name
            assert await fetcher.read(blob.node("app/bin/python"), 200_000, 10) == b""
            log.assert_no_byte_fetched_twice()
            assert fetcher.stats.demand_bytes == sum(end - start for start, end in log.ranges)
            assert fetcher.stats.demand_requests == len(log.ranges)
            with pytest.raises(estargz.FormatError):
                await fetcher.read(blob.node("app/lib"), 0, 10)

    run(scenario())


def test_concurrent_readers_of_one_chunk_send_one_request(blob, tmp_path):
    async def scenario() -> None:
        log = RangeLog()
        async with make_client(log) as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), new_cache(tmp_path),
                                   max_request_bytes=1)  # no neighbours: just this chunk
            node = blob.node("app/data/blob2.bin")
            chunk = node.chunks[1]
            expected = blob.files["app/data/blob2.bin"]
            results = await asyncio.gather(
                *(fetcher.chunk(chunk) for _ in range(20)),
                *(fetcher.read(node, chunk.file_offset + 7 * n, 100) for n in range(5)))
            assert log.ranges == [(chunk.blob_offset, chunk.blob_end)]
            assert all(r == expected[chunk.file_offset:chunk.file_offset + chunk.size]
                       for r in results[:20])
            for n, got in enumerate(results[20:]):
                start = chunk.file_offset + 7 * n
                assert got == expected[start:start + 100]
            assert await fetcher.chunk(chunk) == results[0]
            assert len(log.ranges) == 1

    run(scenario())


def test_small_files_read_in_toc_order_cost_few_requests(blob, tmp_path):
    names = small_files_in_toc_order(blob)
    spans = [blob.span_of(name) for name in names]
    region = spans[-1][1] - spans[0][0]
    largest = max(end - start for start, end in spans)

    async def read_all(window: int, cache_dir: Path, chunks: int = 256) -> RangeLog:
        log = RangeLog()
        async with make_client(log) as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), new_cache(cache_dir),
                                   window_bytes=window, window_chunks=chunks)
            for name in names:
                assert await fetcher.read(blob.node(name), 0, 1 << 20) == blob.files[name]
        return log

    window = 16 * KiB
    log = run(read_all(window, tmp_path / "small-window"))
    # Every request but the last fills its window to within one span.
    bound = math.ceil(region / (window - largest)) + 1
    assert len(names) == 199 and bound <= 20
    assert 1 < len(log.ranges) <= bound
    assert all(end - start <= window for start, end in log.ranges)
    log.assert_no_byte_fetched_twice()
    default = run(read_all(512 * KiB, tmp_path / "default-window"))
    assert len(default.ranges) <= math.ceil(region / (512 * KiB - largest)) + 1
    # A window also ends after so many chunks: tiny files fill it by count, not bytes.
    counted = run(read_all(512 * KiB, tmp_path / "counted-window", chunks=20))
    assert math.ceil(len(names) / 20) <= len(counted.ranges) <= len(default.ranges) + 10
    counted.assert_no_byte_fetched_twice()
    per_request = [sum(1 for start, end in counted.ranges if start <= s[0] < end)
                   for s in spans]
    assert max(per_request) == 1  # each small file's span came in exactly one request


def test_a_missed_chunk_is_handed_out_before_the_rest_of_its_window_arrives(blob, tmp_path):
    """With a streamed request, the small file that missed is read as soon as its bytes
    are in; the files behind it in the same window come from the same request later,
    and a request that breaks fails only the chunks it did not bring."""
    names = small_files_in_toc_order(blob)
    release, held = asyncio.Event(), []

    async def scenario(break_after_first: bool) -> None:
        log = RangeLog()
        async with make_client(log) as client:
            async def held_back(offset: int, length: int) -> AsyncIterator[bytes]:
                # The first span of the request, then (the first time) a pause or a break.
                index = blob.layer.span_index(offset)
                assert index is not None
                first_end = blob.layer.span(index).end - offset
                data = await client.fetch_range(blob.reference, blob.digest, offset, length)
                yield data[:first_end]
                if not held:
                    held.append(offset)
                    if break_after_first:
                        raise OSError("connection reset")
                    await release.wait()
                yield data[first_end:]

            cache = new_cache(tmp_path / ("broken" if break_after_first else "held"))
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), cache,
                                   stream_range=held_back)
            first = await asyncio.wait_for(fetcher.read(blob.node(names[0]), 0, 1 << 20), 10)
            assert first == blob.files[names[0]] and held
            second = blob.node(names[1]).chunks[0].digest
            if break_after_first:
                await asyncio.sleep(0.05)
                assert second not in fetcher._inflight  # failed, not remembered
                assert await fetcher.read(blob.node(names[1]), 0, 1 << 20) == \
                    blob.files[names[1]]
                assert len(log.ranges) == 2  # the held-back one, then a fresh request
                return
            assert second in fetcher._inflight  # still on its way, in the same request
            release.set()
            for name in names[1:10]:
                assert await fetcher.read(blob.node(name), 0, 1 << 20) == blob.files[name]
            assert len(log.ranges) == 1 and len(held) == 1

    run(scenario(break_after_first=False))
    held.clear()
    run(scenario(break_after_first=True))


def test_a_large_file_is_fetched_in_parallel_within_the_concurrency_limit(blob, tmp_path):
    async def scenario() -> None:
        async with make_client() as client:
            active, peak = 0, 0

            async def counting_read(offset: int, length: int) -> bytes:
                nonlocal active, peak
                active += 1
                peak = max(peak, active)
                try:
                    return await client.fetch_range(blob.reference, blob.digest, offset, length)
                finally:
                    active -= 1

            fetcher = LayerFetcher(blob.layer, counting_read, new_cache(tmp_path),
                                   max_request_bytes=CHUNK_SIZE, concurrency=2)
            name = "app/data/blob2.bin"
            assert await fetcher.read(blob.node(name), 0, 1 << 20) == blob.files[name]
            assert fetcher.stats.demand_requests == len(blob.node(name).chunks) == 5
            assert peak == 2

    run(scenario())


# -- prefetch and background --------------------------------------------------------------


def test_prefetch_then_reading_the_prioritized_files_sends_nothing(blob, tmp_path):
    async def scenario() -> None:
        log = RangeLog()
        before = sample("lazypull_fetch_bytes_total", kind="prefetch")
        async with make_client(log) as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), new_cache(tmp_path),
                                   max_request_bytes=96 * KiB)
            fetched = await fetcher.prefetch()
            end = blob.layer.prefetch_end
            assert end and all(last <= end for _, last in log.ranges)
            assert fetched == sum(last - first for first, last in log.ranges)
            assert fetched == fetcher.stats.prefetch_bytes
            assert sample("lazypull_fetch_bytes_total", kind="prefetch") == before + fetched
            assert 2 <= len(log.ranges) <= 4  # ~170 KB in requests of at most 96 KiB
            log.assert_no_byte_fetched_twice()
            sent = len(log.ranges)
            for name in PRIORITIZED:
                data = blob.files[name]
                assert await fetcher.read(blob.node(name), 0, len(data)) == data
            assert len(log.ranges) == sent and fetcher.stats.demand_requests == 0
            assert await fetcher.prefetch() == 0

    run(scenario())


def test_chunks_fetched_ahead_of_readers_stay_out_of_the_memory_tier(blob, tmp_path):
    """Prefetch and background fetch store on disk only (the FUSE manager's memory is
    for the chunks being read); a chunk enters the tier when it is read, and a
    reader's own request puts its chunks there at once."""
    async def scenario() -> None:
        cache = new_cache(tmp_path)
        async with make_client() as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), cache,
                                   background_bytes_per_second=200e6)
            assert await fetcher.prefetch() > 0
            assert await fetcher.fetch_all() > 0
            assert fetcher.is_complete() and len(cache) > 0
            assert cache.memory_size_bytes == 0
            name = PRIORITIZED[-1]
            assert await fetcher.read(blob.node(name), 0, 1 << 20) == blob.files[name]
            assert cache.memory_size_bytes > 0
            read_from_disk = cache.memory_size_bytes

            demand_cache = new_cache(tmp_path / "demand")
            demand = LayerFetcher(blob.layer, reader_of(client, blob), demand_cache)
            assert await demand.read(blob.node(name), 0, 1 << 20) == blob.files[name]
            assert demand.stats.demand_requests > 0
            assert demand_cache.memory_size_bytes >= read_from_disk

    run(scenario())


def test_reads_of_large_chunks_on_disk_take_only_their_part(registry, tmp_path):
    """A FUSE read of 128 KiB from a sealed 256 KiB chunk file reads those 128 KiB and
    keeps nothing in memory; a chunk file changed behind the cache's back is hashed,
    refused and fetched again."""
    files = {name: big_payload(1 << 20, seed=n) for n, name in enumerate(PRIORITIZED)}
    blob = build_and_push(tmp_path, registry, "lazy/large-chunks", files,
                          chunk_size=256 * KiB)

    async def scenario() -> None:
        cache = ChunkCache(str(tmp_path / "cache"), max_bytes=64 << 20,
                           memory_bytes=1 << 20, memory_item_limit=512 * KiB)
        async with make_client() as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), cache,
                                   background_bytes_per_second=200e6)
            assert await fetcher.fetch_all() > 0 and cache.memory_size_bytes == 0
            name = PRIORITIZED[0]
            node, data = blob.node(name), files[name]
            step = 128 * KiB
            for offset in range(0, len(data), step):
                assert await fetcher.read(node, offset, step) == data[offset:offset + step]
            assert cache.stats.sealed_range_reads == len(data) // step
            assert cache.stats.hashed_reads == 0 and cache.memory_size_bytes == 0
            assert fetcher.stats.demand_requests == 0
            chunk = node.chunks[1]
            path = Path(cache.path_of(chunk.digest))
            damaged = bytearray(path.read_bytes())
            damaged[7] ^= 0xFF
            path.write_bytes(bytes(damaged))
            offset = chunk.file_offset
            assert await fetcher.read(node, offset, step) == data[offset:offset + step]
            assert cache.stats.corrupt == 1 and fetcher.stats.demand_requests == 1

    run(scenario())


def test_prefetch_requests_are_at_most_prefetch_request_bytes(blob, tmp_path):
    """However large the fetcher's requests may be, a prefetch asks in pieces small
    enough to be verified while the next ones arrive."""

    async def scenario() -> None:
        log = RangeLog()
        async with make_client(log) as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), new_cache(tmp_path),
                                   max_request_bytes=8 << 20,
                                   prefetch_request_bytes=64 * KiB)
            fetched = await fetcher.prefetch()
            assert fetched >= 150_000 and len(log.ranges) >= 3
            # a request holds whole spans: one span alone may be larger than the limit
            largest = max(blob.layer.span(i).size for i in range(blob.layer.span_count))
            assert all(last - first <= max(64 * KiB, largest) for first, last in log.ranges)
            assert max(last - first for first, last in log.ranges) < fetched
            log.assert_no_byte_fetched_twice()
            for name in PRIORITIZED:
                data = blob.files[name]
                assert await fetcher.read(blob.node(name), 0, len(data)) == data
            assert fetcher.stats.demand_requests == 0

    run(scenario())


def test_reads_during_prefetch_wait_for_its_requests(blob, tmp_path):
    async def scenario() -> None:
        log = RangeLog()
        async with make_client(log) as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), new_cache(tmp_path),
                                   max_request_bytes=64 * KiB, concurrency=1)
            nodes = [blob.node(name) for name in PRIORITIZED]
            fetched, *contents = await asyncio.gather(
                fetcher.prefetch(), *(fetcher.read(node, 0, node.size) for node in nodes))
            assert contents == [blob.files[name] for name in PRIORITIZED]
            assert fetcher.stats.demand_requests == 0
            assert len(log.ranges) == fetcher.stats.prefetch_requests
            assert fetched == sum(last - first for first, last in log.ranges)

    run(scenario())


def test_fetch_all_makes_the_layer_complete_alongside_reads(blob, tmp_path):
    async def scenario() -> None:
        log = RangeLog()
        cache = new_cache(tmp_path)
        async with make_client(log) as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), cache,
                                   max_request_bytes=64 * KiB,
                                   background_bytes_per_second=200e6)
            assert not fetcher.is_complete()
            reads = [fetcher.read(blob.node(name), 0, 1 << 20) for name in SMALL_FILES[::17]]
            fetched, *contents = await asyncio.gather(fetcher.fetch_all(), *reads)
            assert contents == [blob.files[name] for name in SMALL_FILES[::17]]
            assert fetcher.is_complete()
            assert fetched == fetcher.stats.background_bytes > 0
            log.assert_no_byte_fetched_twice()
            spans = {(c.blob_offset, c.blob_end) for c in blob.layer.payload_chunks()}
            assert sum(last - first for first, last in log.ranges) \
                == sum(end - start for start, end in spans)
            sent = len(log.ranges)
            for name, data in blob.files.items():
                assert await fetcher.read(blob.node(name), 0, len(data)) == data
            assert len(log.ranges) == sent
            again = LayerFetcher(blob.layer, reader_of(client, blob), cache)
            assert again.is_complete()
            assert await again.fetch_all() == 0 and await again.prefetch() == 0
            assert len(log.ranges) == sent

    run(scenario())


def test_prefetch_and_background_requests_hold_a_bounded_number_of_chunks(
        blob, tmp_path, monkeypatch):
    monkeypatch.setattr(fetcher_module, "RUN_CHUNKS", 5)
    chunk_starts = sorted(c.blob_offset for c in blob.layer.payload_chunks())

    async def scenario() -> None:
        log = RangeLog()
        async with make_client(log) as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), new_cache(tmp_path))
            await fetcher.prefetch()
            await fetcher.fetch_all()
            assert fetcher.is_complete()
            log.assert_no_byte_fetched_twice()
            per_request = [sum(1 for offset in chunk_starts if start <= offset < end)
                           for start, end in log.ranges]
            assert max(per_request) == 5 and len(log.ranges) >= len(chunk_starts) // 5

    run(scenario())


def live_futures() -> int:
    """Futures (not tasks) the process holds: a chunk's future keeps its bytes."""
    return sum(1 for o in gc.get_objects()
               if isinstance(o, asyncio.Future) and not isinstance(o, asyncio.Task))


def test_background_fetch_holds_the_futures_of_one_request_at_a_time(
        blob, tmp_path, monkeypatch):
    monkeypatch.setattr(fetcher_module, "RUN_CHUNKS", 5)
    chunks = len(set(blob.layer.chunk_digests()))

    async def scenario() -> None:
        async with make_client() as client:
            fetch_range = reader_of(client, blob)
            alive: list[int] = []

            async def counting_read(offset: int, length: int) -> bytes:
                alive.append(live_futures())
                return await fetch_range(offset, length)

            fetcher = LayerFetcher(blob.layer, counting_read, new_cache(tmp_path))
            await fetcher.fetch_all()
            assert fetcher.is_complete()
            assert not fetcher._inflight and fetcher._settled_meanwhile is None
            # Every request came with the previous ones' futures gone: a layer of a
            # million tiny files must not keep a million futures (and their bytes).
            assert len(alive) >= chunks // 5 > 20
            assert max(alive) - min(alive) <= 2 * 5, alive

    run(scenario())


def test_background_requests_give_way_to_a_busy_tree_but_are_not_stopped_by_it(
        blob, tmp_path, monkeypatch):
    monkeypatch.setattr(fetcher_module, "RUN_CHUNKS", 20)

    async def scenario() -> None:
        busy = True
        async with make_client() as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), new_cache(tmp_path),
                                   foreground_idle=lambda: 0.0 if busy else 60.0)
            monkeypatch.setattr(fetcher_module, "GIVE_WAY_MAX", 3600.0)
            background = asyncio.create_task(fetcher.fetch_all())
            for _ in range(20):  # the tree is busy: no background request goes out
                await asyncio.sleep(0.005)
            assert fetcher.stats.background_requests == 0
            busy = False
            await background
            assert fetcher.is_complete() and fetcher.stats.background_requests > 1

        # A tree that never goes quiet only slows the background fetch down.
        monkeypatch.setattr(fetcher_module, "GIVE_WAY_MAX", 0.001)
        async with make_client() as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob),
                                   new_cache(tmp_path / "busy"), foreground_idle=lambda: 0.0)
            await fetcher.fetch_all()
            assert fetcher.is_complete()

    run(scenario())


def test_a_prefetched_chunk_reaches_its_readers_when_verified_not_when_cached(
        blob, tmp_path, monkeypatch):
    """The cache's writes are held: a read of a file the prefetch is fetching still
    gets its bytes, makes no request of its own, and the chunks are cached once the
    writes go on. A reader's own request caches its chunks before the read returns."""
    write_may_go = threading.Event()
    store = LayerFetcher._store

    def held_store(self, good, keep_in_memory):
        if not keep_in_memory:  # a prefetch's: held
            assert write_may_go.wait(60)  # a hang guard, not a measure
        store(self, good, keep_in_memory)

    monkeypatch.setattr(LayerFetcher, "_store", held_store)

    async def scenario() -> None:
        log = RangeLog()
        cache = new_cache(tmp_path)
        async with make_client(log) as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), cache)
            name = PRIORITIZED[0]
            node = blob.node(name)
            chunks = blob.layer.chunks(node)
            prefetch = asyncio.create_task(fetcher.prefetch())
            try:
                async with asyncio.timeout(30):  # a hang guard, not a measure
                    assert await fetcher.read(node, 0, node.size) == blob.files[name]
                assert fetcher.stats.demand_requests == 0 and not prefetch.done()
                assert not any(chunk.digest in cache for chunk in chunks)
            finally:
                write_may_go.set()
            assert await prefetch > 0
            assert all(chunk.digest in cache for chunk in chunks)

            other = next(n for n in SMALL_FILES if n not in PRIORITIZED)
            assert await fetcher.read(blob.node(other), 0, 1 << 20) == blob.files[other]
            assert fetcher.stats.demand_requests == 1
            assert all(c.digest in cache for c in blob.layer.chunks(blob.node(other)))

    run(scenario())


def test_a_chunk_shared_with_another_layer_is_not_fetched_again(registry, tmp_path):
    shared = big_payload(100_000, seed=99)
    first = build_and_push(tmp_path, registry, "lazy/shared-a", layer_files(5, shared))
    second = build_and_push(tmp_path, registry, "lazy/shared-b", layer_files(6, shared))
    assert first.digest != second.digest

    async def scenario() -> None:
        log = RangeLog()
        cache = new_cache(tmp_path / "cache")
        async with make_client(log) as client:
            fetchers = [LayerFetcher(b.layer, reader_of(client, b), cache)
                        for b in (first, second)]
            name = "app/data/shared.bin"
            assert await fetchers[0].read(first.node(name), 0, len(shared)) == shared
            sent, stored = len(log.ranges), cache.size_bytes
            assert await fetchers[1].read(second.node(name), 0, len(shared)) == shared
            assert len(log.ranges) == sent and fetchers[1].stats.requests == 0
            assert cache.size_bytes == stored

    run(scenario())


# -- failures -----------------------------------------------------------------------------


def corrupt_inside(blob: Blob, registry: RegistryServer, chunk: estargz.Chunk) -> None:
    """Flip one byte of `chunk`'s span in the registry's storage, at a place that breaks
    the chunk (checked here, so the test does not depend on where deflate keeps what)."""
    storage = registry.blob_data_path(blob.digest)
    data = bytearray(storage.read_bytes())
    for position in range(chunk.blob_offset + 12, chunk.blob_end):
        data[position] ^= 0xFF
        try:
            estargz.decode_chunk(blob.layer.footer.compression, chunk,
                                 bytes(data[chunk.blob_offset:chunk.blob_end]))
        except estargz.FormatError:
            storage.write_bytes(bytes(data))
            return
        data[position] ^= 0xFF
    raise AssertionError("no byte flip broke the chunk")


def test_a_corrupt_chunk_in_the_registry_fails_only_its_file(registry, tmp_path):
    blob = build_and_push(tmp_path, registry, "lazy/corrupt", layer_files(seed=2))
    small = small_files_in_toc_order(blob)[100]
    big = "app/data/blob1.bin"
    small_chunk = blob.node(small).chunks[0]
    big_chunk = blob.node(big).chunks[2]
    corrupt_inside(blob, registry, small_chunk)
    corrupt_inside(blob, registry, big_chunk)

    async def scenario() -> None:
        log = RangeLog()
        failures_before = sample("lazypull_fetch_verification_failures_total")
        cache = new_cache(tmp_path / "cache")
        async with make_client(log) as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob), cache,
                                   window_bytes=8 * KiB)
            with pytest.raises(ChunkFetchError, match=small_chunk.digest):
                await fetcher.read(blob.node(small), 0, 1 << 20)
            span = (small_chunk.blob_offset, small_chunk.blob_end)
            assert log.covering(*span) == 2  # the first request and one retry
            assert fetcher.stats.retries == 1 and fetcher.stats.verification_failures == 1
            assert sample("lazypull_fetch_verification_failures_total") == failures_before + 1
            assert small_chunk.digest not in cache
            for name, data in blob.files.items():
                if name not in (small, big):
                    assert await fetcher.read(blob.node(name), 0, len(data)) == data, name
            with pytest.raises(ChunkFetchError):
                await fetcher.read(blob.node(big), 0, 1 << 20)
            data = blob.files[big]
            good = big_chunk.file_offset + big_chunk.size
            assert await fetcher.read(blob.node(big), good, len(data)) == data[good:]
            assert await fetcher.read(blob.node(big), 0, 1000) == data[:1000]
            # Nothing corrupt was kept: a new attempt asks the registry again.
            with pytest.raises(ChunkFetchError):
                await fetcher.read(blob.node(small), 0, 1 << 20)
            assert log.covering(*span) == 4
            assert small_chunk.digest not in cache and big_chunk.digest not in cache
            with pytest.raises(ChunkFetchError):
                await fetcher.fetch_all()
            assert not fetcher.is_complete()

    run(scenario())


def test_a_response_corrupted_once_is_fetched_again_and_used(blob, tmp_path):
    async def scenario() -> None:
        async with make_client() as client:
            calls: list[tuple[int, int]] = []

            async def corrupting_once(offset: int, length: int) -> bytes:
                data = await client.fetch_range(blob.reference, blob.digest, offset, length)
                calls.append((offset, length))
                if len(calls) == 1:  # as a flaky middlebox might
                    return data[:20] + bytes([data[20] ^ 0xFF]) + data[21:]
                return data

            fetcher = LayerFetcher(blob.layer, corrupting_once, new_cache(tmp_path))
            name = "app/etc/settings.toml"
            chunk = blob.node(name).chunks[0]
            assert await fetcher.read(blob.node(name), 0, 4096) == blob.files[name]
            # A window of small files first; then only the chunk that failed, again.
            assert calls[0][0] == chunk.blob_offset and calls[0][1] > chunk.compressed_size
            assert calls[1:] == [(chunk.blob_offset, chunk.compressed_size)]
            assert fetcher.stats.retries == 1 and fetcher.stats.verification_failures == 0

    run(scenario())


def test_a_registry_error_reaches_every_reader_and_is_not_remembered(
        blob, registry, fault_proxy_factory, tmp_path):
    proxy = fault_proxy_factory(registry.host)
    through_proxy = Reference.parse(f"{proxy.host}/{blob.reference.repository}")
    proxy.add(WireFault("status", "GET", status=404, times=1))

    async def scenario() -> None:
        async with make_client() as client:
            fetcher = LayerFetcher(blob.layer, reader_of(client, blob, through_proxy),
                                   new_cache(tmp_path), name="sha256:registry-error")
            node = blob.node("app/etc/settings.toml")
            wanted = blob.files["app/etc/settings.toml"][:100]
            results = await asyncio.gather(*(fetcher.read(node, 0, 100) for _ in range(5)),
                                           return_exceptions=True)
            # Readers waiting on the failed request all get its error; one that came
            # after it (a loaded machine can order them so) fetches anew. Never other bytes.
            failed = [r for r in results if isinstance(r, NotFoundError)]
            assert failed and all(r == wanted for r in results if r not in failed), results
            assert sample("lazypull_read_failures_total", layer="sha256:registry-error",
                          reason="fetch") == len(failed)
            asked = len(proxy.requests("GET", r"/blobs/"))
            assert asked == (1 if len(failed) == 5 else 2)
            assert await fetcher.read(node, 0, 100) == wanted  # the error is not remembered
            assert len(proxy.requests("GET", r"/blobs/")) == asked + (asked == 1)

    run(scenario())


# -- scheduling -----------------------------------------------------------------------------


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_request_slots_put_on_demand_first_and_background_in_one_slot():
    async def scenario() -> None:
        slots = RequestSlots(3)
        order: list[str] = []
        release = {name: asyncio.Event() for name in ("d1", "d2", "d3", "d4", "b1", "b2")}

        async def hold(name: str, background: bool) -> None:
            async with slots.slot(background):
                order.append(name)
                await release[name].wait()

        tasks = [asyncio.create_task(hold("b1", True)), asyncio.create_task(hold("b2", True))]
        await _settle()
        assert order == ["b1"]  # background: one slot at most, though two are free
        tasks += [asyncio.create_task(hold(n, False)) for n in ("d1", "d2", "d3")]
        await _settle()
        assert order == ["b1", "d1", "d2"] and slots.waiting == 1
        release["b1"].set()
        await _settle()
        assert order == ["b1", "d1", "d2", "d3"]  # on-demand before the waiting background
        tasks.append(asyncio.create_task(hold("d4", False)))
        release["d1"].set()
        await _settle()
        assert order[-1] == "d4"
        release["d2"].set()
        await _settle()
        assert order[-1] == "b2" and slots.busy == 3
        for event in release.values():
            event.set()
        await asyncio.gather(*tasks)
        assert slots.busy == 0 and slots.background == 0

    run(scenario())


def test_token_bucket_holds_the_average_rate():
    async def scenario() -> None:
        now = 0.0
        slept: list[float] = []

        async def fake_sleep(seconds: float) -> None:
            nonlocal now
            slept.append(seconds)
            now += seconds

        bucket = TokenBucket(1000.0, clock=lambda: now, sleep=fake_sleep)
        await bucket.spend(500)  # within the burst
        assert slept == []
        await bucket.spend(1500)  # 1000 over: a second's worth of debt
        assert slept == [pytest.approx(1.0)]
        now += 0.5
        await bucket.spend(500)  # 0.5 s refilled 500 tokens: no wait
        assert len(slept) == 1
        for _ in range(10):
            await bucket.spend(1000)
        assert now == pytest.approx(11.5)  # 12500 bytes in total at 1000 bytes/s, burst 1000

    run(scenario())


def test_a_miss_in_a_large_file_reads_ahead_only_so_far(blob, tmp_path):
    async def scenario() -> None:
        node = blob.node("app/data/blob2.bin")
        first = node.chunks[0]
        for readahead, wanted in ((0, 1), (1 << 30, len(node.chunks))):
            log = RangeLog()
            async with make_client(log) as client:
                fetcher = LayerFetcher(blob.layer, reader_of(client, blob),
                                       new_cache(tmp_path / str(readahead)),
                                       demand_readahead_bytes=readahead)
                assert await fetcher.read(node, 0, 100) == \
                    blob.files["app/data/blob2.bin"][:100]
            start, end = log.ranges[0]
            covered = [c for c in node.chunks if start <= c.blob_offset and c.blob_end <= end]
            assert len(log.ranges) == 1 and start == first.blob_offset
            assert len(covered) == wanted

    run(scenario())


def test_a_read_gives_up_at_its_deadline_and_a_later_read_gets_the_bytes(
        blob, tmp_path, caplog):
    name = "app/data/blob0.bin"
    node = blob.node(name)

    async def scenario() -> None:
        async with make_client() as client:
            answer = asyncio.Event()

            async def silent_until_told(offset: int, length: int) -> bytes:
                await answer.wait()  # a registry that holds the connection, saying nothing
                return await client.fetch_range(blob.reference, blob.digest, offset, length)

            cache = new_cache(tmp_path)
            fetcher = LayerFetcher(blob.layer, silent_until_told, cache,
                                   name="sha256:deadline", read_timeout=0.2)
            with pytest.raises(ChunkFetchError, match=r"no verified bytes within 0.2s"):
                await fetcher.read(node, 70_000, 4096)
            assert sample("lazypull_read_failures_total", layer="sha256:deadline",
                          reason="deadline") == 1
            # The request goes on; a read that joins it gets its bytes once the registry
            # answers (here 0.05s later, within that read's own deadline).
            asyncio.get_running_loop().call_later(0.05, answer.set)
            assert await fetcher.read(node, 70_000, 4096) == blob.files[name][70_000:74_096]
            assert fetcher.stats.demand_requests == 1

    with caplog.at_level("WARNING", logger="snapshotter.lazy.fetcher"):
        run(scenario())
    chunk = blob.layer.chunks_for_range(node, 70_000, 4096)[0]
    assert f"layer sha256:deadline: read of {name} (bytes 70000-74095) failed at chunk " \
        f"{chunk.digest} (file offset {chunk.file_offset}, blob offset {chunk.blob_offset})" \
        in caplog.text
