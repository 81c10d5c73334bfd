"""Publishing gzip indexes as referrers to a real docker-registry 2.8 (no referrers
API: the tag-schema fallback), finding them again, and the image left untouched.

No registry with the OCI 1.1 referrers API is available here, so that path is
exercised only as far as 2.8 allows: its 404 on /referrers/ is what sends the
indexer to the fallback tag."""

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gzindex
from indexer.image import IndexOptions, index_image
from indexer.lookup import fetch_index, find_layer_indexes
from oci import mediatypes as mt
from oci.access_profile import parse_profile
from oci.hosts import HostsConfig
from oci.manifest import Descriptor
from oci.reference import Reference
from oci.referrers import (
    ReferrersError,
    fallback_tag,
    find_referrers,
    push_artifact,
    read_artifact,
)
from oci.registry import RegistryClient
from oci.store import StoreError

from .images import File, Symlink, build_layout_image, build_two_platform_image, push_layout_image

LAYERS = [
    {"bin/busybox": File(Path("/bin/busybox").read_bytes(), 0o755),
     "bin/sh": Symlink("busybox"), "etc/motd": b"base layer\n",
     "var/cache/big": os.urandom(300_000), "usr/lib/text.py": b"import os\n" * 50_000},
    {"etc/hello": b"hello from layer 2\n", "usr/share/data.bin": os.urandom(1_500_000),
     "var/cache/big": None},
]
OTHER_TYPE = "application/vnd.example.signature.v1"


def raw_manifest(reference: str) -> bytes:
    done = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                           f"docker://{reference}"], check=True, capture_output=True)
    return done.stdout


def tags(registry: str, repository: str) -> list[str]:
    done = subprocess.run(["skopeo", "list-tags", "--tls-verify=false",
                           f"docker://{registry}/{repository}"], check=True,
                          capture_output=True, text=True)
    return sorted(json.loads(done.stdout)["Tags"])


def client() -> RegistryClient:
    return RegistryClient(hosts=HostsConfig(plain_http=True))


async def _index(reference: Reference, **options: object):
    async with client() as registry_client:
        return await index_image(registry_client, reference, IndexOptions(
            spacing=64 << 10, **options))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory):
    return build_layout_image(tmp_path_factory.mktemp("img") / "layout", "v1", LAYERS)


def test_index_publish_and_find_again_with_the_fallback_tag(image, registry, tmp_path) -> None:
    push_layout_image(image.layout, "v1", registry.host, "ws/app")
    reference = Reference.parse(f"{registry.host}/ws/app:v1")
    before, tags_before = raw_manifest(str(reference)), tags(registry.host, "ws/app")
    profile = parse_profile(json.dumps({"schemaVersion": 1, "images": [{"files": [
        {"path": "/etc/hello"}, {"path": "/bin/busybox"}, {"path": "/var/cache/big"},
        {"path": "/etc/motd"}]}]}).encode())

    report = asyncio.run(_index(reference, profile=profile))

    (manifest,) = report.manifests
    assert manifest.digest == image.manifest_digest == report.digest
    assert manifest.fallback_tag == fallback_tag(image.manifest_digest)
    assert manifest.missing_hot_files == ["/var/cache/big"]  # whited out by layer 2
    assert [layer.hot_files for layer in manifest.layers] == [2, 1]
    # The image is untouched: same manifest bytes, same digest, only the fallback tag added.
    assert raw_manifest(str(reference)) == before
    assert tags(registry.host, "ws/app") == sorted([*tags_before, manifest.fallback_tag])

    async def look_up() -> None:
        async with client() as c:
            assert await c.get_referrers(reference, image.manifest_digest) is None  # 2.8: 404
            found = await find_layer_indexes(c, reference, image.manifest_digest)
            assert sorted(found) == sorted(image.layer_digests)
            hot = {}
            for number, digest in enumerate(image.layer_digests):
                index = await fetch_index(c, reference, found[digest], str(tmp_path / "i"))
                hot[number] = index.hot_files()
                blob = registry.blob_data_path(digest).read_bytes()
                tar = gzindex.LayerReader(index, gzindex.file_fetcher(io.BytesIO(blob)))
                data = tar.read(0, index.uncompressed_size)
                assert index.header.diff_id == image.config["rootfs"]["diff_ids"][number]
                for entry in index.entries():
                    if entry.type == "reg":
                        assert tar.read_file(entry) == data[entry.offset:entry.end]
                # The fetch an asyncio caller makes: range requests to the registry.
                for span in list(index.spans())[:3]:
                    offset, length = span.compressed_range
                    piece = await c.fetch_range(reference, digest, offset, length)
                    decoded = gzindex.decode_span(index, span, piece)
                    assert decoded == data[span.uncompressed_offset:span.uncompressed_end]
                index.close()
            assert hot == {0: ["bin/busybox", "etc/motd"], 1: ["etc/hello"]}

    asyncio.run(look_up())


def test_other_referrers_are_kept_and_filtered_by_artifact_type(image, registry,
                                                                 tmp_path) -> None:
    push_layout_image(image.layout, "v1", registry.host, "ws/shared")
    reference = Reference.parse(f"{registry.host}/ws/shared:v1")
    before = raw_manifest(str(reference))
    signature = tmp_path / "signature"
    signature.write_bytes(b"not really a signature")

    async def run() -> None:
        async with client() as c:
            subject = await c.resolve(reference)
            blob = Descriptor("application/octet-stream", gzindex_digest(signature),
                              signature.stat().st_size)
            other = await push_artifact(c, reference, subject, OTHER_TYPE,
                                        [(blob, str(signature))])
            assert other.fallback_tag == fallback_tag(subject.digest)
            first = (await _index_with(c, reference, 64 << 10)).manifests[0].artifact
            again = (await _index_with(c, reference, 64 << 10)).manifests[0].artifact
            assert again == first  # the same index again: listed once
            second = (await _index_with(c, reference, 128 << 10)).manifests[0].artifact
            everything = await find_referrers(c, reference, subject.digest)
            assert [d.digest for d in everything] == [other.descriptor.digest, first, second]
            ours = await find_referrers(c, reference, subject.digest, gzindex.ARTIFACT_TYPE)
            assert {d.digest for d in ours} == {first, second}
            theirs = await find_referrers(c, reference, subject.digest, OTHER_TYPE)
            assert [d.digest for d in theirs] == [other.descriptor.digest]
            manifest, named = await read_artifact(c, reference, ours[-1])
            assert named is not None and named.digest == subject.digest
            assert manifest.config.media_type == "application/vnd.oci.empty.v1+json"
            assert manifest.extra["artifactType"] == gzindex.ARTIFACT_TYPE
            assert {layer.annotations[gzindex.LAYER_ANNOTATION] for layer in manifest.layers} \
                == set(image.layer_digests)
            found = await find_layer_indexes(c, reference, subject.digest)
            assert {i.artifact for i in found.values()} == {ours[-1].digest}

    asyncio.run(run())
    assert raw_manifest(str(reference)) == before


async def _index_with(c: RegistryClient, reference: Reference, spacing: int):
    return await index_image(c, reference, IndexOptions(spacing=spacing))


def gzindex_digest(path: Path) -> str:
    import hashlib
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_fallback_tag_that_is_no_referrers_index_is_left_alone(image, registry) -> None:
    push_layout_image(image.layout, "v1", registry.host, "ws/clash")
    reference = Reference.parse(f"{registry.host}/ws/clash:v1")
    # Someone tagged the image itself with the name the fallback would use.
    push_layout_image(image.layout, "v1", registry.host, "ws/clash",
                      fallback_tag(image.manifest_digest))
    with pytest.raises(ReferrersError, match="not an OCI image index of referrers"):
        asyncio.run(_index(reference))
    assert raw_manifest(f"{reference.registry}/ws/clash:{fallback_tag(image.manifest_digest)}") \
        == raw_manifest(str(reference))


def test_every_platform_gets_its_own_artifact(registry, tmp_path) -> None:
    built = build_two_platform_image(tmp_path / "multi", "v1", LAYERS[:1],
                                     [{"etc/arch": b"arm64\n"}])
    push_layout_image(built.layout, "v1", registry.host, "ws/multi")
    reference = Reference.parse(f"{registry.host}/ws/multi:v1")
    before = raw_manifest(str(reference))

    report = asyncio.run(_index(reference))

    assert report.digest == built.index_digest
    assert raw_manifest(str(reference)) == before
    by_platform = {m.platform: m for m in report.manifests}
    assert set(by_platform) == {"linux/amd64", "linux/arm64"}
    for platform, manifest in by_platform.items():
        assert manifest.digest == built.images[platform].manifest_digest
        assert manifest.artifact

    async def look_up() -> None:
        async with client() as c:
            for platform, manifest in by_platform.items():
                found = await find_layer_indexes(c, reference, manifest.digest)
                assert sorted(found) == sorted(built.images[platform].layer_digests)

    asyncio.run(look_up())
    shown = lazypull("index", f"docker://{reference}", "--plain-http", "--show", "--json")
    assert shown.returncode == 0, shown.stderr
    listed = {m["platform"]: m for m in json.loads(shown.stdout)["manifests"]}
    assert {p: sorted(m["layers"]) for p, m in listed.items()} == \
        {p: sorted(built.images[p].layer_digests) for p in by_platform}
    only = asyncio.run(_index(reference, platforms=("linux/arm64",)))
    assert [m.platform for m in only.manifests] == ["linux/arm64"]


def test_a_corrupt_layer_is_refused_and_nothing_is_published(image, registry_factory) -> None:
    registry = registry_factory()  # its own: blobs are shared by every repository
    push_layout_image(image.layout, "v1", registry.host, "ws/corrupt")
    reference = Reference.parse(f"{registry.host}/ws/corrupt:v1")
    path = registry.blob_data_path(image.layer_digests[1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=image.layer_digests[1]):
        asyncio.run(_index(reference))
    assert fallback_tag(image.manifest_digest) not in tags(registry.host, "ws/corrupt")


def test_a_media_type_check_keeps_non_gzip_layers_out() -> None:
    from indexer.image import skip_reason
    gz = Descriptor(mt.OCI_LAYER_GZIP, "sha256:" + "a" * 64, 1)
    assert skip_reason(gz) is None
    assert skip_reason(Descriptor(mt.OCI_LAYER_ZSTD, gz.digest, 1)).startswith("not gzip")
    estargz = Descriptor(mt.OCI_LAYER_GZIP, gz.digest, 1, annotations={
        "containerd.io/snapshot/stargz/toc.digest": "sha256:" + "b" * 64})
    assert skip_reason(estargz).startswith("eStargz")


def lazypull(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, timeout=600)


async def _fetch_index(reference: Reference, manifest: str, layer: str,
                       workdir: str) -> gzindex.GzipIndex:
    async with client() as c:
        found = await find_layer_indexes(c, reference, manifest)
        return await fetch_index(c, reference, found[layer], workdir)


def test_cli_indexes_an_image_that_plain_containerd_still_pulls_as_before(
        image, registry, containerd, tmp_path) -> None:
    src = push_layout_image(image.layout, "v1", registry.host, "ws/cli")
    before = raw_manifest(src.removeprefix("docker://"))
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"schemaVersion": 1, "images": [
        {"reference": f"{registry.host}/ws/cli:v1", "files": [{"path": "etc/hello"}]}]}))

    done = lazypull("index", src, "--plain-http", "--prefetch-profile", str(profile),
                    "--spacing", "65536", "--json")

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["digest"] == image.manifest_digest
    layers = report["manifests"][0]["layers"]
    assert [layer["hot_files"] for layer in layers] == [0, 1]
    assert layers[0]["hot_checkpoints"] == 0 and layers[1]["hot_checkpoints"] >= 1
    assert all(layer["index_size"] < layer["size"] for layer in layers)
    # Hot checkpoints: the span holding etc/hello is cut short of the 64 KiB spacing
    # (data.bin's random bytes come right after it), so a prefetch fetches little else.
    hot_index = asyncio.run(_fetch_index(Reference.parse(src.removeprefix("docker://")),
                                         image.manifest_digest, image.layer_digests[1],
                                         str(tmp_path / "hot")))
    hello = hot_index.find("etc/hello")
    hot_spans = hot_index.spans_for(hello.offset, hello.end)
    assert sum(hot_index.span(n).uncompressed_size for n in hot_spans) < 65536
    hot_index.close()
    shown = lazypull("index", src, "--plain-http", "--show", "--json")
    assert shown.returncode == 0, shown.stderr
    (listed,) = json.loads(shown.stdout)["manifests"]
    assert listed["digest"] == image.manifest_digest
    assert sorted(listed["layers"]) == sorted(image.layer_digests)
    assert {v["index"] for v in listed["layers"].values()} == \
        {layer["index_digest"] for layer in layers}
    summary = lazypull("index", src, "--plain-http")
    assert summary.returncode == 0, summary.stderr
    assert f"{image.manifest_digest} unchanged" in summary.stdout
    assert "fallback tag sha256-" in summary.stdout

    assert raw_manifest(src.removeprefix("docker://")) == before
    ref = src.removeprefix("docker://")
    containerd.ctr("images", "pull", "--plain-http", ref)
    listing = containerd.ctr("images", "ls", "-q").stdout.split()
    assert ref in listing
    check = containerd.ctr("images", "ls").stdout
    assert image.manifest_digest in check


def test_cli_reports_bad_input_clearly(registry, tmp_path) -> None:
    missing = lazypull("index", f"docker://{registry.host}/ws/none:v1", "--plain-http")
    assert missing.returncode == 4 and "not found" in missing.stderr
    spacing = lazypull("index", f"docker://{registry.host}/ws/none:v1", "--spacing", "10")
    assert spacing.returncode == 2 and "--spacing must be between" in spacing.stderr
    bad_profile = tmp_path / "p.json"
    bad_profile.write_text("{}")
    profile = lazypull("index", f"{registry.host}/ws/none:v1", "--prefetch-profile",
                       str(bad_profile))
    assert profile.returncode == 2 and "schemaVersion" in profile.stderr
