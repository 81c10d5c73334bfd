"""`ImageConverter` from OCI layout to OCI layout, with real umoci-built images."""

import asyncio
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import zstandard

from converter.access_profile import parse_profile
from converter.image import ConversionError, ConvertOptions, ImageConverter
from estargz import BlobReader, Compression, FileSource
from estargz.verify import verify_blob
from oci import mediatypes as mt
from oci.layout import LayoutStore

from .images import (
    Dir,
    File,
    Symlink,
    blob_path,
    build_layout_image,
    build_two_platform_image,
    skopeo_inspect,
)
from .layers import big_payload

TOC = "containerd.io/snapshot/stargz/toc.digest"
LAYERS = [
    {"bin": Dir(), "bin/busybox": File(b"\x7fELF fake busybox" * 100, 0o755),
     "bin/sh": Symlink("busybox"), "etc/os-release": b"ID=test\n",
     "usr/lib/libbig.so": big_payload(300_000)},
    {"usr/lib/python3/os.py": b"import sys\n" * 50, "usr/lib/python3/json/__init__.py": b"#j\n",
     "usr/bin/python3": File(b"\x7fELF python" * 1000, 0o755), "etc/os-release": b"ID=new\n"},
    {"app/main.py": b"print('ready')\n", "usr/lib/libbig.so": None},  # a whiteout
]
HOT = ["/usr/bin/python3", "usr/lib/python3/**/*.py", "etc/os-release", "bin/sh", "no/such/file"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory):
    layout = tmp_path_factory.mktemp("src") / "layout"
    return build_layout_image(layout, "v1", LAYERS, labels={"team": "ws"}, env={"LANG": "C"},
                              cmd=["/bin/sh"])


def convert(src: str, dst: str, **options: object):
    async def go():
        return await ImageConverter(LayoutStore.from_reference(src),
                                    LayoutStore.from_reference(dst),
                                    ConvertOptions(**options)).run()
    return asyncio.run(go())


def load(layout: Path, digest: str) -> dict:
    return json.loads(blob_path(layout, digest).read_bytes())


def decompressed(path: Path, media_type: str) -> bytes:
    data = path.read_bytes()
    if media_type in mt.ZSTD_LAYERS:
        return zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True).read()
    return gzip.decompress(data)


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD])
def test_converts_every_layer_and_keeps_the_image(source, tmp_path, compression) -> None:
    dst = tmp_path / "dst"
    report = convert(source.reference, f"oci:{dst}:v1-lazy", compression=compression,
                     prefetch_patterns=tuple(HOT), chunk_size=65536)
    manifest = load(dst, report.digest)
    config = load(dst, manifest["config"]["digest"])
    # Everything but the layers and diff_ids is the source image's.
    assert config["config"]["Labels"] == {"team": "ws"}
    assert "LANG=C" in config["config"]["Env"] and config["config"]["Cmd"] == ["/bin/sh"]
    assert config["history"] == source.config["history"]
    want_type = mt.OCI_LAYER_ZSTD if compression is Compression.ZSTD else mt.OCI_LAYER_GZIP
    assert [layer["mediaType"] for layer in manifest["layers"]] == [want_type] * 3
    for index, layer in enumerate(manifest["layers"]):
        path = blob_path(dst, layer["digest"])
        with FileSource.open(str(path)) as blob:
            checked = verify_blob(blob, layer["annotations"][TOC])
        stream = decompressed(path, layer["mediaType"])
        assert checked.diff_id == config["rootfs"]["diff_ids"][index]
        assert "sha256:" + hashlib.sha256(stream).hexdigest() == checked.diff_id
        assert int(layer["annotations"]["io.containers.estargz.uncompressed-size"]) == \
            len(stream)
    # Hot files land in the layer a container reads them from, before the landmark.
    hot_by_layer = [layer.hot_files for layer in report.manifests[0].layers]
    assert hot_by_layer == [1, 4, 0]  # bin/sh | python3, os.py, json/__init__.py, os-release
    top = manifest["layers"][1]
    with FileSource.open(str(blob_path(dst, top["digest"]))) as blob:
        layer = BlobReader.open(blob, top["annotations"][TOC]).layer
        for path in ("usr/bin/python3", "usr/lib/python3/os.py", "etc/os-release"):
            assert layer.lookup(path).chunks[-1].blob_end <= layer.prefetch_end
    assert report.manifests[0].missing_hot_files == ["no/such/file"]
    inspected = skopeo_inspect(f"oci:{dst}:v1-lazy")
    assert inspected["Labels"] == {"team": "ws"} and len(inspected["Layers"]) == 3


def test_second_run_uses_the_cache_and_gives_the_same_image(source, tmp_path) -> None:
    cache = str(tmp_path / "cache")
    first = convert(source.reference, f"oci:{tmp_path / 'a'}:t", cache_dir=cache,
                    prefetch_patterns=tuple(HOT))
    second = convert(source.reference, f"oci:{tmp_path / 'b'}:t", cache_dir=cache,
                     prefetch_patterns=tuple(HOT))
    assert first.digest == second.digest
    assert not any(layer.cached for layer in first.manifests[0].layers)
    assert all(layer.cached for layer in second.manifests[0].layers)
    # A different hot-file list changes the layers that hold those files only.
    third = convert(source.reference, f"oci:{tmp_path / 'c'}:t", cache_dir=cache,
                    prefetch_patterns=("app/main.py",))
    assert [layer.cached for layer in third.manifests[0].layers] == [False, False, False]
    assert third.digest != first.digest


def test_converted_layers_pass_through(source, tmp_path) -> None:
    once = f"oci:{tmp_path / 'once'}:t"
    first = convert(source.reference, once, prefetch_patterns=tuple(HOT))
    again = convert(once, f"oci:{tmp_path / 'twice'}:t", prefetch_patterns=tuple(HOT))
    assert all(layer.passthrough for layer in again.manifests[0].layers)
    assert again.digest == first.digest


def test_multi_platform_index(tmp_path) -> None:
    src = build_two_platform_image(tmp_path / "src", "multi", LAYERS[:2])
    dst = tmp_path / "dst"
    report = convert(src.reference, f"oci:{dst}:multi")
    index = load(dst, report.digest)
    assert report.media_type == mt.OCI_INDEX
    assert sorted(m["platform"]["architecture"] for m in index["manifests"]) == \
        ["amd64", "arm64"]
    for entry in index["manifests"]:
        manifest = load(dst, entry["digest"])
        assert all(TOC in layer["annotations"] for layer in manifest["layers"])
    only = convert(src.reference, f"oci:{tmp_path / 'one'}:multi", platforms=("linux/arm64",))
    assert [m.platform for m in only.manifests] == ["linux/arm64"]
    with pytest.raises(ConversionError, match="no platform matches"):
        convert(src.reference, f"oci:{tmp_path / 'none'}:multi", platforms=("linux/s390x",))


def test_profile_places_files_in_the_named_layer(source, tmp_path) -> None:
    profile = parse_profile(json.dumps({"schemaVersion": 1, "images": [{"files": [
        {"path": "/etc/os-release", "layer": source.layer_digests[0]},
        {"path": "app/main.py"},
    ]}]}).encode())
    report = convert(source.reference, f"oci:{tmp_path / 'p'}:t", profile=profile)
    assert [layer.hot_files for layer in report.manifests[0].layers] == [1, 0, 1]


def _rewrite(layout: Path, tag: str, edit) -> None:
    """Edit the tagged manifest (and its config) in place, keeping the layout valid."""
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"]
                 if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = load(layout, entry["digest"])
    config = load(layout, manifest["config"]["digest"])
    edit(manifest, config)
    data = json.dumps(config).encode()
    manifest["config"]["digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
    manifest["config"]["size"] = len(data)
    blob_path(layout, manifest["config"]["digest"]).write_bytes(data)
    data = json.dumps(manifest).encode()
    entry["digest"], entry["size"] = "sha256:" + hashlib.sha256(data).hexdigest(), len(data)
    blob_path(layout, entry["digest"]).write_bytes(data)
    (layout / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m, c: c["rootfs"]["diff_ids"].__setitem__(1, "sha256:" + "0" * 64),
     "layer 1 .* uncompressed content is sha256:.* but the config says sha256:0000"),
    (lambda m, c: c["rootfs"]["diff_ids"].pop(), "config lists 2 diff_ids for 3 layers"),
    (lambda m, c: m["layers"][2].__setitem__("mediaType", mt.DOCKER_LAYER_FOREIGN),
     "layer 2 .* is a foreign layer"),
    (lambda m, c: m["layers"][0].__setitem__("mediaType", "application/x-weird"),
     "layer 0 .* has unknown media type application/x-weird"),
])
def test_bad_images_give_errors_naming_the_layer(source, tmp_path, edit, message) -> None:
    src = tmp_path / "src"
    build_layout_image(src, "bad", LAYERS)
    _rewrite(src, "bad", edit)
    dst = tmp_path / "dst"
    with pytest.raises(ConversionError, match=message):
        convert(f"oci:{src}:bad", f"oci:{dst}:bad")
    # Nothing is tagged at the destination.
    assert not (dst / "index.json").exists() or \
        json.loads((dst / "index.json").read_text())["manifests"] == []


def test_tar_of_converted_layer_has_landmark_after_hot_files(source, tmp_path) -> None:
    dst = tmp_path / "d"
    report = convert(source.reference, f"oci:{dst}:t", prefetch_patterns=("usr/bin/python3",))
    layer = load(dst, report.digest)["layers"][1]
    with tarfile.open(fileobj=io.BytesIO(blob_path(dst, layer["digest"]).read_bytes())) as tar:
        names = tar.getnames()
    assert names.index(".prefetch.landmark") == names.index("usr/bin/python3") + 1


def test_schema1_manifests_are_refused(tmp_path) -> None:
    layout = tmp_path / "old"
    layout.mkdir()
    manifest = json.dumps({"schemaVersion": 1, "name": "x", "tag": "t", "fsLayers": []}).encode()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    blob_path(layout, digest).parent.mkdir(parents=True)
    blob_path(layout, digest).write_bytes(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": mt.DOCKER_SCHEMA1_SIGNED, "digest": digest, "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "t"}}]}))
    with pytest.raises(ConversionError, match="schema 1 manifests are not supported"):
        convert(f"oci:{layout}:t", f"oci:{tmp_path / 'dst'}:t")
