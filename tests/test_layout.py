"""OCI image layouts: LayoutStore round trips, and interoperability with umoci and skopeo."""

import asyncio
import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from oci import mediatypes as mt
from oci.digest import DigestMismatchError, sha256_of
from oci.layout import CHUNK_SIZE, REF_NAME, LayoutStore, parse_layout_reference
from oci.manifest import Descriptor, Index, Manifest, parse_manifest
from oci.reference import ReferenceError
from oci.store import NotFoundError, StoreError

from .images import (
    WHITEOUT,
    File,
    Symlink,
    build_layout_image,
    build_two_platform_image,
    read_index_json,
    run_tool,
    skopeo,
    skopeo_inspect,
)
from .layers import big_payload


def collect(store: LayoutStore, descriptor: Descriptor) -> list[bytes]:
    async def chunks() -> list[bytes]:
        return [chunk async for chunk in store.get_blob(descriptor)]
    return asyncio.run(chunks())


def blob_file(tmp_path: Path, data: bytes, media_type: str) -> tuple[Descriptor, str]:
    path = tmp_path / f"src-{sha256_of(data)[7:19]}"
    path.write_bytes(data)
    return Descriptor(media_type, sha256_of(data), len(data)), str(path)


def put_image(store: LayoutStore, tmp_path: Path, tag: str | None, seed: int = 1) -> Manifest:
    """Store a config and two layers (one over CHUNK_SIZE) and a manifest naming them."""
    config, config_path = blob_file(tmp_path, json.dumps({"seed": seed}).encode(), mt.OCI_CONFIG)
    small, small_path = blob_file(tmp_path, gzip.compress(b"x" * seed), mt.OCI_LAYER_GZIP)
    big, big_path = blob_file(tmp_path, big_payload(CHUNK_SIZE * 2 + 1234, seed),
                              mt.OCI_LAYER_GZIP)
    for descriptor, path in ((config, config_path), (small, small_path), (big, big_path)):
        asyncio.run(store.put_blob(descriptor, path))
    manifest = Manifest(mt.OCI_MANIFEST, config, [small, big])
    asyncio.run(store.put_manifest(manifest.to_bytes(), mt.OCI_MANIFEST, tag))
    return manifest


def tagged(layout: Path) -> dict[str, str]:
    return {m["annotations"][REF_NAME]: m["digest"] for m in read_index_json(layout)["manifests"]}


@pytest.mark.parametrize(("text", "expected"), [
    ("oci:/srv/images", ("/srv/images", None)),
    ("oci:relative/dir:v1.2", ("relative/dir", "v1.2")),
    ("oci:/srv/images:example.com/app:1.0", ("/srv/images", "example.com/app:1.0")),
    ("oci:/srv/images:", ("/srv/images", None)),
])
def test_parse_layout_reference_splits_like_skopeo(text: str, expected: tuple) -> None:
    assert parse_layout_reference(text) == expected


@pytest.mark.parametrize("text", [
    "/srv/images:v1", "docker://host/repo:v1", "oci:", "oci::v1", "oci:/d:-v1", "oci:/d:a..b",
    "oci:/d:with space",
])
def test_parse_layout_reference_rejects(text: str) -> None:
    with pytest.raises(ReferenceError):
        parse_layout_reference(text)


def test_round_trip_by_tag_and_digest(tmp_path: Path) -> None:
    layout = tmp_path / "new" / "layout"  # created on first write
    store = LayoutStore.from_reference(f"oci:{layout}:v1")
    assert (store.name, store.default_object) == (f"oci:{layout}:v1", "v1")
    manifest = put_image(store, tmp_path, "v1")

    assert json.loads((layout / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    data, media_type, digest = asyncio.run(store.get_manifest("v1"))
    assert (data, media_type, digest) == (manifest.to_bytes(), mt.OCI_MANIFEST,
                                          sha256_of(manifest.to_bytes()))
    assert asyncio.run(store.get_manifest(digest)) == (data, media_type, digest)
    assert tagged(layout) == {"v1": digest}

    big = manifest.layers[1]
    chunks = collect(store, big)
    assert [len(c) for c in chunks] == [CHUNK_SIZE, CHUNK_SIZE, 1234]
    assert sha256_of(b"".join(chunks)) == big.digest
    assert collect(store, manifest.config) == [json.dumps({"seed": 1}).encode()]
    assert asyncio.run(store.has_blob(big))
    absent = Descriptor(mt.OCI_LAYER_GZIP, sha256_of(b"absent"), 6)
    assert not asyncio.run(store.has_blob(absent))
    asyncio.run(store.aclose())


def test_retag_replaces_the_index_entry(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "layout")
    first = put_image(store, tmp_path, "stable", seed=1)
    put_image(store, tmp_path, "other", seed=2)
    second = put_image(store, tmp_path, "stable", seed=3)

    entries = read_index_json(tmp_path / "layout")["manifests"]
    assert [e["annotations"][REF_NAME] for e in entries] == ["stable", "other"]
    assert entries[0]["digest"] == sha256_of(second.to_bytes())
    # The replaced manifest stays reachable by digest, as in skopeo's layouts.
    assert asyncio.run(store.get_manifest(sha256_of(first.to_bytes())))[0] == first.to_bytes()

    before = (tmp_path / "layout" / "index.json").read_bytes()
    untagged = put_image(store, tmp_path, None, seed=4)
    assert (tmp_path / "layout" / "index.json").read_bytes() == before
    digest = sha256_of(untagged.to_bytes())
    assert asyncio.run(store.get_manifest(digest)) == (untagged.to_bytes(), mt.OCI_MANIFEST,
                                                       digest)


def test_corrupted_blobs_fail_verification(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    store = LayoutStore(layout, "v1")
    manifest = put_image(store, tmp_path, "v1")
    big, small = manifest.layers[1], manifest.layers[0]

    path = layout / "blobs" / "sha256" / big.digest.removeprefix("sha256:")
    content = bytearray(path.read_bytes())
    content[CHUNK_SIZE + 5] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(content))
    with pytest.raises(DigestMismatchError, match=big.digest):
        collect(store, big)

    small_path = layout / "blobs" / "sha256" / small.digest.removeprefix("sha256:")
    small_path.write_bytes(small_path.read_bytes()[:-1])
    with pytest.raises(DigestMismatchError, match="bytes, expected"):
        collect(store, small)
    assert not asyncio.run(store.has_blob(small))  # so a copy would write it again

    data, _, digest = asyncio.run(store.get_manifest("v1"))
    manifest_path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    manifest_path.write_bytes(data.replace(b"schemaVersion", b"schemaVersio_"))
    with pytest.raises(DigestMismatchError):
        asyncio.run(store.get_manifest("v1"))
    with pytest.raises(DigestMismatchError):
        asyncio.run(store.get_manifest(digest))


def test_put_blob_refuses_content_that_does_not_match(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "layout")
    descriptor, path = blob_file(tmp_path, b"promised", mt.OCI_LAYER_GZIP)
    Path(path).write_bytes(b"imposter")  # same size, other bytes
    with pytest.raises(DigestMismatchError):
        asyncio.run(store.put_blob(descriptor, path))
    Path(path).write_bytes(b"promised!")
    with pytest.raises(DigestMismatchError, match="9 bytes, expected 8"):
        asyncio.run(store.put_blob(descriptor, path))
    leftovers = [p.name for p in (tmp_path / "layout" / "blobs").rglob("*") if p.is_file()]
    assert leftovers == []


def test_missing_things_raise_not_found(tmp_path: Path) -> None:
    missing_dir = LayoutStore(tmp_path / "nowhere", "v1")
    with pytest.raises(NotFoundError, match="no such directory"):
        asyncio.run(missing_dir.get_manifest("v1"))
    with pytest.raises(NotFoundError, match="not an OCI image layout"):
        asyncio.run(LayoutStore(tmp_path).get_manifest("v1"))

    store = LayoutStore(tmp_path / "layout", "v1")
    manifest = put_image(store, tmp_path, "v1")
    with pytest.raises(NotFoundError, match="no image tagged 'v2'"):
        asyncio.run(store.get_manifest("v2"))
    absent = sha256_of(b"absent")
    with pytest.raises(NotFoundError, match=absent):
        asyncio.run(store.get_manifest(absent))
    with pytest.raises(NotFoundError, match=absent):
        collect(store, Descriptor(mt.OCI_LAYER_GZIP, absent, 6))
    assert manifest.layers  # the layout itself is intact


def test_untagged_reference_means_the_only_image(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    manifest = put_image(LayoutStore(layout), tmp_path, "only")
    bare = LayoutStore.from_reference(f"oci:{layout}")
    assert bare.default_object is None
    assert asyncio.run(bare.get_manifest(None))[0] == manifest.to_bytes()
    put_image(LayoutStore(layout), tmp_path, "second", seed=2)
    with pytest.raises(StoreError, match="name one of: only, second"):
        asyncio.run(bare.get_manifest(None))


def layer_members(blob: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return {m.name.removeprefix("./"): m for m in tar.getmembers()}


LAYERS = [
    {"etc/os-release": b"ID=test\n", "usr/bin/tool": File(b"#!/bin/sh\necho hi\n", 0o755),
     "usr/bin/alias": Symlink("tool")},
    {"opt/app/data.bin": big_payload(300_000), "etc/old.conf": b"old\n"},
    {"etc/old.conf": WHITEOUT, "etc/os-release": b"ID=test\nVERSION=2\n"},
]
LABELS = {"org.opencontainers.image.title": "layout-test", "tier": "workspace"}


def test_umoci_image_is_readable_by_skopeo_and_the_store(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    image = build_layout_image(layout, "v1", LAYERS, labels=LABELS, env={"MODE": "test"},
                               cmd=["/usr/bin/tool"], history=["base", "app", "update"])
    info = skopeo_inspect(image.reference)
    assert len(info["Layers"]) == 3
    assert info["Labels"] == LABELS
    assert "MODE=test" in info["Env"]
    assert info["Digest"] == image.manifest_digest
    assert [h.get("created_by") for h in image.config["history"]][:3] == ["base", "app", "update"]

    store = LayoutStore.from_reference(image.reference)
    data, media_type, digest = asyncio.run(store.get_manifest(store.default_object))
    assert (media_type, digest) == (mt.OCI_MANIFEST, image.manifest_digest)
    parsed = parse_manifest(data, media_type)
    assert isinstance(parsed, Manifest)
    assert all(layer.media_type == mt.OCI_LAYER_GZIP for layer in parsed.layers)
    # umoci leaves mediaType out of its manifests: by digest it must still be recognised.
    assert asyncio.run(store.get_manifest(digest))[1] == mt.OCI_MANIFEST
    blobs = [b"".join(collect(store, layer)) for layer in parsed.layers]
    first, _, third = (layer_members(blob) for blob in blobs)
    assert first["usr/bin/tool"].mode & 0o777 == 0o755
    assert first["usr/bin/alias"].issym() and first["usr/bin/alias"].linkname == "tool"
    assert "etc/.wh.old.conf" in third
    config = json.loads(b"".join(collect(store, parsed.config)))
    assert config["config"]["Labels"] == LABELS


def test_two_platform_index(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    multi = build_two_platform_image(layout, "multi", LAYERS[:1],
                                     arm64_layers=[{"etc/arch": b"arm64\n"}], labels=LABELS)
    raw = json.loads(skopeo("inspect", "--raw", multi.reference))
    assert [m["platform"]["architecture"] for m in raw["manifests"]] == ["amd64", "arm64"]
    arm = skopeo_inspect(multi.reference, "--override-arch", "arm64")
    # skopeo reports the digest of what the reference names (the index) and the chosen layers.
    assert (arm["Architecture"], arm["Digest"]) == ("arm64", multi.index_digest)
    assert arm["Layers"] == multi.images["linux/arm64"].layer_digests

    store = LayoutStore(layout, "multi")
    data, media_type, digest = asyncio.run(store.get_manifest("multi"))
    assert (media_type, digest) == (mt.OCI_INDEX, multi.index_digest)
    index = parse_manifest(data, media_type)
    assert isinstance(index, Index)
    assert [d.platform_string for d in index.manifests] == ["linux/amd64", "linux/arm64"]
    amd, arm64 = index.manifests
    assert amd.matches_platforms(()) and amd.matches_platforms(("linux/amd64",))
    assert arm64.matches_platforms(("linux/amd64", "linux/arm64"))
    assert not arm64.matches_platforms(("linux/amd64",))
    assert not amd.matches_platforms(("linux/amd",))  # whole components only
    child = asyncio.run(store.get_manifest(index.manifests[1].digest))
    assert child[1] == mt.OCI_MANIFEST


async def copy_image(source: LayoutStore, dest: LayoutStore, tag: str, work: Path) -> str:
    """Copy an image or index, blobs first, the way a converter writes a layout."""
    async def copy(digest_or_tag: str, tag: str | None) -> str:
        data, media_type, _ = await source.get_manifest(digest_or_tag)
        parsed = parse_manifest(data, media_type)
        if isinstance(parsed, Index):
            for child in parsed.manifests:
                await copy(child.digest, None)
        else:
            for blob in [parsed.config, *parsed.layers]:
                if await dest.has_blob(blob):
                    continue
                staged = work / blob.digest.replace(":", "-")
                with staged.open("wb") as out:
                    async for chunk in source.get_blob(blob):
                        out.write(chunk)
                await dest.put_blob(blob, str(staged))
        return await dest.put_manifest(data, media_type, tag)
    return await copy(tag, tag)


def test_layout_written_by_the_store_is_readable_by_skopeo_and_umoci(tmp_path: Path) -> None:
    source_dir, copy_dir, skopeo_dir = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    image = build_layout_image(source_dir, "t", LAYERS, labels=LABELS)
    multi = build_two_platform_image(source_dir, "multi", LAYERS[:1])
    dest = LayoutStore(copy_dir)
    source = LayoutStore(source_dir)
    assert asyncio.run(copy_image(source, dest, "t", tmp_path)) == image.manifest_digest
    assert asyncio.run(copy_image(source, dest, "multi", tmp_path)) == multi.index_digest

    info = skopeo_inspect(f"oci:{copy_dir}:t")
    assert (info["Digest"], info["Labels"], len(info["Layers"])) == (image.manifest_digest,
                                                                     LABELS, 3)
    assert sorted(run_tool("umoci", "ls", "--layout", copy_dir).split()) == ["multi", "t"]
    bundle = tmp_path / "bundle"
    run_tool("umoci", "unpack", "--image", f"{copy_dir}:t", bundle)
    assert (bundle / "rootfs" / "etc" / "os-release").read_bytes() == b"ID=test\nVERSION=2\n"
    assert not (bundle / "rootfs" / "etc" / "old.conf").exists()

    skopeo("copy", f"oci:{copy_dir}:t", f"oci:{skopeo_dir}:t")
    skopeo("copy", "--all", f"oci:{copy_dir}:multi", f"oci:{skopeo_dir}:multi")
    assert tagged(skopeo_dir) == {"t": image.manifest_digest, "multi": multi.index_digest}
    back = LayoutStore(skopeo_dir, "t")
    assert asyncio.run(back.get_manifest("t"))[2] == image.manifest_digest


def test_tags_with_colons_name_the_same_image_as_in_skopeo(tmp_path: Path) -> None:
    image = build_layout_image(tmp_path / "a", "t", LAYERS[:1])
    skopeo("copy", image.reference, f"oci:{tmp_path}/b:example.com/app:1.0")
    store = LayoutStore.from_reference(f"oci:{tmp_path}/b:example.com/app:1.0")
    data, media_type, digest = asyncio.run(store.get_manifest(store.default_object))
    assert digest == image.manifest_digest
    asyncio.run(store.put_manifest(data, media_type, "localhost:5000/app:2"))
    assert skopeo_inspect(f"oci:{tmp_path}/b:localhost:5000/app:2")["Digest"] == digest
