"""Converting an image whose layer holds many files, in bounded memory: the layers'
path listings stay on disk while the hot files are placed."""

import asyncio
import hashlib
import io
import json
import tarfile
import tracemalloc
import zlib
from pathlib import Path

from converter.image import ConvertOptions, ImageConverter
from estargz import BlobReader, FileSource
from oci.layout import LayoutStore

from .test_writer_memory import many_files_tar

FILES = 100_000
PATTERNS = ("d000[1-3]/*", "/d0099/f0099999", "d0050/f005000?", "no/such/file")
# Placing these patterns used to hold every path of both layers in a list, a set per
# layer, a union and a set of that: a traced peak of 21 MiB for the whole conversion.
# Now the listings are read from disk, and the peak, 7 MiB, is the writer's.
PEAK_BOUND = 12 << 20


def _gzip_blob(blobs: Path, data: io.BufferedReader) -> tuple[str, int, str]:
    """Compress what `data` holds into a blob: (digest, size, diff_id)."""
    deflater = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    plain, packed = hashlib.sha256(), hashlib.sha256()
    staging = blobs / "staging"
    with open(staging, "wb") as out:
        while piece := data.read(1 << 20):
            plain.update(piece)
            compressed = deflater.compress(piece)
            packed.update(compressed)
            out.write(compressed)
        compressed = deflater.flush()
        packed.update(compressed)
        out.write(compressed)
    digest = packed.hexdigest()
    staging.rename(blobs / digest)
    return "sha256:" + digest, (blobs / digest).stat().st_size, "sha256:" + plain.hexdigest()


def _json_blob(blobs: Path, doc: dict) -> tuple[str, int]:
    data = json.dumps(doc).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return "sha256:" + digest, len(data)


def many_files_image(tmp_path: Path) -> str:
    """An OCI layout: a layer of FILES small files, a thousand to a directory, and a
    layer over it that whites out d0001, makes d0002 opaque and adds two files."""
    layout = tmp_path / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    many_files_tar(tmp_path / "base.tar", FILES)
    top = io.BytesIO()
    with tarfile.open(fileobj=top, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((".wh.d0001", b""), ("d0002/.wh..wh..opq", b""),
                           ("d0002/new", b"new\n"), ("d0003/f0003000", b"changed\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    layers = []
    with open(tmp_path / "base.tar", "rb") as base:
        layers.append(_gzip_blob(blobs, base))  # type: ignore[arg-type]
    top.seek(0)
    layers.append(_gzip_blob(blobs, top))  # type: ignore[arg-type]
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [diff_id for _, _, diff_id in layers]}}
    config_digest, config_size = _json_blob(blobs, config)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_digest, "size": config_size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": digest, "size": size} for digest, size, _ in layers]}
    manifest_digest, manifest_size = _json_blob(blobs, manifest)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
        "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    return f"oci:{layout}:v1"


def test_many_files_image_converts_in_bounded_memory(tmp_path: Path) -> None:
    """(The zstd TOC of many files, the other thing that grew with them, has its own
    test in test_writer_memory.)"""
    source = many_files_image(tmp_path)
    destination = tmp_path / "converted"
    options = ConvertOptions(prefetch_patterns=PATTERNS, workdir=str(tmp_path))

    async def convert():
        return await ImageConverter(LayoutStore.from_reference(source),
                                    LayoutStore.from_reference(f"oci:{destination}:v1"),
                                    options).run()

    tracemalloc.start()
    try:
        report = asyncio.run(convert())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    (manifest,) = report.manifests
    # d0001 is whited out and d0002 opaque above, so their files are missing; of d0003
    # the top layer holds one, and the opaque marker matches a pattern too.
    assert [layer.hot_files for layer in manifest.layers] == [999 + 1 + 10, 3]
    missing = manifest.missing_hot_files
    assert len(missing) == 1 + 1000 + 1000
    assert missing[:3] == ["no/such/file", "d0001/f0001000", "d0001/f0001001"]
    assert missing[-1] == "d0002/f0002999"
    base = manifest.layers[0]
    blob = destination / "blobs" / "sha256" / base.digest.removeprefix("sha256:")
    with FileSource.open(str(blob)) as blob_source:
        layer = BlobReader.open(blob_source, base.toc_digest).layer
        hot = layer.lookup("d0099/f0099999")
        assert hot is not None and hot.chunks[-1].blob_end <= layer.prefetch_end
    assert peak < PEAK_BOUND, f"peak of {peak >> 20} MiB"
