"""Bad input gives a typed, clear error: never a crash, a hang, or wrong bytes.

Blobs, footers and TOCs are damaged on purpose (a damaged TOC is re-assembled
into an otherwise valid blob, so only the TOC is wrong), input tars are cut or
malformed, and compressed bytes are flipped. Every case asserts the exception
type and a fragment of its message that names the problem.
"""

import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from cli.main import main as cli_main
from estargz import (
    BlobReader,
    BuildOptions,
    BuildResult,
    Compression,
    DigestMismatch,
    FileSource,
    FooterError,
    FormatError,
    TarError,
    TOCError,
    VerificationError,
    build,
    load_toc,
    parse_footer,
    parse_toc,
)
from estargz.codec import decompress_all, decompress_span, gzip_member, zstd_frame
from estargz.footer import MAX_FOOTER_SIZE, gzip_footer, skippable_frame, zstd_footer
from estargz.verify import verify_blob

FORMATS = [Compression.GZIP, Compression.ZSTD]
CHUNK = 1024
BIG = bytes((i * 7919 + (i >> 8) * 31) % 251 for i in range(3 * CHUNK + 100))
HOSTNAME = b"workspace\n"


# -- helpers ----------------------------------------------------------------


def info(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    ti.mtime = 1_700_000_000
    for key, value in fields.items():
        setattr(ti, key, value)
    return ti


def tar_of(*members: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT,
           **open_args: object) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **open_args) as tar:
        for ti, data in members:
            if ti.isreg():
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def sample_tar() -> bytes:
    return tar_of(
        (info("etc", tarfile.DIRTYPE), b""),
        (info("etc/hostname"), HOSTNAME),
        (info("bin", tarfile.DIRTYPE), b""),
        (info("bin/big"), BIG),
        (info("bin/link", tarfile.LNKTYPE, linkname="bin/big"), b""),
        (info("bin/sym", tarfile.SYMTYPE, linkname="big"), b""),
        (info("empty"), b""),
        (info("fifo", tarfile.FIFOTYPE), b""),
        fmt=tarfile.USTAR_FORMAT,
    )


def convert(tar: bytes, compression: Compression, **options: object) -> tuple[bytes, BuildResult]:
    out = io.BytesIO()
    result = build(io.BytesIO(tar), out,
                   BuildOptions(compression=compression, chunk_size=CHUNK, **options))
    return out.getvalue(), result


_BLOBS: dict[Compression, tuple[bytes, BuildResult]] = {}


def sample_blob(compression: Compression) -> tuple[bytes, BuildResult]:
    if compression not in _BLOBS:
        _BLOBS[compression] = convert(sample_tar(), compression)
    return _BLOBS[compression]


def source(blob: bytes) -> FileSource:
    return FileSource(io.BytesIO(blob))


def open_blob(blob: bytes, toc_digest: str | None = None, **kw: object) -> BlobReader:
    return BlobReader.open(source(blob), toc_digest, **kw)


def footer_of(blob: bytes):
    return parse_footer(blob[-MAX_FOOTER_SIZE:], len(blob))


def toc_json_of(blob: bytes) -> bytes:
    """The TOC JSON, decoded independently of the reader."""
    footer = footer_of(blob)
    region = blob[footer.toc_offset:footer.toc_offset + footer.toc_length]
    if footer.compression is Compression.GZIP:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(region)), mode="r:") as tar:
            return tar.extractfile("stargz.index.json").read()
    return zstandard.ZstdDecompressor().decompress(region)


def assemble(payload: bytes, toc_json: bytes, compression: Compression) -> bytes:
    """payload (every member before the TOC) + a TOC holding `toc_json` + footer."""
    if compression is Compression.GZIP:
        ti = tarfile.TarInfo("stargz.index.json")
        ti.size, ti.mode = len(toc_json), 0o644
        member = (ti.tobuf(tarfile.USTAR_FORMAT) + toc_json + b"\0" * (-len(toc_json) % 512)
                  + b"\0" * 1024)
        return payload + gzip_member(member, 6) + gzip_footer(len(payload))
    frame = zstd_frame(toc_json, 3)
    return (payload + skippable_frame(frame)
            + zstd_footer(len(payload) + 8, len(frame), len(toc_json)))


def with_toc(blob: bytes, toc_json: bytes) -> bytes:
    footer = footer_of(blob)
    return assemble(blob[:footer.payload_end], toc_json, footer.compression)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def edited(compression: Compression, edit: Callable[[list[dict]], object]) -> tuple[bytes, str]:
    """The sample blob with its TOC entries changed by `edit`, and the new TOC digest."""
    blob, _ = sample_blob(compression)
    doc = json.loads(toc_json_of(blob))
    edit(doc["entries"])
    toc_json = json.dumps(doc, indent="\t").encode()
    return with_toc(blob, toc_json), digest(toc_json)


def index(entries: list[dict], name: str, kind: str | None = None) -> int:
    for i, entry in enumerate(entries):
        if entry["name"] == name and (kind is None or entry["type"] == kind):
            return i
    raise AssertionError(f"{name} not in the TOC")


def expect_toc_error(compression: Compression, edit: Callable[[list[dict]], object],
                     fragment: str, error: type[FormatError] = TOCError) -> None:
    blob, toc_digest = edited(compression, edit)
    with pytest.raises(error, match=fragment):
        open_blob(blob, toc_digest)
    with pytest.raises(error, match=fragment):
        verify_blob(source(blob), toc_digest)


def tar_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


# -- the helpers themselves ---------------------------------------------------


@pytest.mark.parametrize("compression", FORMATS)
def test_reassembling_the_original_toc_gives_the_original_blob(compression) -> None:
    blob, result = sample_blob(compression)
    assert with_toc(blob, toc_json_of(blob)) == blob
    assert digest(toc_json_of(blob)) == result.toc_digest
    verify_blob(source(blob), result.toc_digest)


# -- truncated blobs and footers ----------------------------------------------


@pytest.mark.parametrize("compression", FORMATS)
def test_truncated_blob(compression) -> None:
    blob, result = sample_blob(compression)
    footer = footer_of(blob)
    cuts = [0, 1, 39, 40, 50, footer.payload_end // 2, footer.payload_end,
            footer.toc_offset + 5, len(blob) - footer.footer_size, len(blob) - 8,
            len(blob) - 1]
    for cut in cuts:
        truncated = blob[:cut]
        with pytest.raises(FooterError, match="footer"):
            open_blob(truncated, result.toc_digest)
        with pytest.raises(FooterError, match="footer"):
            verify_blob(source(truncated), result.toc_digest)
    with pytest.raises(FooterError, match="too small to hold a footer"):
        open_blob(b"")


@pytest.mark.parametrize("compression", FORMATS)
def test_bytes_cut_from_the_middle_keep_the_footer_but_lose_the_toc(compression) -> None:
    blob, result = sample_blob(compression)
    footer = footer_of(blob)
    damaged = blob[:100] + blob[400:]  # the footer now points past the TOC's start
    with pytest.raises(FormatError, match=r"TOC|footer"):
        open_blob(damaged, result.toc_digest)
    # Cut out of the TOC itself: the footer still parses, the TOC does not.
    damaged = blob[:footer.toc_offset + 10] + blob[footer.toc_offset + 30:]
    with pytest.raises(FormatError, match=r"TOC|footer"):
        open_blob(damaged, result.toc_digest)


@pytest.mark.parametrize("compression", FORMATS)
def test_missing_footer(compression) -> None:
    blob, result = sample_blob(compression)
    footer = footer_of(blob)
    without = blob[:len(blob) - footer.footer_size - (8 if compression is Compression.ZSTD
                                                       else 0)]
    for damaged in (without, without + b"\0" * 64, blob + b"trailing garbage after the footer"):
        with pytest.raises(FooterError, match="no eStargz or zstd:chunked footer"):
            open_blob(damaged, result.toc_digest)
    with pytest.raises(FooterError, match="no eStargz or zstd:chunked footer"):
        open_blob(gzip.compress(sample_tar()))  # a plain gzip tar is not eStargz


def test_footer_with_toc_offset_beyond_the_blob() -> None:
    blob, _ = sample_blob(Compression.GZIP)
    payload = blob[:-51]
    for offset in (len(blob), len(blob) * 2, 2**63, len(payload)):
        with pytest.raises(FooterError, match="outside the blob"):
            open_blob(payload + gzip_footer(offset))
    bad_hex = bytearray(gzip_footer(0))
    bad_hex[16:32] = b"-000000000000001"
    with pytest.raises(FooterError, match="malformed TOC offset"):
        open_blob(payload + bytes(bad_hex))
    no_magic = bytearray(gzip_footer(0))
    no_magic[32:38] = b"STARGY"
    with pytest.raises(FooterError, match="STARGZ magic"):
        open_blob(payload + bytes(no_magic))


def test_zstd_footer_pointing_outside_the_blob() -> None:
    blob, _ = sample_blob(Compression.ZSTD)
    footer = footer_of(blob)
    payload = blob[:-48]
    size = len(blob)
    for offset, length in [(size, 10), (footer.toc_offset, size), (2**63, 1),
                           (4, 10), (footer.toc_offset, 2**64 - 1)]:
        with pytest.raises(FooterError, match="outside the blob"):
            open_blob(payload + zstd_footer(offset, length, 100))
    tail = bytearray(zstd_footer(footer.toc_offset, footer.toc_length, 100))
    tail[32:40] = (7).to_bytes(8, "little")
    with pytest.raises(FooterError, match="unknown manifest type 7"):
        open_blob(payload + bytes(tail))


# -- TOCs that are garbage, too large, or inconsistent ------------------------


@pytest.mark.parametrize("compression", FORMATS)
def test_toc_that_is_not_json(compression) -> None:
    blob, _ = sample_blob(compression)
    for garbage in (b"not json{", b"", b"\xff\xfe\x00garbage", b"[" * 100_000):
        damaged = with_toc(blob, garbage)
        with pytest.raises(TOCError, match="TOC is not valid JSON"):
            open_blob(damaged)
        with pytest.raises(TOCError, match="TOC is not valid JSON"):
            open_blob(damaged, digest(garbage))


@pytest.mark.parametrize("compression", FORMATS)
@pytest.mark.parametrize(("doc", "fragment"), [
    (b"[1, 2]", "TOC JSON is not an object"),
    (b"\"entries\"", "TOC JSON is not an object"),
    (b"null", "TOC JSON is not an object"),
    (b'{"version": 2, "entries": []}', "unsupported TOC version 2"),
    (b'{"version": "1", "entries": []}', "unsupported TOC version '1'"),
    (b'{"entries": []}', "unsupported TOC version None"),
    (b'{"version": 1}', "TOC has no entries list"),
    (b'{"version": 1, "entries": {}}', "TOC has no entries list"),
    (b'{"version": 1, "entries": [7]}', r"TOC entry #0 is not an object"),
    (b'{"version": 1, "entries": [{"type": "reg"}]}', r"TOC entry #0 has no name"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "socket"}]}', "unknown type 'socket'"),
    (b'{"version": 1, "entries": [{"name": "a", "type": ["reg"]}]}', r"unknown type \['reg'\]"),
    (b'{"version": 1, "entries": [{"name": "a", "type": {}}]}', r"unknown type \{\}"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "uid": -1}]}',
     "uid must be a non-negative integer"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "mode": "0755"}]}',
     "mode must be a non-negative integer"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "size": 1.5}]}',
     "size must be a non-negative integer"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "uid": true}]}',
     "uid must be a non-negative integer"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "offset": 9223372036854775808}]}',
     "offset must be a non-negative integer"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "modtime": "yesterday"}]}',
     "modtime 'yesterday' is not RFC3339"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": 3}]}',
     "holds data but has no chunkDigest"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "digest": "md5:00"}]}',
     "is not a sha256 digest"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "symlink"}]}',
     "is a symlink without linkName"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "xattrs": "abc"}]}',
     "xattrs must be an object"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "xattrs": {"k": 1}}]}',
     "xattr 'k' is not base64 text"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "xattrs": {"k": "@@"}}]}',
     "xattr 'k' is not valid base64"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "xattrs": {"k": "\xc3\xa9"}}]}',
     "xattr 'k' is not valid base64"),
    (b'{"version": 1, "entries": [{"name": "a\\ud800", "type": "dir"}]}', "not valid UTF-8"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "symlink", "linkName": "\\udfff"}]}',
     "not valid UTF-8"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "userName": "\\ud800"}]}',
     "not valid UTF-8"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "xattrs": {"\\ud800": ""}}]}',
     "not valid UTF-8"),
])
def test_toc_json_with_the_wrong_shape(compression, doc: bytes, fragment: str) -> None:
    blob, _ = sample_blob(compression)
    with pytest.raises(TOCError, match=fragment):
        parse_toc(doc)
    with pytest.raises(TOCError, match=fragment):
        open_blob(with_toc(blob, doc), digest(doc))


@pytest.mark.parametrize("compression", FORMATS)
def test_toc_exceeding_max_toc_size(compression) -> None:
    blob, result = sample_blob(compression)
    with pytest.raises(TOCError, match="exceeds the limit"):
        open_blob(blob, result.toc_digest, max_toc_size=100)
    with pytest.raises(TOCError, match="exceeds the limit"):
        verify_blob(source(blob), result.toc_digest, max_toc_size=100)
    # Compressed small, decompressed large: refused while decompressing.
    padded = toc_json_of(blob) + b" " * 200_000
    bomb = with_toc(blob, padded)
    assert footer_of(bomb).toc_length < 20_000
    with pytest.raises(TOCError, match=r"exceeds the limit|decompresses to more than"):
        open_blob(bomb, digest(padded), max_toc_size=100_000)
    assert open_blob(bomb, digest(padded)).layer.lookup("bin/big") is not None


def test_zstd_footer_lying_about_the_toc_size() -> None:
    blob, result = sample_blob(Compression.ZSTD)
    footer = footer_of(blob)
    payload = blob[:-48]
    huge = payload + zstd_footer(footer.toc_offset, footer.toc_length, 1 << 40)
    with pytest.raises(TOCError, match="exceeds the limit"):
        open_blob(huge, result.toc_digest)
    # Claims a small TOC but decompresses to a large one: the limit still holds.
    padded = toc_json_of(blob) + b" " * 300_000
    bomb = with_toc(blob, padded)
    f = footer_of(bomb)
    lying = bomb[:-48] + zstd_footer(f.toc_offset, f.toc_length, 10)
    with pytest.raises(TOCError, match="more than 100000 bytes"):
        open_blob(lying, digest(padded), max_toc_size=100_000)


@pytest.mark.parametrize("compression", FORMATS)
def test_toc_bomb_uses_bounded_memory(compression) -> None:
    blob, _ = sample_blob(compression)
    bomb = with_toc(blob, b"{" + b" " * (40 << 20) + b"}")
    assert len(bomb) < len(blob) + 200_000
    tracemalloc.start()
    try:
        with pytest.raises(TOCError, match=r"exceeds the limit|more than"):
            open_blob(bomb, max_toc_size=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_gzip_toc_member_with_the_wrong_tar_name_or_size() -> None:
    blob, _ = sample_blob(Compression.GZIP)
    footer = footer_of(blob)
    payload = blob[:footer.payload_end]
    toc_json = toc_json_of(blob)
    for name, size, fragment in [("other.json", len(toc_json), "expected 'stargz.index.json'"),
                                 ("stargz.index.json", len(toc_json) + 5000, "truncated")]:
        ti = tarfile.TarInfo(name)
        ti.size = size
        member = ti.tobuf(tarfile.USTAR_FORMAT) + toc_json
        damaged = payload + gzip_member(member, 6) + gzip_footer(len(payload))
        with pytest.raises(TOCError, match=fragment):
            open_blob(damaged)
    header = bytearray(tarfile.TarInfo("stargz.index.json").tobuf(tarfile.USTAR_FORMAT))
    header[124:136] = b"0x1234567890"
    damaged = payload + gzip_member(bytes(header) + toc_json, 6) + gzip_footer(len(payload))
    with pytest.raises(TOCError, match="malformed size"):
        open_blob(damaged)
    damaged = payload + b"not gzip at all" + b"\0" * 40 + gzip_footer(len(payload))
    with pytest.raises(TOCError, match="cannot decompress the TOC"):
        open_blob(damaged)


@pytest.mark.parametrize("compression", FORMATS)
def test_wrong_toc_digest(compression) -> None:
    blob, result = sample_blob(compression)
    wrong = digest(b"something else")
    with pytest.raises(DigestMismatch, match=f"TOC digest is {result.toc_digest}, expected"):
        open_blob(blob, wrong)
    with pytest.raises(DigestMismatch, match="expected " + wrong):
        verify_blob(source(blob), wrong)


@pytest.mark.parametrize("compression", FORMATS)
def test_absolute_entry_name(compression) -> None:
    def edit(entries: list[dict]) -> None:
        entries[index(entries, "etc/hostname")]["name"] = "/etc/hostname"

    expect_toc_error(compression, edit, "entry name '/etc/hostname' is absolute")


@pytest.mark.parametrize("compression", FORMATS)
@pytest.mark.parametrize("name", ["../etc/hostname", "etc/../../x", "etc/.."])
def test_dotdot_entry_name(compression, name: str) -> None:
    def edit(entries: list[dict]) -> None:
        entries[index(entries, "etc/hostname")]["name"] = name

    expect_toc_error(compression, edit, "contains a '..' component")


@pytest.mark.parametrize("compression", FORMATS)
def test_hardlink_target_outside_the_root(compression) -> None:
    def edit(entries: list[dict]) -> None:
        entries[index(entries, "bin/link")]["linkName"] = "../bin/big"

    expect_toc_error(compression, edit, "contains a '..' component")


@pytest.mark.parametrize("compression", FORMATS)
def test_payload_offset_beyond_the_payload(compression) -> None:
    blob, _ = sample_blob(compression)
    payload_end = footer_of(blob).payload_end
    for offset in (payload_end, payload_end + 1, len(blob), 2**63 - 1):
        def edit(entries: list[dict], offset: int = offset) -> None:
            entries[index(entries, "etc/hostname")]["offset"] = offset

        expect_toc_error(compression, edit, f"offset {offset} is outside the payload")


@pytest.mark.parametrize("compression", FORMATS)
def test_offset_inside_the_payload_but_not_at_a_member(compression) -> None:
    def edit(entries: list[dict]) -> None:
        entries[index(entries, "etc/hostname")]["offset"] += 3

    blob, toc_digest = edited(compression, edit)
    reader = open_blob(blob, toc_digest)
    with pytest.raises(FormatError, match=r"corrupt compressed data|digest|ends after|truncated"):
        reader.read_file(reader.lookup("etc/hostname"))
    assert reader.read_file(reader.lookup("bin/big")) == BIG
    with pytest.raises(VerificationError):
        verify_blob(source(blob), toc_digest)


@pytest.mark.parametrize("compression", FORMATS)
@pytest.mark.parametrize("delta", [-1, 1, -CHUNK])
def test_overlapping_chunks_and_gaps(compression, delta: int) -> None:
    def edit(entries: list[dict]) -> None:
        entries[index(entries, "bin/big", "chunk")]["chunkOffset"] += delta

    expect_toc_error(compression, edit, "chunks overlap or leave a gap")


@pytest.mark.parametrize("compression", FORMATS)
def test_chunks_that_do_not_cover_the_file(compression) -> None:
    def drop_last(entries: list[dict]) -> None:
        last = max(i for i, e in enumerate(entries) if e["type"] == "chunk")
        del entries[last]

    expect_toc_error(compression, drop_last, f"cover {3 * CHUNK} of {len(BIG)} bytes")

    def too_big(entries: list[dict]) -> None:
        entries[index(entries, "bin/big", "chunk")]["chunkSize"] = len(BIG)

    expect_toc_error(compression, too_big, "does not fit a file")

    def grow(entries: list[dict]) -> None:
        entries[index(entries, "bin/big", "reg")]["size"] = len(BIG) + 1

    # The last chunk has no chunkSize, so it grows with the file: the structure
    # holds, but the chunk's bytes fail their digest and the stream disagrees.
    blob, toc_digest = edited(compression, grow)
    reader = open_blob(blob, toc_digest)
    assert reader.read_file(reader.lookup("bin/big"), 0, 3 * CHUNK) == BIG[:3 * CHUNK]
    with pytest.raises(DigestMismatch, match="chunk digest is"):
        reader.read_file(reader.lookup("bin/big"))
    with pytest.raises(VerificationError, match="size is 3172 in the tar, 3173 in the TOC"):
        verify_blob(source(blob), toc_digest)


@pytest.mark.parametrize("compression", FORMATS)
def test_chunk_without_its_regular_file(compression) -> None:
    def orphan(entries: list[dict]) -> None:
        entries[index(entries, "bin/big", "chunk")]["name"] = "etc/hostname"

    expect_toc_error(compression, orphan, "chunk does not follow its regular file")

    def first(entries: list[dict]) -> None:
        chunk = entries.pop(index(entries, "bin/big", "chunk"))
        entries.insert(0, chunk)

    expect_toc_error(compression, first, "chunk does not follow its regular file")


@pytest.mark.parametrize("compression", FORMATS)
def test_hardlink_cycle(compression) -> None:
    def cycle(entries: list[dict]) -> None:
        entries.append({"name": "a", "type": "hardlink", "linkName": "b"})
        entries.append({"name": "b", "type": "hardlink", "linkName": "a"})

    expect_toc_error(compression, cycle, "hard link target 'b' is not an earlier entry")

    def self_link(entries: list[dict]) -> None:
        entries.append({"name": "bin/big", "type": "hardlink", "linkName": "bin/big"})

    expect_toc_error(compression, self_link, "hard link target 'bin/big' is not an earlier")


@pytest.mark.parametrize("compression", FORMATS)
def test_hardlink_to_a_missing_target_or_a_directory(compression) -> None:
    def missing(entries: list[dict]) -> None:
        entries[index(entries, "bin/link")]["linkName"] = "bin/nothing"

    expect_toc_error(compression, missing, "hard link target 'bin/nothing' is not an earlier")

    def later(entries: list[dict]) -> None:
        entries[index(entries, "bin/link")]["linkName"] = "empty"

    expect_toc_error(compression, later, "hard link target 'empty' is not an earlier entry")

    def to_dir(entries: list[dict]) -> None:
        entries[index(entries, "bin/link")]["linkName"] = "etc"

    expect_toc_error(compression, to_dir, "hard link to directory 'etc'")


@pytest.mark.parametrize("compression", FORMATS)
def test_symlink_cycle_is_just_data(compression) -> None:
    def cycle(entries: list[dict]) -> None:
        entries.append({"name": "a", "type": "symlink", "linkName": "b"})
        entries.append({"name": "b", "type": "symlink", "linkName": "a"})
        entries.append({"name": "self", "type": "symlink", "linkName": "self/x"})

    blob, toc_digest = edited(compression, cycle)
    reader = open_blob(blob, toc_digest)
    assert reader.lookup("a").link_target == "b" and reader.lookup("b").link_target == "a"
    with pytest.raises(FormatError, match="is not a regular file"):
        reader.read_file(reader.lookup("self"))


@pytest.mark.parametrize("compression", FORMATS)
def test_parent_that_is_not_a_directory(compression) -> None:
    def under_file(entries: list[dict]) -> None:
        entries.append({"name": "etc/hostname/x", "type": "dir"})

    expect_toc_error(compression, under_file, "parent 'etc/hostname' is not a directory")

    def under_symlink(entries: list[dict]) -> None:
        entries.append({"name": "bin/sym/x", "type": "fifo"})

    expect_toc_error(compression, under_symlink, "parent 'bin/sym' is not a directory")

    def replaces_dir(entries: list[dict]) -> None:
        entries.append({"name": "bin", "type": "fifo"})

    expect_toc_error(compression, replaces_dir, "replaces non-empty directory 'bin'")

    def root_file(entries: list[dict]) -> None:
        entries.append({"name": "./", "type": "fifo"})

    expect_toc_error(compression, root_file, "the root must be a directory")


@pytest.mark.parametrize("compression", FORMATS)
def test_very_deep_path(compression) -> None:
    deep = "/".join(["d"] * 5000)

    def add(entries: list[dict]) -> None:
        entries.append({"name": deep, "type": "dir"})
        entries.append({"name": deep + "/x/../y", "type": "dir"})

    expect_toc_error(compression, add, "contains a '..' component")

    def add_ok(entries: list[dict]) -> None:
        entries.append({"name": deep, "type": "dir"})

    blob, toc_digest = edited(compression, add_ok)
    assert open_blob(blob, toc_digest).lookup(deep).kind == "dir"


@pytest.mark.parametrize("compression", FORMATS)
def test_huge_inner_offset_is_an_error_not_an_overflow(compression) -> None:
    def edit(entries: list[dict]) -> None:
        entries[index(entries, "etc/hostname")]["innerOffset"] = 2**63 - 1

    blob, toc_digest = edited(compression, edit)
    reader = open_blob(blob, toc_digest)
    with pytest.raises(FormatError, match=r"ends after|truncated"):
        reader.read_file(reader.lookup("etc/hostname"))
    with pytest.raises(VerificationError, match="does not start at the member"):
        verify_blob(source(blob), toc_digest)


@pytest.mark.parametrize("compression", FORMATS)
def test_chunk_digest_that_does_not_match(compression) -> None:
    def edit(entries: list[dict]) -> None:
        entries[index(entries, "etc/hostname")]["chunkDigest"] = digest(b"other")

    blob, toc_digest = edited(compression, edit)
    reader = open_blob(blob, toc_digest)
    with pytest.raises(DigestMismatch, match="chunk digest is"):
        reader.read_file(reader.lookup("etc/hostname"))
    with pytest.raises(VerificationError, match="fails its chunkDigest"):
        verify_blob(source(blob), toc_digest)


# -- corrupted compressed bytes -------------------------------------------------


def chunk_region(blob: bytes, reader: BlobReader, path: str) -> tuple[int, int]:
    chunk = reader.lookup(path).chunks[0]
    return chunk.blob_offset, chunk.blob_end


@pytest.mark.parametrize("compression", FORMATS)
def test_flipped_byte_in_a_chunk_is_never_served(compression) -> None:
    blob, result = sample_blob(compression)
    reader = open_blob(blob, result.toc_digest)
    start, end = chunk_region(blob, reader, "bin/big")
    for position in range(start + 12, end - 9, max(1, (end - start) // 13)):
        damaged = bytearray(blob)
        damaged[position] ^= 0x55
        bad = open_blob(bytes(damaged), result.toc_digest)
        with pytest.raises(FormatError):
            bad.read_file(bad.lookup("bin/big"), 0, 10)
        with pytest.raises(FormatError):
            bad.read_file(bad.lookup("bin/link"))  # the same inode
        assert bad.read_file(bad.lookup("etc/hostname")) == HOSTNAME
        assert bad.read_file(bad.lookup("bin/big"), CHUNK, CHUNK) == BIG[CHUNK:2 * CHUNK]
        with pytest.raises(VerificationError):
            verify_blob(source(bytes(damaged)), result.toc_digest)


def rebuild_last_member(blob: bytes, reader: BlobReader,
                        change: Callable[[bytearray], None]) -> bytes:
    """Decompress the payload's last member, change it, compress it again (with a
    correct CRC) and re-assemble the blob with the unchanged TOC."""
    footer = reader.layer.footer
    start = max(c.blob_offset for c in reader.layer.payload_chunks())
    compression = footer.compression
    member = bytearray(decompress_all(compression, blob[start:footer.payload_end], 1 << 20))
    change(member)
    recompressed = (gzip_member(bytes(member), 6) if compression is Compression.GZIP
                    else zstd_frame(bytes(member), 3))
    return assemble(blob[:start] + recompressed, toc_json_of(blob), compression)


def header_at(member: bytearray, name: bytes) -> int:
    position = member.find(name + b"\0")
    assert position >= 0 and position % 512 == 0
    return position


@pytest.mark.parametrize("compression", FORMATS)
def test_tar_header_that_differs_from_the_toc(compression) -> None:
    blob, result = sample_blob(compression)
    reader = open_blob(blob, result.toc_digest)

    def change_mode(member: bytearray) -> None:
        at = header_at(member, b"bin/sym")
        block = bytearray(member[at:at + 512])
        block[100:108] = b"0000700\0"
        tar_checksum(block)
        member[at:at + 512] = block

    damaged = rebuild_last_member(blob, reader, change_mode)
    bad = open_blob(damaged, result.toc_digest)  # the TOC is intact...
    assert bad.read_file(bad.lookup("bin/big")) == BIG
    with pytest.raises(VerificationError, match="tar entry 'bin/sym': mode is 448 in the tar"):
        verify_blob(source(damaged), result.toc_digest)  # ...the stream is not

    def break_checksum(member: bytearray) -> None:
        at = header_at(member, b"fifo")
        member[at + 1] = ord("x")

    damaged = rebuild_last_member(blob, reader, break_checksum)
    with pytest.raises(VerificationError, match="tar stream ends before entry 'fifo'"):
        verify_blob(source(damaged), result.toc_digest)

    def nonzero_padding(member: bytearray) -> None:
        at = header_at(member, b"bin/link")
        assert member[at - 1] == 0  # the padding after bin/big's last chunk
        member[at - 1] = 1

    damaged = rebuild_last_member(blob, reader, nonzero_padding)
    bad = open_blob(damaged, result.toc_digest)
    assert bad.read_file(bad.lookup("bin/big")) == BIG
    with pytest.raises(VerificationError, match="padding"):
        verify_blob(source(damaged), result.toc_digest)


def test_gzip_crc_error_is_caught_by_verify() -> None:
    blob, result = sample_blob(Compression.GZIP)
    reader = open_blob(blob, result.toc_digest)
    start, end = chunk_region(blob, reader, "etc/hostname")
    assert zlib.crc32(gzip.decompress(blob[start:end])) == int.from_bytes(blob[end - 8:end - 4],
                                                                          "little")
    damaged = bytearray(blob)
    damaged[end - 6] ^= 0xFF  # the CRC32 of the member holding etc/hostname
    bad = open_blob(bytes(damaged), result.toc_digest)
    try:
        data = bad.read_file(bad.lookup("etc/hostname"))
    except FormatError:
        pass
    else:
        assert data == HOSTNAME  # the bytes are right; only the trailer is damaged
    with pytest.raises(VerificationError, match=f"member at blob offset {start}: .*check"):
        verify_blob(source(bytes(damaged)), result.toc_digest)
    damaged = bytearray(blob)
    damaged[end - 2] ^= 0x01  # ISIZE
    with pytest.raises(VerificationError, match=f"member at blob offset {start}"):
        verify_blob(source(bytes(damaged)), result.toc_digest)


def test_decompression_is_bounded() -> None:
    zeros = 20 << 20
    for compression, bomb in [(Compression.GZIP, gzip_member(b"\0" * zeros, 9)),
                              (Compression.ZSTD, zstd_frame(b"\0" * zeros, 3))]:
        assert len(bomb) < 100_000
        with pytest.raises(FormatError, match="decompresses to more than 1000 bytes"):
            decompress_all(compression, bomb, 1000)
        assert decompress_span(compression, bomb, 100, 10) == b"\0" * 10
        with pytest.raises(FormatError, match=r"corrupt compressed data|truncated"):
            decompress_all(compression, bomb[:-20] + b"\x01" * 20, 1 << 30)
        with pytest.raises(FormatError, match=r"ends after|truncated|full frame"):
            decompress_span(compression, bomb[:len(bomb) // 2], zeros - 10, 10)


def with_content_size(frame: bytes, size: int) -> bytes:
    """The zstd frame with its header's Frame_Content_Size field set to `size` (a
    field of 4 bytes, as a frame of some MiB has)."""
    descriptor = frame[4]
    assert descriptor >> 6 == 2 and not descriptor & 0x03  # 4-byte size, no dictionary
    at = 5 + (0 if descriptor & 0x20 else 1)  # after the window descriptor, if any
    return frame[:at] + size.to_bytes(4, "little") + frame[at + 4:]


def test_a_zstd_frame_whose_header_misstates_its_size_is_refused() -> None:
    """A chunk that is a whole frame is decompressed in one call into a buffer of the
    size its header gives: a frame that holds more or less than that fails, whatever
    the chunk asks for."""
    zeros = 20 << 20
    frame = zstd_frame(b"\0" * zeros, 3)
    assert decompress_span(Compression.ZSTD, frame, 0, zeros) == b"\0" * zeros
    for declared in (zeros - 1, zeros + 1, 1000):
        lying = with_content_size(frame, declared)
        with pytest.raises(FormatError, match="corrupt compressed data"):
            decompress_span(Compression.ZSTD, lying, 0, declared)
        with pytest.raises(FormatError, match="corrupt compressed data"):
            decompress_span(Compression.ZSTD, lying, declared - 10, 10)


def test_load_toc_on_bytes_that_are_not_a_toc() -> None:
    for compression in FORMATS:
        blob, result = sample_blob(compression)
        footer = footer_of(blob)
        for junk in (b"", b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"x" * 100, blob[:footer.toc_offset]):
            with pytest.raises(FormatError):
                load_toc(footer, junk, result.toc_digest)


# -- malformed input tars ---------------------------------------------------------


def build_error(tar: bytes, **options: object) -> TarError:
    with pytest.raises(TarError) as caught:
        build(io.BytesIO(tar), io.BytesIO(), BuildOptions(chunk_size=CHUNK, **options))
    return caught.value


def test_tar_truncated_in_a_header() -> None:
    tar = sample_tar()
    assert "not a tar stream" in str(build_error(tar[:100]))
    second = 512  # etc/ has no data, so etc/hostname's header follows at once
    for cut in (second + 1, second + 100, second + 511):
        assert str(build_error(tar[:cut])) == f"tar is truncated at byte {second} of {cut}"


def test_tar_truncated_in_file_data() -> None:
    tar = sample_tar()
    data_start = 2 * 512  # etc/, etc/hostname's header
    for cut in (data_start + 1, data_start + 5):
        assert "truncated inside the data of 'etc/hostname'" in str(build_error(tar[:cut]))
    big = tar.find(b"bin/big\0")
    assert "truncated inside the data of 'bin/big'" in str(build_error(tar[:big + 512 + 2000]))
    # All of the data is there, but the padding after it is cut.
    cut = big + 512 + len(BIG) + 10
    assert "unexpected end of data" in str(build_error(tar[:cut]))


def test_tar_with_a_corrupted_header_checksum_mid_stream() -> None:
    tar = bytearray(sample_tar())
    at = tar.find(b"bin/sym\0")
    tar[at + 120] ^= 0x01
    assert str(build_error(bytes(tar))) == f"malformed tar header at byte {at}"
    tar = bytearray(sample_tar())
    tar[0] ^= 0x01
    assert "not a tar stream" in str(build_error(bytes(tar)))


def test_tar_that_is_not_a_tar() -> None:
    assert "not a tar stream" in str(build_error(b"hello world, not a tar" * 100))
    assert "not a tar stream" in str(build_error(gzip.compress(sample_tar())))


def _gnu_sparse_header(extended: bool) -> bytes:
    ti = tarfile.TarInfo("sparse")
    ti.type = tarfile.GNUTYPE_SPARSE
    block = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
    block[386:398] = b"%011o\0" % 0  # one sparse region: offset 0 ...
    block[398:410] = b"%011o\0" % 0  # ... of 0 bytes
    block[482] = 1 if extended else 0
    block[483:495] = b"%011o\0" % 4096  # real size
    tar_checksum(block)
    return bytes(block)


def test_gnu_sparse_file() -> None:
    tar = _gnu_sparse_header(False) + b"\0" * 1024
    assert "'sparse' is a sparse file" in str(build_error(tar))
    # An extension block that is not there: tarfile itself trips over it.
    assert "malformed tar" in str(build_error(_gnu_sparse_header(True)))
    first = tar_of((info("a"), b"x"), fmt=tarfile.GNU_FORMAT)[:1024]
    assert "malformed tar" in str(build_error(first + _gnu_sparse_header(True)))


@pytest.mark.parametrize("pax", [
    {"GNU.sparse.map": "0,1", "GNU.sparse.major": "0", "GNU.sparse.minor": "1"},
    {"GNU.sparse.size": "1", "GNU.sparse.numblocks": "0"},
])
def test_pax_sparse_file(pax: dict[str, str]) -> None:
    assert "is a sparse file" in str(build_error(tar_of((info("s", pax_headers=pax), b"x"))))


@pytest.mark.parametrize("pax", [
    {"GNU.sparse.map": "zz"},
    {"GNU.sparse.size": "zz"},
    {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"},
])
def test_pax_sparse_records_that_are_garbage(pax: dict[str, str]) -> None:
    assert "malformed tar" in str(build_error(tar_of((info("s", pax_headers=pax), b"x"))))


def test_pax_global_header() -> None:
    tar = tar_of((info("a"), b"x"), pax_headers={"comment": "global"})
    assert "PAX global headers are not supported" in str(build_error(tar))
    later = tar_of((info("a"), b"x"))[:1024]  # a's header and data, no end blocks
    glob = tar_of((info("b"), b"y"), pax_headers={"comment": "global"})
    assert "PAX global headers" in str(build_error(later + glob))


def test_chain_of_long_name_headers() -> None:
    block = tarfile.TarInfo("././@LongLink")
    block.type, block.size = tarfile.GNUTYPE_LONGNAME, 11
    record = block.tobuf(tarfile.GNU_FORMAT) + b"x" * 10 + b"\0" * 502
    tar = record * 5000 + tarfile.TarInfo("a").tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024
    assert "malformed tar" in str(build_error(tar))


def test_pax_records_that_are_garbage() -> None:
    tar = bytearray(tar_of((info("first"), b"1"), (info("a", pax_headers={"comment": "x"}), b"x")))
    at = tar.find(b"comment=x")
    tar[at - 3:at - 1] = b"00"  # record length 0
    assert "malformed tar" in str(build_error(bytes(tar)))
    tar = tar_of((info("a", pax_headers={"hdrcharset": "BINARY"}), b"x"))
    tar = tar.replace(b"hdrcharset=BINARY", b"hdrcharset=\xff\xfeNARY")
    assert "malformed tar" in str(build_error(tar))


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/abs/olute"])
def test_tar_names_outside_the_root(name: str) -> None:
    ti = info("x")
    block = bytearray(ti.tobuf(tarfile.USTAR_FORMAT))
    block[0:100] = name.encode().ljust(100, b"\0")
    tar_checksum(block)
    tar = bytes(block) + b"\0" * 1024
    message = str(build_error(tar))
    assert "is absolute" in message or "'..' component" in message


def test_tar_hardlink_to_a_name_outside_the_root() -> None:
    tar = tar_of((info("a"), b"x"), (info("l", tarfile.LNKTYPE, linkname="../a"), b""))
    assert "contains a '..' component" in str(build_error(tar))


def test_tar_with_names_that_are_not_utf8() -> None:
    tar = tar_of((info("a\udcff"), b"x"), **{"encoding": "utf-8", "errors": "surrogateescape"})
    assert "not valid UTF-8" in str(build_error(tar))
    for field in ("uname", "gname"):
        tar = tar_of((info("a", **{field: "r\udcffot"}), b"x"),
                     **{"encoding": "utf-8", "errors": "surrogateescape"})
        assert "not valid UTF-8" in str(build_error(tar)), field
    raw = tar_of((info("a", pax_headers={"SCHILY.xattr.user.k": "v"}), b"x"))
    assert "not valid UTF-8" in str(build_error(raw.replace(b"user.k", b"user.\xff")))


def test_tar_hardlink_cycle() -> None:
    tar = tar_of((info("a", tarfile.LNKTYPE, linkname="b"), b""),
                 (info("b", tarfile.LNKTYPE, linkname="a"), b""))
    assert "hard link target 'b' is not an earlier entry" in str(build_error(tar))
    for prioritized in (["a"], ["b", "a"]):
        message = str(build_error(tar, prioritized_files=prioritized))
        assert "is not an earlier entry" in message


def test_tar_hardlink_to_a_missing_or_later_target() -> None:
    tar = tar_of((info("l", tarfile.LNKTYPE, linkname="nothing"), b""))
    assert "hard link target 'nothing' is not an earlier entry" in str(build_error(tar))
    tar = tar_of((info("l", tarfile.LNKTYPE, linkname="f"), b""), (info("f"), b"data"))
    assert "hard link target 'f' is not an earlier entry" in str(build_error(tar))
    # Prioritizing the link moves its target in front of it: a valid layer.
    blob, result = convert(tar, Compression.GZIP, prioritized_files=["l"])
    reader = open_blob(blob, result.toc_digest)
    assert reader.read_file(reader.lookup("l")) == b"data"


def test_tar_tree_the_toc_cannot_hold() -> None:
    tar = tar_of((info("f"), b"x"), (info("f/x"), b"y"))
    assert "parent 'f' is not a directory" in str(build_error(tar))
    tar = tar_of((info("./"), b"x"))
    assert "the root must be a directory" in str(build_error(tar))


def test_tar_with_negative_ids() -> None:
    ti = info("a")
    block = bytearray(ti.tobuf(tarfile.USTAR_FORMAT))
    block[108:116] = b"\xff" * 8  # base-256 -1
    tar_checksum(block)
    assert "uid must be a non-negative integer" in str(build_error(bytes(block) + b"\0" * 1024))


def test_tar_with_a_very_deep_path() -> None:
    deep = "/".join(["d"] * 3000) + "/f"
    tar = tar_of((info(deep), b"deep"))
    for prioritized in ([], [deep]):
        blob, result = convert(tar, Compression.ZSTD, prioritized_files=prioritized)
        reader = open_blob(blob, result.toc_digest)
        assert reader.read_file(reader.lookup(deep)) == b"deep"
        assert (reader.layer.prefetch_size > 0) == bool(prioritized)


def test_tar_with_non_finite_mtime() -> None:
    for mtime in ("inf", "-inf", "nan", "1e400"):
        tar = tar_of((info("a", pax_headers={"mtime": mtime}), b"x"))
        blob, result = convert(tar, Compression.GZIP)
        node = open_blob(blob, result.toc_digest).lookup("a")
        assert node.mtime == 0
        assert verify_blob(source(blob), result.toc_digest).regular_files == 2


# -- the command line -----------------------------------------------------------


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, a fragment the one-line error must hold)"""
    gz, gz_result = sample_blob(Compression.GZIP)
    zs, _ = sample_blob(Compression.ZSTD)
    _, crc_end = chunk_region(gz, open_blob(gz), "etc/hostname")
    files = {
        "good.blob": gz,
        "truncated.blob": gz[:len(gz) // 2],
        "garbage-toc.blob": with_toc(zs, b"\x00garbage"),
        "crc.blob": gz[:crc_end - 6] + bytes([gz[crc_end - 6] ^ 1]) + gz[crc_end - 5:],
        "truncated.tar": sample_tar()[:700],
        "sparse.tar": _gnu_sparse_header(False) + b"\0" * 1024,
        "cycle.tar": tar_of((info("a", tarfile.LNKTYPE, linkname="b"), b""),
                            (info("b", tarfile.LNKTYPE, linkname="a"), b"")),
        "prio": b"a\n",
        "surrogate.blob": with_toc(gz, b'{"version": 1, "entries": [{"name": "\\udc80", '
                                       b'"type": "dir"}]}'),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    p = str(tmp_path)
    out = str(tmp_path / "out.blob")
    return {
        "verify-truncated": (["estargz", "verify", f"{p}/truncated.blob"], "footer"),
        "verify-crc": (["estargz", "verify", f"{p}/crc.blob", "--toc-digest",
                        gz_result.toc_digest], "incorrect data check"),
        "verify-wrong-digest": (["estargz", "verify", f"{p}/good.blob", "--toc-digest",
                                 digest(b"x")], "TOC digest is sha256:"),
        "toc-garbage": (["estargz", "toc", f"{p}/garbage-toc.blob"], "TOC is not valid JSON"),
        "toc-surrogate": (["estargz", "toc", f"{p}/surrogate.blob"], "not valid UTF-8"),
        "build-truncated": (["estargz", "build", f"{p}/truncated.tar", out], "truncated"),
        "build-sparse": (["estargz", "build", f"{p}/sparse.tar", out, "--zstd"], "sparse"),
        "build-cycle": (["estargz", "build", f"{p}/cycle.tar", out, "--prioritize-file",
                         f"{p}/prio"], "not an earlier entry"),
    }


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    for name, (argv, fragment) in bad_inputs(tmp_path).items():
        code = cli_main(argv)
        captured = capsys.readouterr()
        assert code == 1, name
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lazypull: "), (name, captured.err)
        assert re.search(fragment, lines[0]), (name, lines[0])
        assert "Traceback" not in captured.err and captured.out == "", name


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("lazypull")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


@pytest.mark.parametrize("case", ["verify-truncated", "toc-garbage", "build-truncated",
                                  "build-cycle"])
def test_console_script_on_bad_input(tmp_path: Path, case: str) -> None:
    argv, fragment = bad_inputs(tmp_path)[case]
    run = subprocess.run([*_console_script(), *argv], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazypull: ")
    assert re.search(fragment, lines[0])
