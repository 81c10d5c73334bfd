"""tar -> blob -> decompressed stream gives back the same entries, for both formats."""

import gzip
import hashlib
import io
import subprocess
import tarfile

import pytest
import zstandard

from estargz import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    BlobReader,
    BuildOptions,
    Compression,
    FileSource,
    build,
)
from estargz.verify import verify_blob

from .layers import LONG_NAME, big_payload, coverage_tar

FORMATS = [Compression.GZIP, Compression.ZSTD]
CHUNK = 4096


def convert(tar_bytes: bytes, **options: object) -> tuple[bytes, object]:
    out = io.BytesIO()
    result = build(io.BytesIO(tar_bytes), out, BuildOptions(**options))
    return out.getvalue(), result


def decompress(compression: Compression, blob: bytes) -> bytes:
    if compression is Compression.GZIP:
        return gzip.decompress(blob)
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
    return reader.read()


def members(tar_bytes: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        for info in tar:
            f = tar.extractfile(info) if info.isreg() else None
            out[info.name] = (info, f.read() if f else b"")
    return out


def tar_names(stream: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r:") as tar:
        return tar.getnames()


def open_reader(blob: bytes, toc_digest: str) -> BlobReader:
    return BlobReader.open(FileSource(io.BytesIO(blob)), toc_digest)


METADATA = ("type", "mode", "uid", "gid", "uname", "gname", "mtime", "linkname", "devmajor",
            "devminor", "size")


@pytest.mark.parametrize("compression", FORMATS)
@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_stream_is_the_input_tar(compression: Compression, tar_format: int) -> None:
    source = coverage_tar(tar_format)
    blob, result = convert(source, compression=compression, chunk_size=CHUNK)
    stream = decompress(compression, blob)
    assert "sha256:" + hashlib.sha256(stream).hexdigest() == result.diff_id
    assert len(stream) == result.uncompressed_size
    want, got = members(source), members(stream)
    extra = {"stargz.index.json"} if compression is Compression.GZIP else set()
    assert set(got) == set(want) | {NO_PREFETCH_LANDMARK} | extra
    for name, (info, data) in want.items():
        out_info, out_data = got[name]
        assert out_data == data, name
        for field in METADATA:
            assert getattr(out_info, field) == getattr(info, field), (name, field)
        assert out_info.pax_headers.get("SCHILY.xattr.security.capability") == \
            info.pax_headers.get("SCHILY.xattr.security.capability")


def test_gzip_blob_is_plain_gzip_for_the_system_tools(tmp_path) -> None:
    blob, result = convert(coverage_tar(), chunk_size=CHUNK)
    path = tmp_path / "layer.gz"
    path.write_bytes(blob)
    stream = subprocess.run(["gzip", "-dc", str(path)], check=True, capture_output=True).stdout
    assert "sha256:" + hashlib.sha256(stream).hexdigest() == result.diff_id
    listing = subprocess.run(["tar", "-tvzf", str(path)], check=True, capture_output=True,
                             text=True).stdout
    assert LONG_NAME in listing and "usr/bin/tool-link link to usr/bin/tool" in listing


@pytest.mark.parametrize("compression", FORMATS)
def test_reader_tree_matches_the_input(compression: Compression) -> None:
    source = coverage_tar()
    blob, result = convert(source, compression=compression, chunk_size=CHUNK)
    reader = open_reader(blob, result.toc_digest)
    layer = reader.layer
    for name, (info, data) in members(source).items():
        node = reader.lookup(name)
        assert node is not None, name
        if info.islnk():
            continue  # the target's inode, checked below
        assert node.mode == info.mode and node.uid == info.uid and node.gid == info.gid
        assert node.mtime == int(info.mtime)
        if info.isreg():
            assert reader.read_file(node) == data
            assert node.size == len(data)
        if info.issym():
            assert node.kind == "symlink" and node.link_target == info.linkname
        if info.isdev():
            assert (node.dev_major, node.dev_minor) == (info.devmajor, info.devminor)
    tool, link = reader.lookup("usr/bin/tool"), reader.lookup("usr/bin/tool-link")
    assert tool == link and tool.nlink == 2
    assert len(tool.chunks) == -(-tool.size // CHUNK)
    assert reader.lookup("deep/long-hardlink") == reader.lookup(LONG_NAME)
    assert reader.lookup("dev/pipe").kind == "fifo"
    assert reader.lookup("var/.wh.cache").is_whiteout
    assert reader.lookup("opt").is_opaque_dir and not reader.lookup("etc").is_opaque_dir
    assert reader.lookup("usr/bin/ping").xattrs["user.comment"] == "ünïcode".encode()
    assert layer.has_no_prefetch_landmark and layer.prefetch_size == 0


@pytest.mark.parametrize("compression", FORMATS)
def test_byte_ranges_map_to_chunks(compression: Compression) -> None:
    payload = big_payload(50_000)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("big")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    blob, result = convert(buf.getvalue(), compression=compression, chunk_size=CHUNK)
    reader = open_reader(blob, result.toc_digest)
    node = reader.lookup("big")
    for offset, length in [(0, 1), (4095, 2), (8192, 4096), (49_999, 10), (100, 40_000),
                           (50_000, 5)]:
        chunks = reader.layer.chunks_for_range(node, offset, length)
        assert all(c.file_offset < offset + length for c in chunks)
        assert reader.read_file(node, offset, length) == payload[offset:offset + length]
    assert len(reader.layer.chunks_for_range(node, 4095, 2)) == 2


@pytest.mark.parametrize("compression", FORMATS)
def test_prioritized_files_come_first_behind_a_landmark(compression: Compression) -> None:
    source = coverage_tar()
    prio = ["dev/null", "/usr/bin/tool-link", "etc/hostname", "not/there"]
    blob, result = convert(source, compression=compression, chunk_size=CHUNK,
                           prioritized_files=prio)
    assert result.missing_prioritized == ["not/there"]
    names = tar_names(decompress(compression, blob))
    # Each prioritized file follows its parents and, for a hard link, its target.
    assert names[:8] == ["dev", "dev/null", "usr", "usr/bin", "usr/bin/tool",
                         "usr/bin/tool-link", "etc", "etc/hostname"]
    assert names[8] == PREFETCH_LANDMARK
    reader = open_reader(blob, result.toc_digest)
    end = reader.layer.prefetch_end
    assert end == result.prefetch_size > 0
    assert reader.prefetch_region() == (0, end)
    for path in ("usr/bin/tool", "etc/hostname"):
        assert all(c.blob_end <= end for c in reader.lookup(path).chunks)
    assert all(c.blob_offset >= end for c in reader.lookup("opt/new").chunks)


def test_prioritized_file_without_parent_entries() -> None:
    # umoci-style diff layer: usr/bin/gcc but no usr/ or usr/bin/ entries.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("usr/bin/gcc", "usr/lib/libc.so"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"elf"))
    blob, result = convert(buf.getvalue(), prioritized_files=["usr/bin/gcc"])
    assert result.missing_prioritized == []
    reader = open_reader(blob, result.toc_digest)
    usr = reader.lookup("usr/bin")
    assert usr.kind == "dir" and usr.implicit and usr.mode == 0o755
    assert reader.read_file(reader.lookup("usr/bin/gcc")) == b"elf"
    assert reader.lookup("usr/bin/gcc").chunks[0].blob_end <= reader.layer.prefetch_end


@pytest.mark.parametrize("compression", FORMATS)
def test_output_does_not_depend_on_worker_count(compression: Compression) -> None:
    source = coverage_tar(big_size=200_000)
    blobs = {convert(source, compression=compression, chunk_size=1024, workers=n)[0]
             for n in (1, 2, 7)}
    assert len(blobs) == 1


def test_streamed_input_is_spooled(tmp_path) -> None:
    source = coverage_tar()
    pieces = (source[i:i + 1000] for i in range(0, len(source), 1000))
    out = io.BytesIO()
    result = build(pieces, out, BuildOptions(chunk_size=CHUNK, tmpdir=str(tmp_path)))
    assert result.diff_id == convert(source, chunk_size=CHUNK)[1].diff_id
    assert list(tmp_path.iterdir()) == []  # the spool file is gone


def test_existing_landmarks_and_duplicates_are_normalised() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [(PREFETCH_LANDMARK, b"\x0f"), ("a", b"old"), ("b", b"b"),
                           ("a", b"new")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob, result = convert(buf.getvalue())
    names = tar_names(gzip.decompress(blob))
    assert names == [NO_PREFETCH_LANDMARK, "b", "a", "stargz.index.json"]
    reader = open_reader(blob, result.toc_digest)
    assert reader.read_file(reader.lookup("a")) == b"new"


@pytest.mark.parametrize("compression", FORMATS)
def test_verifier_accepts_what_the_writer_wrote(compression: Compression) -> None:
    blob, result = convert(coverage_tar(), compression=compression, chunk_size=CHUNK,
                           prioritized_files=["usr/bin/tool"])
    report = verify_blob(FileSource(io.BytesIO(blob)), result.toc_digest)
    assert report.diff_id == result.diff_id
    assert report.uncompressed_size == result.uncompressed_size
    assert report.prefetch_size == result.prefetch_size
    assert report.chunks == sum(1 for e in open_reader(blob, result.toc_digest).toc_entries()
                                if e.has_payload)


def test_empty_tar_gives_a_valid_blob() -> None:
    for compression in FORMATS:
        blob, result = convert(b"", compression=compression)
        report = verify_blob(FileSource(io.BytesIO(blob)), result.toc_digest)
        assert report.regular_files == 1  # the landmark
        assert open_reader(blob, result.toc_digest).lookup(NO_PREFETCH_LANDMARK) is not None


def test_annotations() -> None:
    _, gz = convert(coverage_tar())
    assert gz.annotations == {
        "containerd.io/snapshot/stargz/toc.digest": gz.toc_digest,
        "io.containers.estargz.uncompressed-size": str(gz.uncompressed_size),
    }
    blob, zs = convert(coverage_tar(), compression=Compression.ZSTD)
    position = zs.annotations["io.containers.zstd-chunked.manifest-position"]
    offset, compressed, uncompressed, kind = map(int, position.split(":"))
    toc_frame = blob[offset:offset + compressed]
    assert zs.annotations["io.containers.zstd-chunked.manifest-checksum"] == \
        "sha256:" + hashlib.sha256(toc_frame).hexdigest()
    toc_json = zstandard.ZstdDecompressor().decompress(toc_frame)
    assert len(toc_json) == uncompressed and kind == 1
    assert "sha256:" + hashlib.sha256(toc_json).hexdigest() == zs.toc_digest
