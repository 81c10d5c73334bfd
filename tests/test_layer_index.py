"""A layer's on-disk index: the TOC parsed as a stream, the tree and spans read back,
an index kept and reopened, and memory that does not grow with the layer."""

import io
import json
import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import estargz
import estargz.toc
from estargz import BlobReader, BuildOptions, Compression, FileSource, Layer, TOCError, build
from estargz.layer import INDEX_FORMAT
from estargz.reader import spool_toc_json
from estargz.toc import _entry_from_json, iter_toc_entries

from .layers import coverage_tar

FORMATS = [Compression.GZIP, Compression.ZSTD]
CHUNK = 4096


def blob_of(tar_bytes: bytes, compression: Compression = Compression.GZIP,
            **options: object) -> tuple[bytes, estargz.BuildResult]:
    out = io.BytesIO()
    result = build(io.BytesIO(tar_bytes), out, BuildOptions(
        compression=compression, chunk_size=CHUNK, **options))  # type: ignore[arg-type]
    return out.getvalue(), result


def toc_json(blob: bytes) -> bytes:
    source = FileSource(io.BytesIO(blob))
    footer = estargz.parse_footer(blob[-estargz.footer.MAX_FOOTER_SIZE:], len(blob))
    out = io.BytesIO()
    spool_toc_json(footer, source.read_at(footer.toc_offset, footer.toc_length), 1 << 30, out)
    return out.getvalue()


def many_files_tar(files: int, per_dir: int = 100) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in range(-(-files // per_dir)):
            info = tarfile.TarInfo(f"d{d:04d}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for i in range(files):
            data = f"file {i}\n".encode()
            info = tarfile.TarInfo(f"d{i // per_dir:04d}/f{i:06d}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000 + i % 7
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def reference_entries(data: bytes) -> list[estargz.TOCEntry]:
    """The entries as the whole-document parser sees them."""
    return [_entry_from_json(i, raw) for i, raw in enumerate(json.loads(data)["entries"])]


# -- the TOC as a stream ------------------------------------------------------------------


@pytest.mark.parametrize("read_size", [1, 2, 3, 7, 64, 4096])
def test_stream_parser_reads_the_toc_whatever_the_pieces(monkeypatch, read_size) -> None:
    data = toc_json(blob_of(coverage_tar())[0])
    monkeypatch.setattr(estargz.toc._JSONCursor, "_READ", read_size)
    assert list(iter_toc_entries(io.BytesIO(data))) == reference_entries(data)


def test_every_truncated_toc_is_refused() -> None:
    data = toc_json(blob_of(coverage_tar())[0]).rstrip()
    for cut in range(0, len(data), max(1, len(data) // 400)):
        with pytest.raises(TOCError):
            list(iter_toc_entries(io.BytesIO(data[:cut])))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 10_000))
def test_damaged_toc_is_refused_or_read_as_json_reads_it(garbage: bytes, where: int) -> None:
    data = toc_json(blob_of(coverage_tar())[0])
    where %= len(data)
    damaged = data[:where] + garbage + data[where + len(garbage):]
    try:
        expected = reference_entries(damaged)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, TOCError):
        expected = None
    try:
        got = list(iter_toc_entries(io.BytesIO(damaged)))
    except TOCError:
        got = None
    if got is not None:
        assert got == expected
    elif expected is not None:  # only what the whole-document view also rejects...
        doc = json.loads(damaged)  # ...or a document without version 1 or with repeats
        assert doc.get("version") != 1 or damaged.count(b'"entries"') > 1 \
            or damaged.count(b'"version"') > 1


def test_members_may_come_in_any_order_and_are_checked() -> None:
    entry = b'{"name": "a", "type": "dir"}'
    assert [e.name for e in iter_toc_entries(io.BytesIO(
        b'{"entries": [' + entry + b'], "extra": {"x": [1]}, "version": 1}'))] == ["a"]
    for doc, problem in [
        (b'{"version": 2, "entries": []}', "unsupported TOC version 2"),
        (b'{"version": true, "entries": []}', "unsupported TOC version True"),
        (b'{"version": 1}', "no entries list"),
        (b'{"version": 1, "entries": {}}', "no entries list"),
        (b'{"version": 1, "entries": [], "entries": []}', "twice"),
        (b'{"version": 1, "entries": []} []', "extra data"),
        (b'[1, 2]', "not an object"),
        (b'{"version": 1, "entries": [' + entry + b' ' + entry + b']}', "expected ','"),
        (b'\xff{}', "not UTF-8"),
    ]:
        with pytest.raises(TOCError, match=problem):
            list(iter_toc_entries(io.BytesIO(doc)))


def test_one_huge_value_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(estargz.toc, "MAX_ENTRY_TEXT", 10_000)
    doc = b'{"version": 1, "entries": [{"name": "' + b"a" * 50_000 + b'", "type": "dir"}]}'
    with pytest.raises(TOCError, match="longer than"):
        list(iter_toc_entries(io.BytesIO(doc)))


def test_entry_count_is_capped() -> None:
    doc = b'{"version": 1, "entries": [' + b", ".join(
        b'{"name": "f%d", "type": "dir"}' % i for i in range(5)) + b"]}"
    with pytest.raises(TOCError, match="more than 4 entries"):
        list(iter_toc_entries(io.BytesIO(doc), max_entries=4))


# -- the index ------------------------------------------------------------------------


@pytest.mark.parametrize("compression", FORMATS)
def test_spans_and_chunks_agree_with_the_files(compression) -> None:
    blob, result = blob_of(coverage_tar(big_size=50_000), compression,
                           prioritized_files=["usr/bin/tool", "etc/hostname"])
    reader = BlobReader.open(FileSource(io.BytesIO(blob)), result.toc_digest)
    layer = reader.layer
    files = {n.id: n for _, n in layer.walk() if n.kind == "reg"}
    by_file = {c for n in files.values() for c in layer.chunks(n)}
    in_blob = list(layer.payload_chunks())
    assert set(in_blob) == by_file and len(in_blob) == len(by_file)
    assert [c.blob_offset for c in in_blob] == sorted(c.blob_offset for c in in_blob)
    spans = layer.spans(0, layer.span_count)
    assert len(spans) == layer.span_count > 3
    for index, span in enumerate(spans):
        assert layer.span(index) == span and layer.span_index(span.offset) == index
        assert layer.spans_before(span.offset) == index
        assert all(c.blob_offset == span.offset and c.blob_end == span.end for c in span.chunks)
        sizes = [n.size for n in files.values() if set(layer.chunks(n)) & set(span.chunks)]
        assert span.smallest_file == min(sizes)
    assert layer.span_index(spans[0].offset + 1) is None
    assert 0 < layer.spans_before(layer.prefetch_size) < layer.span_count
    assert layer.regular_bytes == sum(n.size for n in files.values())
    tool = layer.lookup("usr/bin/tool")
    assert tool is not None and layer.parent(tool) == layer.lookup("usr/bin")
    assert layer.parent(layer.root) is None
    directories = [n for _, n in layer.walk() if n.kind == "dir"]
    assert len(directories) > 2
    for directory in directories:  # counted at build time, as a scan would count them
        assert directory.subdirs == sum(
            1 for name, n in layer.children(directory)
            if n.kind == "dir" and not name.startswith(".wh."))
    assert layer.root.subdirs > 0
    middle = layer.chunks_for_range(tool, CHUNK + 10, 2 * CHUNK)
    assert [c.file_offset for c in middle] == [CHUNK, 2 * CHUNK, 3 * CHUNK]
    assert layer.node(10**9) is None


def test_kept_index_is_reopened_only_for_its_own_toc(tmp_path: Path) -> None:
    blob, result = blob_of(coverage_tar())
    footer = estargz.parse_footer(blob[-estargz.footer.MAX_FOOTER_SIZE:], len(blob))
    toc = blob[footer.toc_offset:footer.toc_offset + footer.toc_length]
    path = str(tmp_path / "index.db")
    built = estargz.load_toc(footer, toc, result.toc_digest, index_path=path)
    tree = [(p, n.kind, n.size, n.mode, tuple(n.chunks)) for p, n in built.walk()]
    built.close()
    assert os.listdir(tmp_path) == ["index.db"]  # the build's own file was renamed

    again = Layer.open_index(path, footer, result.toc_digest)
    assert again is not None
    assert [(p, n.kind, n.size, n.mode, tuple(n.chunks)) for p, n in again.walk()] == tree
    assert again.prefetch_size == built.prefetch_size and again.span_count == built.span_count
    again.close()

    other = "sha256:" + "0" * 64
    assert Layer.open_index(path, footer, other) is None
    assert Layer.open_index(str(tmp_path / "missing.db"), footer, result.toc_digest) is None
    with open(path, "r+b") as f:  # a torn or foreign file is built again, never trusted
        f.truncate(os.path.getsize(path) // 3)
    assert Layer.open_index(path, footer, result.toc_digest) is None
    with open(path, "wb") as f:
        f.write(b"not sqlite at all" * 100)
    assert Layer.open_index(path, footer, result.toc_digest) is None
    assert INDEX_FORMAT == 2


def test_failed_build_leaves_no_index(tmp_path: Path) -> None:
    blob, result = blob_of(coverage_tar())
    footer = estargz.parse_footer(blob[-estargz.footer.MAX_FOOTER_SIZE:], len(blob))
    entries = reference_entries(toc_json(blob))
    entries.append(estargz.TOCEntry(name="etc/hostname/below", type="dir"))  # file as parent
    path = str(tmp_path / "index.db")
    with pytest.raises(TOCError, match="not a directory"):
        Layer.build(entries, footer, result.toc_digest, index_path=path)
    assert os.listdir(tmp_path) == []


def test_large_layer_reads_back_with_little_memory(tmp_path: Path) -> None:
    files = 30_000
    blob, result = blob_of(many_files_tar(files))
    path = tmp_path / "layer.blob"
    path.write_bytes(blob)
    del blob
    with FileSource.open(str(path)) as source:
        tracemalloc.start()
        try:
            reader = BlobReader.open(source, result.toc_digest)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        layer = reader.layer
        # An in-memory tree of these entries took about 60 MB of Python objects.
        assert peak < 12 << 20, peak
        assert layer.entry_count == files + files // 100 + 1  # and the landmark
        for i in range(0, files, 997):
            node = reader.lookup(f"d{i // 100:04d}/f{i:06d}")
            assert node is not None and reader.read_file(node) == f"file {i}\n".encode()
        assert len(layer.children(layer.lookup("d0007"))) == 100  # type: ignore[arg-type]
        assert sum(1 for _ in layer.walk()) == 1 + files // 100 + files + 1
        layer.close()
