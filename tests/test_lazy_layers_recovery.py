"""Lazy layers recover once the registry does: a prefetch that failed is tried again by
the next wait for it, and a background fetch that failed starts again after a pause.
LazyLayers without its FUSE mount (nothing here reads through the kernel), against a
real registry behind a fault-injecting proxy."""

import asyncio
from pathlib import Path

import pytest

from snapshotter.errors import Unavailable
from snapshotter.lazy import manager as manager_module
from snapshotter.lazy.layer_files import LayerRecord
from snapshotter.lazy.manager import LazyLayers
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


def test_a_failed_prefetch_is_tried_again_by_the_next_wait(
        blob, registry, fault_proxy_factory, tmp_path):
    proxy = fault_proxy_factory(registry.host)
    outage = WireFault("status", "GET")
    proxy.add(outage)

    async def scenario() -> None:
        async with make_client() as client:
            lazy = lazy_layers(tmp_path, client, background=False)
            lazy.mount("l1", record_of(blob, proxy.host), blob.layer)
            with pytest.raises(Unavailable, match="HTTP 503"):
                await lazy.wait_prefetched(["l1"], timeout=30)
            outage.clear()  # the registry is back
            await lazy.wait_prefetched(["l1"], timeout=30)
            region = blob.layer.prefetch_size
            assert region > 0 and all(
                chunk.digest in lazy.cache for span in blob.layer.iter_spans()
                if span.offset < region for chunk in span.chunks)
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
