"""Lazy layers recover once the registry does: a prefetch that failed is tried again by
the next wait for it, and a background fetch that failed starts again after a pause. A
wait for a prefetch's first bytes returns while its tail is still on its way, and a
read of that tail waits for it. LazyLayers without its FUSE mount (nothing here reads
through the kernel), against a real registry behind a fault-injecting proxy."""

import asyncio
import contextlib
from pathlib import Path

import pytest

from oci.store import StoreError
from snapshotter.errors import Unavailable
from snapshotter.lazy import fetcher as fetcher_module
from snapshotter.lazy import manager as manager_module
from snapshotter.lazy.layer_files import LayerRecord
from snapshotter.lazy.manager import LazyLayers
from snapshotter.lazy.prefetch_wait import FIRST_BYTES, UNTIL, WHOLE
from tests.fixtures.fault_proxy import WireFault

from .test_fetcher import Blob, build_and_push, layer_files, make_client, new_cache, run


@pytest.fixture(scope="module")
def blob(registry, tmp_path_factory) -> Blob:
    return build_and_push(tmp_path_factory.mktemp("blob"), registry, "lazy/recovery",
                          layer_files(seed=5))


def record_of(blob: Blob, host: str) -> LayerRecord:
    footer = blob.layer.footer
    return LayerRecord(f"{host}/{blob.reference.repository}", blob.digest, blob.size,
                       "application/vnd.oci.image.layer.v1.tar+gzip", "sha256:unused",
                       str(footer.compression), footer.toc_offset, footer.toc_length,
                       footer.payload_end, footer.footer_size, footer.toc_uncompressed_size)


def lazy_layers(tmp_path: Path, client, background: bool) -> LazyLayers:
    return LazyLayers(str(tmp_path / "mnt"), new_cache(tmp_path / "cache"), client,
                      background=background, background_quiet_seconds=0.01)


@pytest.mark.parametrize("until", UNTIL)
def test_a_failed_prefetch_is_tried_again_by_the_next_wait(
        blob, registry, fault_proxy_factory, tmp_path, until):
    proxy = fault_proxy_factory(registry.host)
    outage = WireFault("status", "GET")
    proxy.add(outage)

    async def scenario() -> None:
        async with make_client() as client:
            lazy = lazy_layers(tmp_path, client, background=False)
            lazy.mount("l1", record_of(blob, proxy.host), blob.layer)
            with pytest.raises(Unavailable, match="HTTP 503"):
                await lazy.wait_prefetched(["l1"], timeout=30, until=until)
            outage.clear()  # the registry is back
            await lazy.wait_prefetched(["l1"], timeout=30)
            region = blob.layer.prefetch_size
            assert region > 0 and all(
                chunk.digest in lazy.cache for span in blob.layer.iter_spans()
                if span.offset < region for chunk in span.chunks)
            await lazy.unmount("l1")

    run(scenario())


def prefetch_region_nodes(blob: Blob) -> list[tuple[str, object]]:
    region = blob.layer.prefetch_size
    return [(path, node) for path, node in blob.layer.walk() if node.kind == "reg"
            and node.size and any(c.blob_offset < region for c in blob.layer.chunks(node))]


def span_requests_behind(monkeypatch, proxy, fault: WireFault):
    """`proxy` with `fault`, and prefetch requests of one span each."""
    monkeypatch.setattr(fetcher_module, "PREFETCH_REQUEST_BYTES", 1)
    proxy.add(fault)
    return proxy


@contextlib.asynccontextmanager
async def served_after_first_bytes(tmp_path: Path, blob: Blob, proxy):
    """The layer mounted as l1 through `proxy`, once its prefetch has its first bytes:
    (the LazyLayers, the mounted layer)."""
    async with make_client() as client:
        lazy = lazy_layers(tmp_path, client, background=False)
        lazy.mount("l1", record_of(blob, proxy.host), blob.layer)
        await lazy.wait_prefetched(["l1"], timeout=30, until=FIRST_BYTES)
        yield lazy, lazy.layers["l1"]


def test_a_wait_for_first_bytes_returns_while_the_prefetch_tail_is_held(
        blob, registry, fault_proxy_factory, tmp_path, monkeypatch):
    """Requests of a span each: the first passes, the others are held by the proxy. The
    first-bytes wait returns, the whole wait cannot; a read of a held chunk waits for
    its request and gets the right bytes once the registry answers."""
    held = WireFault("hang", "GET", skip=1)
    proxy = span_requests_behind(monkeypatch, fault_proxy_factory(registry.host), held)

    async def scenario() -> None:
        async with served_after_first_bytes(tmp_path, blob, proxy) as (lazy, mounted):
            assert held.hits >= 1 and not mounted.prefetch.done()
            with pytest.raises(Unavailable, match="did not finish within"):
                await lazy.wait_prefetched(["l1"], timeout=0.3, until=WHOLE)
            path, node = next((p, n) for p, n in prefetch_region_nodes(blob)
                              if any(c.digest not in lazy.cache for c in blob.layer.chunks(n)))
            read = asyncio.create_task(mounted.fetcher.read(node, 0, node.size))
            await asyncio.sleep(0.3)
            assert not read.done()  # its chunk is held, not fetched again on demand
            held.clear()
            assert await read == blob.files[path]
            await lazy.wait_prefetched(["l1"], timeout=30, until=WHOLE)
            assert mounted.fetcher.stats.demand_requests == 0
            assert all(c.digest in lazy.cache for _, n in prefetch_region_nodes(blob)
                       for c in blob.layer.chunks(n) if c.blob_offset < blob.layer.prefetch_size)
            await lazy.unmount("l1")

    run(scenario())


def test_a_restarted_prefetch_needs_first_bytes_of_its_own(
        blob, registry, fault_proxy_factory, tmp_path, monkeypatch):
    """A prefetch whose first request was answered and whose others failed: the next
    wait starts it again, and its earlier answer does not count for the new one."""
    outage = WireFault("status", "GET", skip=1)
    proxy = span_requests_behind(monkeypatch, fault_proxy_factory(registry.host), outage)

    async def scenario() -> None:
        async with served_after_first_bytes(tmp_path, blob, proxy) as (lazy, mounted):
            with pytest.raises(StoreError, match="HTTP 503"):
                await mounted.prefetch  # its other requests fail
            assert mounted.fetcher.prefetch_answered.is_set()
            with pytest.raises(Unavailable, match="HTTP 503"):
                await lazy.wait_prefetched(["l1"], timeout=30, until=FIRST_BYTES)
            outage.clear()
            await lazy.wait_prefetched(["l1"], timeout=30, until=FIRST_BYTES)
            await lazy.wait_prefetched(["l1"], timeout=30, until=WHOLE)
            await lazy.unmount("l1")

    run(scenario())


def test_a_failed_background_fetch_starts_again(
        blob, registry, fault_proxy_factory, tmp_path, monkeypatch, caplog):
    proxy = fault_proxy_factory(registry.host)
    monkeypatch.setattr(manager_module, "BACKGROUND_RETRY_SECONDS", (0.05, 0.1))

    async def scenario() -> None:
        async with make_client() as client:
            lazy = lazy_layers(tmp_path, client, background=True)
            lazy.mount("l1", record_of(blob, proxy.host), blob.layer)
            await lazy.wait_prefetched(["l1"], timeout=30)
            # Every request after the prefetch fails, three times over.
            proxy.add(WireFault("status", "GET", times=3 * 2))
            mounted = lazy.layers["l1"]
            assert mounted.background is not None
            async with asyncio.timeout(60):  # a hang guard, not a measure
                await mounted.background
            assert mounted.fetcher.is_complete()
            await lazy.unmount("l1")

    with caplog.at_level("WARNING", logger="snapshotter.lazy.manager"):
        run(scenario())
    assert "background fetch stopped" in caplog.text and "trying again" in caplog.text


def test_background_fetching_waits_while_containers_read_the_cache(blob, registry, tmp_path):
    """Reads served from the cache (a warm node, or files prefetched) are containers at
    work too: no background request starts until they stop for the quiet period."""
    async def scenario() -> None:
        async with make_client() as client:
            lazy = lazy_layers(tmp_path, client, background=True)
            lazy.background_quiet_seconds = 0.5
            lazy.mount("l1", record_of(blob, registry.host), blob.layer)
            await lazy.wait_prefetched(["l1"], timeout=30)
            fetcher = lazy.layers["l1"].fetcher
            region = blob.layer.prefetch_size
            cached = next(node for _, node in blob.layer.walk() if node.kind == "reg"
                          and node.size and all(c.blob_offset < region
                                                for c in blob.layer.chunks(node)))
            for _ in range(100):  # two seconds of a container reading prefetched bytes
                assert await fetcher.read(cached, 0, cached.size)
                await asyncio.sleep(0.02)
            assert fetcher.stats.demand_requests == 0
            assert fetcher.stats.background_requests == 0
            mounted = lazy.layers["l1"]
            assert mounted.background is not None
            async with asyncio.timeout(60):  # a hang guard, not a measure
                await mounted.background
            assert fetcher.stats.background_requests > 0 and fetcher.is_complete()
            await lazy.unmount("l1")

    run(scenario())
