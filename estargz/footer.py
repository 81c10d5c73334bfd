"""Footers that locate the TOC at the end of a blob.

gzip eStargz ends with an empty gzip member whose extra field carries the TOC
offset (51 bytes; 47 in the legacy layout without the `SG` subfield header).
zstd:chunked ends with a skippable frame holding a 40-byte little-endian footer.
"""

import struct
from dataclasses import dataclass
from enum import StrEnum

from .errors import FooterError


class Compression(StrEnum):
    GZIP = "gzip"
    ZSTD = "zstd"


GZIP_FOOTER_SIZE = 51
LEGACY_GZIP_FOOTER_SIZE = 47
ZSTD_FOOTER_SIZE = 40
# Bytes to read from the end of a blob to recognise any footer we support.
MAX_FOOTER_SIZE = GZIP_FOOTER_SIZE

SKIPPABLE_FRAME_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_CHUNKED_MAGIC = b"GnUlInUx"
ZSTD_MANIFEST_TYPE_CRFS = 1
_STARGZ_MAGIC = b"STARGZ"
# Empty stored deflate block, then CRC32 and ISIZE of an empty payload.
_EMPTY_GZIP_BODY = b"\x01\x00\x00\xff\xff" + b"\x00" * 8


@dataclass(frozen=True)
class Footer:
    """Where the TOC is: `toc_offset` and `toc_length` are blob offsets and sizes of
    the (compressed) TOC; `payload_end` is where the entries' members end."""

    compression: Compression
    toc_offset: int
    toc_length: int
    payload_end: int
    footer_size: int
    toc_uncompressed_size: int | None = None


def gzip_footer(toc_offset: int) -> bytes:
    subfield = b"%016x" % toc_offset + _STARGZ_MAGIC
    extra = b"SG" + struct.pack("<H", len(subfield)) + subfield
    header = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra))
    footer = header + extra + _EMPTY_GZIP_BODY
    assert len(footer) == GZIP_FOOTER_SIZE
    return footer


def zstd_footer(toc_offset: int, toc_compressed: int, toc_uncompressed: int) -> bytes:
    """The whole trailing skippable frame: 8-byte frame header plus the 40-byte footer."""
    body = struct.pack(
        "<QQQQ", toc_offset, toc_compressed, toc_uncompressed, ZSTD_MANIFEST_TYPE_CRFS
    ) + ZSTD_CHUNKED_MAGIC
    return SKIPPABLE_FRAME_MAGIC + struct.pack("<I", len(body)) + body


def skippable_frame_header(payload_size: int) -> bytes:
    return SKIPPABLE_FRAME_MAGIC + struct.pack("<I", payload_size)


def skippable_frame(payload: bytes) -> bytes:
    return skippable_frame_header(len(payload)) + payload


def _parse_toc_offset_field(field: bytes) -> int:
    hex_part = field[:16]
    if len(field) != 22 or field[16:] != _STARGZ_MAGIC:
        raise FooterError("gzip footer lacks the STARGZ magic")
    try:
        text = hex_part.decode("ascii")
        if text.strip() != text or text.startswith(("+", "-")):
            raise ValueError(text)
        return int(text, 16)
    except ValueError:
        raise FooterError(f"gzip footer has a malformed TOC offset {hex_part!r}") from None


def _parse_gzip(tail: bytes, blob_size: int) -> Footer | None:
    if len(tail) >= GZIP_FOOTER_SIZE:
        f = tail[-GZIP_FOOTER_SIZE:]
        if (
            f[:4] == b"\x1f\x8b\x08\x04"
            and f[10:12] == b"\x1a\x00"
            and f[12:14] == b"SG"
            and f[14:16] == b"\x16\x00"
            and f[38:] == _EMPTY_GZIP_BODY
        ):
            off = _parse_toc_offset_field(f[16:38])
            return _gzip_footer(off, blob_size, GZIP_FOOTER_SIZE)
    if len(tail) >= LEGACY_GZIP_FOOTER_SIZE:
        f = tail[-LEGACY_GZIP_FOOTER_SIZE:]
        if (
            f[:4] == b"\x1f\x8b\x08\x04"
            and f[10:12] == b"\x16\x00"
            and f[34:] == _EMPTY_GZIP_BODY
        ):
            off = _parse_toc_offset_field(f[12:34])
            return _gzip_footer(off, blob_size, LEGACY_GZIP_FOOTER_SIZE)
    return None


def _gzip_footer(toc_offset: int, blob_size: int, footer_size: int) -> Footer:
    payload_end = blob_size - footer_size
    if not 0 <= toc_offset < payload_end:
        raise FooterError(
            f"footer puts the TOC at offset {toc_offset}, outside the blob of {blob_size} bytes"
        )
    return Footer(
        compression=Compression.GZIP,
        toc_offset=toc_offset,
        toc_length=payload_end - toc_offset,
        payload_end=toc_offset,
        footer_size=footer_size,
    )


def _parse_zstd(tail: bytes, blob_size: int) -> Footer | None:
    if len(tail) < ZSTD_FOOTER_SIZE or tail[-8:] != ZSTD_CHUNKED_MAGIC:
        return None
    off, compressed, uncompressed, kind = struct.unpack("<QQQQ", tail[-40:-8])
    if kind != ZSTD_MANIFEST_TYPE_CRFS:
        raise FooterError(f"zstd:chunked footer has unknown manifest type {kind}")
    # The TOC sits inside a skippable frame whose 8-byte header precedes `off`.
    footer_frame = ZSTD_FOOTER_SIZE + 8
    if not (off >= 8 and off + compressed <= blob_size - footer_frame):
        raise FooterError(
            f"zstd:chunked footer puts the TOC at {off}+{compressed}, "
            f"outside the blob of {blob_size} bytes"
        )
    return Footer(
        compression=Compression.ZSTD,
        toc_offset=off,
        toc_length=compressed,
        payload_end=off - 8,
        footer_size=ZSTD_FOOTER_SIZE,
        toc_uncompressed_size=uncompressed,
    )


def parse_footer(tail: bytes, blob_size: int) -> Footer:
    """Recognise the footer in `tail`, the last bytes of a blob of `blob_size` bytes
    (read at least `MAX_FOOTER_SIZE` of them, or the whole blob if smaller)."""
    if len(tail) > blob_size:
        raise ValueError("tail is longer than the blob")
    if len(tail) < ZSTD_FOOTER_SIZE:
        raise FooterError(f"blob of {blob_size} bytes is too small to hold a footer")
    for parse in (_parse_zstd, _parse_gzip):
        found = parse(tail, blob_size)
        if found is not None:
            return found
    raise FooterError("no eStargz or zstd:chunked footer at the end of the blob")
