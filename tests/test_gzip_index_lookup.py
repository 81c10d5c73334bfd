"""The snapshotter's lookup of a plain gzip layer's index, against a real
docker-registry 2.8 (fallback tag schema): found, none (and not asked again within
the TTL), a stalled registry (the bound), a tampered index blob and an index of
another layer (refused: the layer falls back to an ordinary pull)."""

import asyncio
import os
from pathlib import Path

import pytest

import gzindex
from indexer.image import IndexOptions, index_image
from oci.manifest import Descriptor
from oci.reference import Reference
from oci.referrers import push_artifact
from oci.registry import RegistryClient
from snapshotter.lazy.index_lookup import IndexLookup, indexable
from snapshotter.lazy.layer_files import GZIP_INDEX_FILE, GZIP_INDEX_KIND
from snapshotter.lazy.layer_source import LayerSource, NotLazy
from snapshotter.lazy.remote import FoundLayer, find_layer

from .fixtures.fault_proxy import WireFault, WireFaultProxy
from .images import File, build_layout_image, push_layout_image
from .test_gzip_index_publish import client

LAYERS = [
    {"bin/tool": File(os.urandom(200_000), 0o755), "etc/motd": b"base\n"},
    {"etc/hello": b"hello\n", "usr/lib/text.py": b"import os\n" * 30_000},
]
REFERRER_PATHS = r"/referrers/|/manifests/sha256-"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory):
    return build_layout_image(tmp_path_factory.mktemp("img") / "layout", "v1", LAYERS)


def _push(image, registry, repository: str, indexed: bool) -> Reference:
    push_layout_image(image.layout, "v1", registry.host, repository)
    reference = Reference.parse(f"{registry.host}/{repository}:v1")
    if indexed:
        async def run() -> None:
            async with client() as registry_client:
                await index_image(registry_client, reference, IndexOptions(spacing=64 << 10))
        asyncio.run(run())
    return reference


async def _found(registry_client: RegistryClient, reference: Reference, digest: str
                 ) -> tuple[LayerSource, FoundLayer]:
    source = LayerSource("chain", reference, digest)
    return source, await find_layer(registry_client, source)


def _open(reference: Reference, digest: str, directory: Path,
          lookup_of=lambda c: IndexLookup(c)):
    async def run():
        async with client() as registry_client:
            source, found = await _found(registry_client, reference, digest)
            return await lookup_of(registry_client).open(source, found, str(directory))
    return asyncio.run(run())


def test_an_indexed_layer_opens_with_its_index_stored(image, registry, tmp_path) -> None:
    reference = _push(image, registry, "lookup/found", indexed=True)
    digest = image.layer_digests[1]
    indexed = _open(reference, digest, tmp_path)
    assert indexed.record.kind == GZIP_INDEX_KIND and indexed.record.digest == digest
    assert indexed.record.manifest_digest == image.manifest_digest
    assert indexed.layer.lookup("etc/hello") is not None
    stored = gzindex.GzipIndex.open(str(tmp_path / GZIP_INDEX_FILE))
    assert stored.layer_digest == digest
    assert (tmp_path / "index.db").exists()


def test_no_index_is_remembered_for_the_ttl(image, registry, fault_proxy_factory,
                                            tmp_path) -> None:
    _push(image, registry, "lookup/none", indexed=False)
    proxy = fault_proxy_factory(registry.host)
    reference = Reference.parse(f"{proxy.host}/lookup/none:v1")
    now = [0.0]

    async def run() -> list[str]:
        async with client() as registry_client:
            lookup = IndexLookup(registry_client, negative_ttl=60, clock=lambda: now[0])
            reasons = []
            for step in (0.0, 30.0, 61.0):
                now[0] = step
                for digest in image.layer_digests:
                    source, found = await _found(registry_client, reference, digest)
                    assert indexable(found.descriptor)
                    with pytest.raises(NotLazy) as refused:
                        await lookup.open(source, found, str(tmp_path))
                    reasons.append(str(refused.value))
                    counts.append(len(proxy.requests("GET", REFERRER_PATHS)))
            return reasons

    counts: list[int] = []
    reasons = asyncio.run(run())
    assert all("no gzip index refers to" in reason for reason in reasons)
    first = counts[0]
    assert first > 0
    assert counts[:4] == [first] * 4  # the other layer and the next pull within the TTL
    assert counts[4] > first  # asked again once the TTL is over


def test_a_stalled_lookup_falls_back_within_its_bound(image, registry, tmp_path) -> None:
    _push(image, registry, "lookup/stall", indexed=True)
    proxy = WireFaultProxy(registry.host).start()
    try:
        proxy.add(WireFault("hang", path=REFERRER_PATHS))
        reference = Reference.parse(f"{proxy.host}/lookup/stall:v1")
        with pytest.raises(NotLazy, match=r"took more than 0.5s"):
            _open(reference, image.layer_digests[0], tmp_path,
                  lambda c: IndexLookup(c, timeout=0.5))
    finally:
        proxy.stop()


def test_a_tampered_index_blob_is_refused(image, registry, tmp_path) -> None:
    reference = _push(image, registry, "lookup/tampered", indexed=True)
    digest = image.layer_digests[1]
    index_digest = _index_digest(reference, digest)
    blob = registry.blob_data_path(index_digest)
    original = blob.read_bytes()
    bad = bytearray(original)
    bad[len(bad) // 2] ^= 0x01
    blob.write_bytes(bytes(bad))
    try:
        with pytest.raises(NotLazy, match="refused"):
            _open(reference, digest, tmp_path)
    finally:
        blob.write_bytes(original)
    assert not (tmp_path / GZIP_INDEX_FILE).exists()


def test_an_index_of_another_layer_is_refused(image, registry, tmp_path) -> None:
    reference = _push(image, registry, "lookup/other", indexed=True)
    first, second = image.layer_digests
    wrong = _index_digest(reference, second)
    local = tmp_path / "wrong-index"
    local.write_bytes(registry.blob_data_path(wrong).read_bytes())
    subject = _subject(reference)

    async def run() -> None:
        async with client() as registry_client:
            await push_artifact(registry_client, reference, subject, gzindex.ARTIFACT_TYPE,
                                [(Descriptor(gzindex.INDEX_MEDIA_TYPE, wrong, local.stat().st_size,
                                             {gzindex.LAYER_ANNOTATION: first}), str(local))])
    asyncio.run(run())
    with pytest.raises(NotLazy, match="refused"):
        _open(reference, first, tmp_path / "x")


def _subject(reference: Reference) -> Descriptor:
    async def run() -> Descriptor:
        async with client() as registry_client:
            data, media_type, digest = await registry_client.get_manifest(reference,
                                                                          reference.object)
            return Descriptor(media_type, digest, len(data))
    return asyncio.run(run())


def _index_digest(reference: Reference, layer: str) -> str:
    from indexer.lookup import find_layer_indexes

    async def run() -> str:
        async with client() as registry_client:
            subject = await registry_client.get_manifest(reference, reference.object)
            found = await find_layer_indexes(registry_client, reference, subject[2])
            return found[layer].descriptor.digest
    return asyncio.run(run())
