"""The index blobs of an image's layers fetched ahead at the first lookup, against a
real docker-registry 2.8 behind the recording fault proxy: every blob is fetched once
and the later layers' mounts ask the registry nothing; a tampered blob makes only its
own layer fall back (fetched once, not again); an image without indexes is still
remembered for the TTL; what no mount claims is deleted; a referrers API's answer
wins over the fallback tag read beside it; and end to end, a lazy pull through
containerd fetches each index blob of the image once and its hot spans ahead, once."""

import asyncio
import json
import os
import re
import time
from pathlib import Path

import pytest

from indexer.lookup import find_layer_indexes
from oci.reference import Reference
from snapshotter.lazy.chunk_cache import ChunkCache
from snapshotter.lazy.index_ahead import IndexAhead
from snapshotter.lazy.index_lookup import IndexLookup
from snapshotter.lazy.layer_files import GZIP_INDEX_FILE, INDEX_FILE
from snapshotter.lazy.layer_source import NotLazy

from .fixtures.fault_proxy import WireFault
from .images import File, build_layout_image
from .lazy_node import (  # noqa: F401  (lazy_node_fixture: the `node` fixture)
    NO_BACKGROUND,
    lazy_node_fixture,
    pull,
    start_lazy_node,
    stop_lazy_node,
)
from .test_gzip_index_lookup import REFERRER_PATHS, _found, _push
from .test_gzip_index_mount import images  # noqa: F401  (the indexed image, end to end)
from .test_gzip_index_mount import run as run_container
from .test_gzip_index_publish import client
from .test_lazy_pull import metric_values

LAYERS = [
    {"bin/tool": File(os.urandom(150_000), 0o755), "etc/motd": b"base\n"},
    {"usr/lib/a.py": b"import os\n" * 20_000},
    {"usr/lib/b.py": b"import sys\n" * 20_000, "etc/hello": b"hello\n"},
    {"srv/data": File(os.urandom(90_000), 0o644)},
]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory):
    return build_layout_image(tmp_path_factory.mktemp("img") / "layout", "v1", LAYERS)


def _index_digests(reference: Reference, manifest_digest: str) -> dict[str, str]:
    """Layer digest -> its index blob's digest, as published."""
    async def run() -> dict[str, str]:
        async with client() as registry_client:
            found = await find_layer_indexes(registry_client, reference, manifest_digest)
            return {layer: index.descriptor.digest for layer, index in found.items()}
    return asyncio.run(run())


def _blob_gets(proxy, digest: str) -> int:
    return len(proxy.requests("GET", f"/blobs/{digest}"))


async def _wait_handled(proxy, digests: list[str], timeout: float = 30.0) -> None:
    """Until the proxy has answered a request for each blob."""
    deadline = time.monotonic() + timeout
    while not all(proxy.handled(None, f"/blobs/{d}") for d in digests):
        assert time.monotonic() < deadline, "the index blobs were not fetched ahead"
        await asyncio.sleep(0.02)


def _staged(staging: Path) -> list[Path]:
    return sorted(staging.glob("layer-*")) if staging.exists() else []


def test_first_lookup_fetches_every_index_blob_once(image, registry, fault_proxy_factory,
                                                   tmp_path) -> None:
    _push(image, registry, "ahead/all", indexed=True)
    indexes = _index_digests(Reference.parse(f"{registry.host}/ahead/all:v1"),
                             image.manifest_digest)
    assert set(indexes) == set(image.layer_digests)
    proxy = fault_proxy_factory(registry.host)
    reference = Reference.parse(f"{proxy.host}/ahead/all:v1")
    staging = tmp_path / "staging"

    async def run() -> list[str]:
        async with client() as registry_client:
            # With a chunk cache: the layers' hot spans (none here) are fetched ahead too.
            cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
            lookup = IndexLookup(registry_client, ahead=IndexAhead(registry_client,
                                                                   str(staging), cache=cache))
            first, *others = image.layer_digests
            source, found = await _found(registry_client, reference, first)
            directory = tmp_path / "0"
            directory.mkdir()
            await lookup.open(source, found, str(directory))
            await _wait_handled(proxy, list(indexes.values()))
            lookups_after_first = len(proxy.requests("GET", REFERRER_PATHS))
            # From now on no index blob can be fetched: the mounts that follow must
            # find theirs fetched ahead.
            proxy.add(WireFault("status", "GET", "|".join(indexes.values()), status=503))
            served = []
            for number, digest in enumerate(others, 1):
                source, found = await _found(registry_client, reference, digest)
                directory = tmp_path / str(number)
                directory.mkdir()
                indexed = await lookup.open(source, found, str(directory))
                assert (directory / GZIP_INDEX_FILE).exists()
                assert (directory / INDEX_FILE).exists()
                served.append(indexed.record.digest)
            assert len(proxy.requests("GET", REFERRER_PATHS)) == lookups_after_first
            return served

    served = asyncio.run(run())
    assert served == image.layer_digests[1:]
    assert all(_blob_gets(proxy, d) == 1 for d in indexes.values())
    assert _staged(staging) == []  # every layer claimed its own


def test_a_tampered_index_blob_fails_only_its_layer(image, registry, fault_proxy_factory,
                                                   tmp_path) -> None:
    _push(image, registry, "ahead/tampered", indexed=True)
    indexes = _index_digests(Reference.parse(f"{registry.host}/ahead/tampered:v1"),
                             image.manifest_digest)
    bad_layer = image.layer_digests[2]
    blob = registry.blob_data_path(indexes[bad_layer])
    original = blob.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0x01
    blob.write_bytes(bytes(tampered))
    proxy = fault_proxy_factory(registry.host)
    reference = Reference.parse(f"{proxy.host}/ahead/tampered:v1")

    async def run() -> dict[str, str]:
        async with client() as registry_client:
            lookup = IndexLookup(registry_client,
                                 ahead=IndexAhead(registry_client, str(tmp_path / "staging")))
            outcomes = {}
            for number, digest in enumerate(image.layer_digests):
                source, found = await _found(registry_client, reference, digest)
                directory = tmp_path / str(number)
                directory.mkdir()
                try:
                    await lookup.open(source, found, str(directory))
                    outcomes[digest] = "lazy"
                except NotLazy as exc:
                    outcomes[digest] = str(exc)
            return outcomes

    try:
        outcomes = asyncio.run(run())
    finally:
        blob.write_bytes(original)
    assert "refused" in outcomes.pop(bad_layer)
    assert set(outcomes.values()) == {"lazy"}
    assert not (tmp_path / "2" / GZIP_INDEX_FILE).exists()
    # A blob whose bytes are wrong is not asked for again: it would be the same.
    assert all(_blob_gets(proxy, d) == 1 for d in indexes.values())


def test_no_index_is_still_remembered_for_the_ttl(image, registry, fault_proxy_factory,
                                                  tmp_path) -> None:
    _push(image, registry, "ahead/none", indexed=False)
    proxy = fault_proxy_factory(registry.host)
    reference = Reference.parse(f"{proxy.host}/ahead/none:v1")
    now = [0.0]
    counts: list[int] = []

    async def run() -> None:
        async with client() as registry_client:
            lookup = IndexLookup(registry_client, negative_ttl=60, clock=lambda: now[0],
                                 ahead=IndexAhead(registry_client, str(tmp_path / "staging")))
            for step in (0.0, 30.0, 61.0):
                now[0] = step
                for digest in image.layer_digests:
                    source, found = await _found(registry_client, reference, digest)
                    with pytest.raises(NotLazy, match="no gzip index refers to"):
                        await lookup.open(source, found, str(tmp_path))
                counts.append(len(proxy.requests("GET", REFERRER_PATHS)))

    asyncio.run(run())
    assert counts[0] > 0
    assert counts[1] == counts[0]  # the next pull within the TTL asks nothing
    assert counts[2] > counts[1]  # asked again once the TTL is over
    assert proxy.requests("GET", "/blobs/") == []


def test_what_no_mount_claims_is_deleted(image, registry, tmp_path) -> None:
    reference = _push(image, registry, "ahead/unclaimed", indexed=True)
    staging = tmp_path / "staging"

    async def run() -> tuple[list[bool], list[Path], str]:
        async with client() as registry_client:
            ahead = IndexAhead(registry_client, str(staging), keep_seconds=1.0)
            lookup = IndexLookup(registry_client, ahead=ahead)
            source, found = await _found(registry_client, reference, image.layer_digests[0])
            (tmp_path / "0").mkdir()
            await lookup.open(source, found, str(tmp_path / "0"))
            deadline = time.monotonic() + 30
            while len(_staged(staging)) < len(LAYERS) - 1:  # the others, built
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            before = [(p / INDEX_FILE).exists() for p in _staged(staging)]
            await asyncio.sleep(1.5)
            after = _staged(staging)
            # A mount after that fetches its own index again.
            source, found = await _found(registry_client, reference, image.layer_digests[1])
            (tmp_path / "1").mkdir()
            indexed = await lookup.open(source, found, str(tmp_path / "1"))
            return before, after, indexed.record.digest

    before, after, digest = asyncio.run(run())
    assert before == [True] * (len(LAYERS) - 1)  # the other layers' trees, built
    assert after == []
    assert digest == image.layer_digests[1]


def test_lazy_pull_fetches_each_index_blob_once(node, images) -> None:  # noqa: F811
    proxy, service = node["proxy"], node["service"]
    result = pull(node, images["indexed"])
    assert [layer["source"] for layer in result["layers"]] == ["remote"] * 2
    index_blobs = re.findall(r"gzip index (sha256:\w+) fetched ahead in", service.log)
    assert len(index_blobs) == 2
    assert all(_blob_gets(proxy, d) == 1 for d in index_blobs)
    assert not re.search(r"gzip index \S+ fetched in", service.log)  # no mount fetched one
    # The hot spans were fetched ahead, before the mounts; the mounts' prefetch waited
    # for them and asked for none of them again.
    assert "bytes of hot spans fetched ahead" in service.log
    demand = 'lazypull_fetch_requests_total{kind="demand"}'
    before = metric_values(service).get(demand, 0)
    out = run_container(node, images["indexed"], "a1", "cat /etc/hostname /opt/new").stdout
    assert out == "workspace\nnew\n"
    assert metric_values(service).get(demand, 0) == before  # the hot files were cached
    ranges = [(r.path, r.headers.get("Range") or r.headers.get("range"))
              for r in proxy.requests("GET", "/blobs/")
              if r.path.rsplit("/", 1)[-1] in images["layers"]]
    assert ranges and all(asked for _, asked in ranges)
    assert len(ranges) == len(set(ranges))  # no range asked twice


def test_a_referrers_api_answer_wins_over_the_fallback_read_beside_it(
        image, registry, fault_proxy_factory, tmp_path) -> None:
    _push(image, registry, "ahead/api", indexed=True)
    proxy = fault_proxy_factory(registry.host)
    # As a registry with the referrers API would answer: nothing refers to it (the
    # fallback tag, read at the same time, lists the index).
    empty = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": []}).encode()
    proxy.add(WireFault("answer", "GET", "/referrers/", status=200, body=empty,
                        headers={"Content-Type": "application/vnd.oci.image.index.v1+json"}))
    reference = Reference.parse(f"{proxy.host}/ahead/api:v1")

    async def run() -> str:
        async with client() as registry_client:
            lookup = IndexLookup(registry_client,
                                 ahead=IndexAhead(registry_client, str(tmp_path / "staging")))
            source, found = await _found(registry_client, reference, image.layer_digests[0])
            with pytest.raises(NotLazy) as refused:
                await lookup.open(source, found, str(tmp_path))
            return str(refused.value)

    assert "no gzip index refers to" in asyncio.run(run())
    assert proxy.requests("GET", "/referrers/")
    assert proxy.requests("GET", "/blobs/") == []


def test_with_index_ahead_off_each_mount_fetches_its_own(
        snapshotter_factory, registry, fault_proxy_factory, images,  # noqa: F811
        tmp_path_factory) -> None:
    node = start_lazy_node(snapshotter_factory, registry, fault_proxy_factory,
                           tmp_path_factory, NO_BACKGROUND + "gzip_index_ahead = false\n")
    try:
        result = pull(node, images["indexed"])
        assert [layer["source"] for layer in result["layers"]] == ["remote"] * 2
        log = node["service"].log
        assert "fetched ahead" not in log
        fetched = [line.split("gzip index ")[1].split()[0]
                   for line in log.splitlines() if "its tree built in" in line]
        assert len(fetched) == 2
        assert all(_blob_gets(node["proxy"], d) == 1 for d in fetched)
    finally:
        stop_lazy_node(node)
