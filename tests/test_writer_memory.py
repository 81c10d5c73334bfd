"""The writer in bounded memory: its TOC is streamed, its tar index is on disk, and
none of that may change a byte of what it writes."""

import hashlib
import io
import itertools
import os
import random
import tarfile
import tempfile
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from estargz import (
    TOC,
    BlobReader,
    BuildOptions,
    Compression,
    FileSource,
    TOCEntry,
    build,
    codec,
    parse_toc,
)
from estargz import writer as writer_module
from estargz.codec import compress_file, compress_member, gzip_stream, gzip_streams_exactly
from estargz.errors import TOCError
from estargz.footer import MAX_FOOTER_SIZE, parse_footer
from estargz.tarindex import TarMember, index_tar, is_reserved, scan_tar
from estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOCWriter, clean_name
from estargz.writer import order_entries

from .test_bad_input import toc_json_of
from .test_properties import trees

FORMATS = [Compression.GZIP, Compression.ZSTD]

# -- the streamed TOC is TOC.to_json_bytes ------------------------------------------

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
NUMBERS = st.one_of(st.integers(0, 5), st.integers(-(2**70), 2**70))
TOC_ENTRIES = st.builds(
    TOCEntry,
    name=TEXT, type=st.sampled_from(["reg", "dir", "chunk", "symlink", "hardlink"]),
    size=NUMBERS, modtime=TEXT, link_name=TEXT, mode=NUMBERS, uid=NUMBERS, gid=NUMBERS,
    user_name=TEXT, group_name=TEXT, offset=NUMBERS, dev_major=NUMBERS, dev_minor=NUMBERS,
    xattrs=st.dictionaries(TEXT, st.binary(max_size=8), max_size=3), digest=TEXT,
    chunk_offset=NUMBERS, chunk_size=NUMBERS, chunk_digest=TEXT, inner_offset=NUMBERS,
)


def streamed(entries: Sequence[TOCEntry]) -> tuple[bytes, str, TOCWriter]:
    out = io.BytesIO()
    toc = TOCWriter(out)
    for entry in entries:
        toc.add(entry)
    digest = toc.close()
    return out.getvalue(), digest, toc


@settings(max_examples=300)
@given(entries=st.lists(TOC_ENTRIES, max_size=8))
def test_streamed_toc_is_to_json_bytes(entries: list[TOCEntry]) -> None:
    data, digest, toc = streamed(entries)
    assert data == TOC(entries).to_json_bytes()
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert (toc.size, toc.count) == (len(data), len(entries))


def test_streamed_toc_of_many_entries() -> None:
    entries = [TOCEntry(name=f"d/{i}", type="reg", size=i, digest=f"sha256:{i:064x}")
               for i in range(3000)]  # several flushes of the writer's buffer
    assert streamed(entries)[0] == TOC(entries).to_json_bytes()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tree=trees(), chunk_size=st.sampled_from([512, 1000, 4096]))
def test_built_toc_is_the_json_of_its_entries(tree, chunk_size: int) -> None:
    for compression in FORMATS:
        out = io.BytesIO()
        result = build(io.BytesIO(tree.tar()), out,
                       BuildOptions(compression=compression, chunk_size=chunk_size))
        toc_json = toc_json_of(out.getvalue())
        assert "sha256:" + hashlib.sha256(toc_json).hexdigest() == result.toc_digest
        assert TOC(parse_toc(toc_json).entries).to_json_bytes() == toc_json


# -- compressing as a stream gives the bytes of one call ----------------------------

@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200_000) | st.integers(0, 300_000).map(bytes),
       cuts=st.lists(st.integers(0, 300_000), max_size=6), level=st.integers(1, 9))
def test_gzip_stream_is_gzip_member(data: bytes, cuts: list[int], level: int) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert gzip_streams_exactly(level)
    assert b"".join(gzip_stream(pieces, level)) == compress_member(Compression.GZIP, data, level)


@pytest.mark.parametrize(("compression", "level"), [
    (Compression.GZIP, 0), (Compression.GZIP, 1), (Compression.GZIP, 6), (Compression.GZIP, 9),
    (Compression.ZSTD, -5), (Compression.ZSTD, 3), (Compression.ZSTD, 19),
])
def test_compress_file_is_compress_member(compression: Compression, level: int) -> None:
    rng = random.Random(level)
    text = b"".join(b'{"name": "d/%d", "size": %d},\n' % (i, rng.randrange(10**6))
                    for i in range(200_000))
    samples = [b"", b"x", rng.randbytes(70_000) + bytes(70_000), text[:5_000_000]]
    if level == 19:
        samples = samples[:3]  # slow at this level; the window case is covered above
    for data in samples:
        with tempfile.TemporaryFile() as f:
            f.write(data)
            got = b"".join(compress_file(compression, f, level))
        assert got == compress_member(compression, data, level), len(data)


# -- order_entries over the index is the old ordering over a list -------------------

def reference_order(members: list[TarMember], prioritized: Sequence[str]
                    ) -> tuple[list[str], str, list[str], list[str]]:
    """The ordering as it was computed over every member in memory."""
    rest: dict[str, TarMember] = {}
    for m in members:
        if not is_reserved(m.path):
            rest.pop(m.path, None)
            rest[m.path] = m
    front: dict[str, TarMember] = {}

    def move(path: str) -> bool:
        if path and path not in rest and path not in front:
            return False
        stack, active = [(path, False)], {path}
        while stack:
            current, ready = stack.pop()
            if ready:
                if current in rest:
                    front[current] = rest.pop(current)
                continue
            stack.append((current, True))
            needs = [current.rpartition("/")[0]] if current else []
            entry = rest.get(current)
            if entry is not None and entry.kind == "hardlink":
                needs.append(entry.link)
            for need in reversed(needs):
                if need not in active and (need == "" or need in rest):
                    active.add(need)
                    stack.append((need, False))
        return True

    missing = []
    for name in prioritized:
        try:
            path = clean_name(name.strip().lstrip("/"))
        except TOCError:
            path = ""
        if not path or not move(path):
            missing.append(name)
    landmark = PREFETCH_LANDMARK if prioritized else NO_PREFETCH_LANDMARK
    return list(front), landmark, list(rest), missing


PATHS = st.sampled_from(["a", "a/b", "a/b/c", "a/x", "b", "b/c", "c", "a/b/c/d",
                         ".", ".prefetch.landmark", "stargz.index.json"])
MEMBERS = st.lists(st.tuples(PATHS, st.sampled_from(["dir", "reg", "hardlink", "symlink"]),
                             PATHS), min_size=1, max_size=14)


@settings(max_examples=300, deadline=None)
@example([("b", "reg", ""), ("c", "hardlink", "b")], ["c"])  # the target comes first
@example([("a", "hardlink", "b"), ("b", "hardlink", "a")], ["a"])  # a cycle
@example([("a", "dir", ""), ("a/b/c", "reg", ""), ("x", "hardlink", "a/b/c"),
          ("a/b/c", "reg", "")], ["x", "missing", "a/b/c"])  # a duplicate after its link
@example([(".", "dir", ""), ("a", "dir", ""), ("a", "reg", ""), ("b/c", "reg", "")],
         ["b/c", "/a", "./b/c/"])  # the root, a replaced directory, a missing parent
@given(members=MEMBERS, prioritized=st.lists(
    st.one_of(PATHS, st.sampled_from(["/a/b", "./b/c/", "a/../b", "", "/", "missing"])),
    max_size=4))
def test_ordering_over_the_index(members: list[tuple[str, str, str]],
                                 prioritized: list[str]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, kind, link in members:
            info = tarfile.TarInfo(path)
            info.type = {"dir": tarfile.DIRTYPE, "reg": tarfile.REGTYPE,
                         "hardlink": tarfile.LNKTYPE, "symlink": tarfile.SYMTYPE}[kind]
            info.linkname = link if kind in ("hardlink", "symlink") else ""
            data = path.encode() if kind == "reg" else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    want = reference_order(list(scan_tar(buf)), prioritized)
    index = index_tar(io.BytesIO(buf.getvalue()))
    try:
        ordering = order_entries(index, prioritized)
        got = ([m.path for m in ordering.front()], ordering.landmark,
               [m.path for m in ordering.rest()], ordering.missing)
    finally:
        index.close()
    assert got == want


# -- how members are spilled and batched changes nothing ----------------------------

def runs_tar() -> bytes:
    """Long runs of entries without data between files, a duplicate, a big file."""
    buf = io.BytesIO()
    rng = random.Random(5)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(6000):
            info = tarfile.TarInfo(f"d{i // 1000}/e{i}" + "é" * (i % 3))
            info.type = (tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE)[i % 3]
            info.linkname = "t" * (i % 50 + 1) if info.type == tarfile.SYMTYPE else ""
            info.mtime = 1_700_000_000 + i
            data = b""
            if i % 2500 in (7, 8, 9) or i == 5999:
                data = rng.randbytes(rng.choice([10, 3000, 70_000]))
                info.type = tarfile.REGTYPE
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        dup = tarfile.TarInfo("d1/e1001")  # replaces an entry of the first runs
        dup.size = 4
        tar.addfile(dup, io.BytesIO(b"dup\n"))
    return buf.getvalue()


@pytest.mark.parametrize(("compression", "level"),
                         [(Compression.GZIP, 6), (Compression.GZIP, 0), (Compression.ZSTD, 3)])
def test_spilling_and_batching_change_no_byte(monkeypatch, compression: Compression,
                                              level: int) -> None:
    tar = runs_tar()

    def convert(workers: int) -> tuple[bytes, object]:
        out = io.BytesIO()
        result = build(io.BytesIO(tar), out, BuildOptions(
            compression=compression, level=level, chunk_size=4096, workers=workers,
            prioritized_files=["d3/e3001é", "d5/e5999", "d0"]))
        return out.getvalue(), result

    blob, result = convert(2)
    assert result.entry_count > 6000
    with monkeypatch.context() as m:
        m.setattr(writer_module, "_MEMBER_SPILL", 0)  # every member with a header spills
        assert convert(3) == (blob, result)
    with monkeypatch.context() as m:
        m.setattr(writer_module, "_BATCH_MEMBERS", 1)
        m.setattr(writer_module, "_MEMBER_SPILL", 1 << 30)  # nothing spills
        assert convert(1) == (blob, result)


# -- memory ------------------------------------------------------------------------

def many_files_tar(path: Path, files: int) -> None:
    """Small files in directories of a thousand, with a long run of empty files."""
    with open(path, "wb") as out, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(files):
            if i % 1000 == 0:
                info = tarfile.TarInfo(f"d{i // 1000:04d}")
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            data = b"" if 20_000 <= i < 25_000 else f"file {i}\n".encode()
            info = tarfile.TarInfo(f"d{i // 1000:04d}/f{i:07d}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
            tar.members.clear()


# Converting these 50,000 files used to allocate 180 MiB at the peak (every member's
# TarInfo and header, every TOC entry, the TOC JSON); now 7 MiB with gzip, and 16 MiB
# with zstd, whose TOC frame is made in one call that allocates room for the frame's
# worst case (about the TOC's size, most of it never touched) before it shrinks it.
PEAK_BOUNDS = {Compression.GZIP: 16 << 20, Compression.ZSTD: 32 << 20}


@pytest.mark.parametrize("compression", FORMATS)
def test_many_files_convert_in_bounded_memory(tmp_path: Path, compression: Compression) -> None:
    source = tmp_path / "many.tar"
    many_files_tar(source, 50_000)
    with open(source, "rb") as tar, open(tmp_path / "blob", "wb") as out:
        tracemalloc.start()
        try:
            result = build(tar, out, BuildOptions(compression=compression, workers=2))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert result.entry_count == 50_000 + 50 + 1
    assert os.path.getsize(tmp_path / "blob") == result.blob_size
    assert peak < PEAK_BOUNDS[compression], f"peak of {peak >> 20} MiB"


# The TOC of these 100,000 files is 31 MiB of JSON. Its zstd frame used to be made in
# one call, which allocated room for the frame's worst case and kept the frame in
# memory twice: a traced peak of 31 MiB. Streamed, the peak is 7 MiB, as with gzip.
ZSTD_TOC_PEAK_BOUND = 16 << 20


def test_zstd_toc_of_many_files_is_streamed_and_read_back(tmp_path: Path) -> None:
    source, blob = tmp_path / "many.tar", tmp_path / "blob"
    many_files_tar(source, 100_000)
    with open(source, "rb") as tar, open(blob, "wb") as out:
        tracemalloc.start()
        try:
            result = build(tar, out, BuildOptions(compression=Compression.ZSTD, workers=2))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    position, length, toc_size, kind = map(
        int, result.annotations["io.containers.zstd-chunked.manifest-position"].split(":"))
    assert toc_size > codec._ZSTD_ONE_CALL_MAX and kind == 1  # a streamed frame
    data = blob.read_bytes()
    frame = data[position:position + length]
    assert result.annotations["io.containers.zstd-chunked.manifest-checksum"] == \
        "sha256:" + hashlib.sha256(frame).hexdigest()
    footer = parse_footer(data[-MAX_FOOTER_SIZE:], len(data))
    assert (footer.toc_offset, footer.toc_length, footer.toc_uncompressed_size) == \
        (position, length, toc_size)
    # The frame says its content size, so even a one-call decompression takes it.
    assert zstandard.get_frame_parameters(frame).content_size == toc_size
    toc_json = zstandard.ZstdDecompressor().decompress(frame)
    assert "sha256:" + hashlib.sha256(toc_json).hexdigest() == result.toc_digest
    with FileSource.open(str(blob)) as blob_source:
        reader = BlobReader.open(blob_source, result.toc_digest)
        read_back = list(reader.toc_entries())
        assert reader.lookup("d0099/f0099999") is not None
    assert read_back == parse_toc(toc_json, max_entries=10**6).entries
    assert sum(entry.type != "chunk" for entry in read_back) == result.entry_count
    assert peak < ZSTD_TOC_PEAK_BOUND, f"peak of {peak >> 20} MiB"
