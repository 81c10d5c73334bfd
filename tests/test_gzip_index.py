"""gzindex: indexes of random gzip layers read back byte for byte, and corruption of
the layer or the index always an error, never wrong bytes."""

import gzip
import hashlib
import io
import itertools
import json
import random
import struct
import tarfile
import tracemalloc
import zlib

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estargz.errors import FormatError, TarError
from estargz.tarindex import scan_tar, scan_tar_stream
from gzindex import (
    CorruptLayerError,
    GzipIndex,
    IndexFormatError,
    LayerReader,
    SpanDigestMismatch,
    build_index,
    file_fetcher,
    scan_layer,
)
from gzindex.format import MAGIC, SPAN

from .layers import LONG_NAME, coverage_tar

WORDS = [b"import", b"def", b"return", b"self", b"lazypull", b"layer", b"\n", b"    ",
         b"gzip", b"span", b"(", b")", b":", b"=", b"0", b"1", b"index", b"window"]


def _text(rng: random.Random, size: int) -> bytes:
    """Compressible bytes: deflate codes them in Huffman blocks that end mid-byte."""
    out = bytearray()
    while len(out) < size:
        out += rng.choice(WORDS)
    return bytes(out[:size])


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def random_tar(seed: int) -> bytes:
    """Many small files, a few big ones, empty files, links and PAX long names."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "d", type=tarfile.DIRTYPE, mode=0o755)
        regular: list[str] = []
        for number in range(rng.randint(20, 200)):
            name = f"d/f{number}"
            if rng.random() < 0.1:
                name = "d/" + "long-" * rng.randint(25, 60) + str(number)  # > 100: PAX path
            size = rng.choice([0, 1, rng.randint(2, 4000), rng.randint(4000, 40_000)])
            data = rng.randbytes(size) if rng.random() < 0.3 else _text(rng, size)
            _add(tar, name, data, uid=rng.randint(0, 70000), mode=rng.choice([0o644, 0o755]))
            regular.append(name)
        for number in range(rng.randint(1, 3)):  # big files, across many spans
            size = rng.randint(200_000, 700_000)
            data = rng.randbytes(size) if number % 2 else _text(rng, size)
            _add(tar, f"big{number}", data)
            regular.append(f"big{number}")
        for number in range(rng.randint(1, 10)):
            target = rng.choice(regular)
            _add(tar, f"d/hard{number}", type=tarfile.LNKTYPE, linkname=target)
            _add(tar, f"d/sym{number}", type=tarfile.SYMTYPE, linkname="../" + target)
        _add(tar, "d/.wh.gone")
    return buf.getvalue()


def gzip_layer(tar: bytes, level: int, members: int, rng: random.Random) -> bytes:
    """`tar` in `members` gzip members at `level`; the last one with sync flushes, so
    it holds empty stored blocks, and zero padding after it, as gzip allows."""
    cuts = sorted(rng.sample(range(1, len(tar)), members - 1)) if members > 1 else []
    pieces = [tar[a:b] for a, b in zip([0, *cuts], [*cuts, len(tar)], strict=True)]
    out = b"".join(gzip.compress(piece, level) for piece in pieces[:-1])
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    last = pieces[-1]
    middle = len(last) // 2
    tail = compressor.compress(last[:middle]) + compressor.flush(zlib.Z_SYNC_FLUSH)
    tail += compressor.compress(last[middle:]) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return out + tail + compressor.flush() + b"\0" * rng.randint(0, 3)


def index_of(blob: bytes, spacing: int, hot: tuple[str, ...] = ()) -> bytes:
    out = io.BytesIO()
    build_index(io.BytesIO(blob), out, spacing=spacing, hot_files=hot)
    return out.getvalue()


def reader_of(blob: bytes, index: bytes) -> LayerReader:
    return LayerReader(GzipIndex.open(index), file_fetcher(io.BytesIO(blob)), cache_spans=0)


def tar_members(tar: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return archive.getmembers()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), level=st.sampled_from([1, 6, 9]), members=st.integers(1, 4))
def test_every_file_and_range_reads_back_exactly(seed: int, level: int, members: int) -> None:
    rng = random.Random(seed)
    tar = random_tar(seed)
    blob = gzip_layer(tar, level, members, rng)
    expected = {m.name.rstrip("/"): m for m in tar_members(tar)}
    for spacing in (8 << 10, 64 << 10, 1 << 20):
        index = GzipIndex.open(index_of(blob, spacing))
        assert index.header.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
        assert index.header.layer_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
        assert index.uncompressed_size == len(tar)
        assert index.span_count >= members
        reader = LayerReader(index, file_fetcher(io.BytesIO(blob)))
        entries = list(index.entries())
        assert [e.name for e in entries] == list(expected)
        for entry in entries:
            member = expected[entry.name]
            assert (entry.size, entry.mode, entry.uid) == (member.size if member.isreg() else 0,
                                                          member.mode, member.uid)
            if member.isreg():
                assert reader.read_file(entry) == tar[entry.offset:entry.end]
                assert entry.offset == member.offset_data
            elif member.issym() or member.islnk():
                assert entry.link_name == member.linkname
        for _ in range(30):
            a = rng.randrange(len(tar))
            b = rng.randrange(a, min(len(tar), a + rng.choice([1, 5000, 300_000])) + 1)
            assert reader.read(a, b) == tar[a:b]
        assert reader.read(0, len(tar)) == tar


def test_entries_carry_the_toc_metadata() -> None:
    tar = coverage_tar()
    index = GzipIndex.open(index_of(gzip.compress(tar), 8 << 10))
    entries = {e.name: e for e in index.entries()}
    assert entries["usr/bin/tool"].mode == 0o4755
    assert entries["usr/bin/tool"].modtime == "2009-02-13T23:31:30Z"
    assert entries["usr/bin/ping"].xattrs["security.capability"] == b"\x01\x00\x00\x02 \x00\x00\x00"
    assert entries["dev/null"].type == "char" and (entries["dev/null"].dev_major,
                                                   entries["dev/null"].dev_minor) == (1, 3)
    assert entries["deep/long-hardlink"].link_name == LONG_NAME
    assert entries["usr/bin/tool-link"].type == "hardlink"
    assert entries["usr"].user_name == "root"
    assert "var/.wh.cache" in entries and "opt/.wh..wh..opq" in entries
    assert index.find("etc/hostname").size == len(b"workspace\n")
    assert index.find("not/there") is None


def test_hot_files_are_kept_in_priority_order() -> None:
    blob = gzip.compress(coverage_tar())
    index = GzipIndex.open(index_of(blob, 8 << 10, hot=("usr/bin/tool", "etc/hostname",
                                                         "usr/bin/tool")))
    assert index.hot_files() == ["usr/bin/tool", "etc/hostname"]


def test_spans_cover_the_layer_in_order() -> None:
    rng = random.Random(5)
    tar = random_tar(5)
    blob = gzip_layer(tar, 6, 3, rng)
    index = GzipIndex.open(index_of(blob, 16 << 10))
    spans = list(index.spans())
    assert spans[0].uncompressed_offset == 0 and spans[-1].uncompressed_end == len(tar)
    assert all(a.uncompressed_end == b.uncompressed_offset
               for a, b in itertools.pairwise(spans))
    assert any(s.skip_bits for s in spans)  # checkpoints inside bytes were exercised
    assert index.spans_for(spans[1].uncompressed_offset, spans[2].uncompressed_offset + 1) \
        == range(1, 3)
    assert index.span_at(spans[3].uncompressed_end - 1).index == 3


# -- corruption: always an error, never wrong bytes -----------------------------------


@pytest.fixture(scope="module")
def layer() -> tuple[bytes, bytes, bytes]:
    tar = random_tar(11)
    blob = gzip_layer(tar, 6, 2, random.Random(11))
    return tar, blob, index_of(blob, 16 << 10)


def _read_all_or_fail(blob: bytes, index: bytes, tar: bytes) -> list[int]:
    """Reads every span; asserts each is right or refused; returns the refused ones."""
    reader = reader_of(blob, index)
    refused = []
    for span in reader.index.spans():
        try:
            data = reader.read_span(span)
        except FormatError:
            refused.append(span.index)
            continue
        assert data == tar[span.uncompressed_offset:span.uncompressed_end]
    return refused


def test_a_flipped_byte_in_the_layer_is_refused(layer) -> None:
    tar, blob, index = layer
    rng = random.Random(3)
    spans = list(GzipIndex.open(index).spans())
    for _ in range(40):
        span = rng.choice(spans)
        position = rng.randrange(span.compressed_offset + 1, span.compressed_end - 1)
        bad = bytearray(blob)
        bad[position] ^= 0xFF
        refused = _read_all_or_fail(bytes(bad), index, tar)
        assert span.index in refused


def test_a_flipped_byte_in_a_window_is_refused(layer) -> None:
    tar, blob, index = layer
    parsed = GzipIndex.open(index)
    base = parsed.header.sections["windows"].offset
    rng = random.Random(4)
    windowed = [s for s in parsed.spans() if s.window_size]
    for span in rng.sample(windowed, 10):
        bad = bytearray(index)
        bad[base + span.window_offset + rng.randrange(span.window_size)] ^= 0xFF
        refused = _read_all_or_fail(blob, bytes(bad), tar)
        assert refused == [span.index]


def _with_header(index: bytes, change) -> bytes:
    """The index with its header JSON rewritten by `change` (same length kept)."""
    (length,) = struct.unpack_from("<I", index, 8)
    doc = json.loads(index[12:12 + length])
    change(doc)
    text = json.dumps(doc, separators=(",", ":")).encode()
    assert len(text) == length
    return index[:12] + text + index[12 + length:]


def test_a_wrong_span_digest_is_refused(layer) -> None:
    tar, blob, index = layer
    parsed = GzipIndex.open(index)
    spans = parsed.header.sections["spans"]
    target = 2
    record = spans.offset + target * SPAN.size
    bad = bytearray(index)
    bad[record + SPAN.size - 1] ^= 0x01  # the last byte of its sha256
    with pytest.raises(IndexFormatError, match="spans section does not match"):
        GzipIndex.open(bytes(bad))
    # Even with a section digest that vouches for the wrong record, the read fails.
    new_digest = "sha256:" + hashlib.sha256(bad[spans.offset:spans.offset + spans.length]
                                            ).hexdigest()
    forged = _with_header(bytes(bad), lambda doc: doc["spans"].update(digest=new_digest))
    assert _read_all_or_fail(blob, forged, tar) == [target]
    with pytest.raises(SpanDigestMismatch, match="does not match its digest"):
        reader_of(blob, forged).read(0, len(tar))


def test_truncated_or_garbage_indexes_are_refused(layer) -> None:
    _tar, _blob, index = layer
    for size in (0, 5, 11, 40, len(index) // 2, len(index) - 1):
        with pytest.raises(IndexFormatError):
            GzipIndex.open(index[:size])
    with pytest.raises(IndexFormatError, match="bad magic"):
        GzipIndex.open(b"\x1f\x8b" + index[2:])
    with pytest.raises(IndexFormatError):
        GzipIndex.open(MAGIC + struct.pack("<I", 9) + b"not json!")
    with pytest.raises(IndexFormatError, match="version"):
        GzipIndex.open(_with_header(index, lambda doc: doc.update(version=7)))
    with pytest.raises(IndexFormatError):
        GzipIndex.open(index + b"extra")
    files = GzipIndex.open(index).header.sections["files"]
    bad = bytearray(index)
    bad[files.offset + files.length // 2] ^= 0xFF
    with pytest.raises(IndexFormatError, match="files section does not match"):
        GzipIndex.open(bytes(bad))


def test_an_index_of_another_layer_is_refused(layer) -> None:
    tar, _blob, index = layer
    other = gzip.compress(tar, 1)  # same content, other bytes
    reader = reader_of(other, index)
    with pytest.raises(FormatError):
        reader.read(0, len(tar))


# -- corrupt layers are refused while indexing ----------------------------------------


def _scan(blob: bytes) -> None:
    scan_layer(io.BytesIO(blob), spacing=8 << 10).close()


def test_corrupt_gzip_is_refused_while_indexing() -> None:
    tar = random_tar(2)
    blob = gzip.compress(tar, 6)
    crc = bytearray(blob)
    crc[-8] ^= 0xFF
    with pytest.raises(CorruptLayerError, match="CRC32"):
        _scan(bytes(crc))
    size = bytearray(blob)
    size[-1] ^= 0x01
    with pytest.raises(CorruptLayerError, match="trailer says"):
        _scan(bytes(size))
    with pytest.raises(CorruptLayerError, match="truncated"):
        _scan(blob[:len(blob) // 2])
    with pytest.raises(CorruptLayerError, match="not gzip"):
        _scan(blob + b"garbage")
    with pytest.raises(CorruptLayerError, match="not gzip"):
        _scan(tar)
    with pytest.raises(CorruptLayerError, match="empty"):
        _scan(b"")
    middle = bytearray(blob)
    for position in range(100, len(blob) - 100, len(blob) // 7):
        middle[position] ^= 0xFF
    with pytest.raises(CorruptLayerError):
        _scan(bytes(middle))
    with pytest.raises(CorruptLayerError, match="expected"):
        scan_layer(io.BytesIO(blob), expected_digest="sha256:" + "0" * 64).close()


def test_a_gzip_that_is_no_layer_tar_is_refused() -> None:
    tar = random_tar(3)
    with pytest.raises(TarError):
        _scan(gzip.compress(tar[:len(tar) // 2]))
    header = tar_members(tar)[5].offset
    damaged = bytearray(tar)
    damaged[header + 148:header + 156] = b"garbage!"  # its checksum
    with pytest.raises(TarError, match="malformed tar header"):
        _scan(gzip.compress(bytes(damaged)))


def test_an_empty_tar_gives_an_empty_index() -> None:
    index = GzipIndex.open(index_of(gzip.compress(b""), 8 << 10))
    assert index.uncompressed_size == 0 and index.span_count == 0
    assert list(index.entries()) == []


# -- bounded memory and the streaming tar reader --------------------------------------


def test_building_holds_no_windows_in_memory(tmp_path) -> None:
    """Incompressible data at a small spacing: tens of MiB of windows, all on disk."""
    rng = random.Random(9)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for number in range(4):
            _add(tar, f"blob{number}", rng.randbytes(8 << 20))
        for number in range(5000):
            _add(tar, f"small/{number}", _text(rng, 100))
    layer = tmp_path / "layer.gz"
    layer.write_bytes(gzip.compress(buf.getvalue(), 6))
    del buf
    tracemalloc.start()
    try:
        with layer.open("rb") as blob, open(tmp_path / "index", "wb") as out:
            result = build_index(blob, out, spacing=16 << 10, tmpdir=str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    index = GzipIndex.open(tmp_path / "index")
    assert result.file_count == 5004 and index.span_count > 1000
    assert index.header.sections["windows"].length > 32 << 20
    assert peak < 16 << 20, f"peak of {peak >> 20} MiB"


def test_the_streaming_tar_reader_agrees_with_the_seeking_one() -> None:
    for tar in (coverage_tar(), coverage_tar(tarfile.GNU_FORMAT), random_tar(8)):
        assert list(scan_tar_stream(io.BytesIO(tar))) == list(scan_tar(io.BytesIO(tar)))
    tar = random_tar(8)
    with pytest.raises(TarError):
        list(scan_tar_stream(io.BytesIO(tar[:len(tar) // 3])))
    assert list(scan_tar_stream(io.BytesIO(b""))) == []
    last = tar_members(tar)[-1]
    assert last.size == 0
    no_end = tar[:last.offset_data]  # the end-of-archive blocks cut off
    members = list(scan_tar_stream(io.BytesIO(no_end)))
    assert len(members) == len(tar_members(tar))


def test_a_window_that_inflates_past_32_kib_is_refused(layer) -> None:
    tar, blob, index = layer
    parsed = GzipIndex.open(index)
    span = next(s for s in parsed.spans() if s.window_size > 100)
    bomb = zstandard.ZstdCompressor().compress(b"a" * (64 << 20))  # says so in its header
    padding = span.window_size - len(bomb) - 8
    skippable = struct.pack("<II", 0x184D2A50, padding) + b"\0" * padding
    start = parsed.header.sections["windows"].offset + span.window_offset
    forged = index[:start] + bomb + skippable + index[start + span.window_size:]
    assert len(forged) == len(index)
    assert _read_all_or_fail(blob, forged, tar) == [span.index]
    with pytest.raises(SpanDigestMismatch, match="more than 32768 bytes"):
        reader_of(blob, forged).read_span(span)
