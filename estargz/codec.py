"""Compressing members and decompressing them again, for gzip and zstd.

Each member (a gzip member or a zstd frame) is compressed on its own, so members
can be produced in parallel threads: zlib and zstd release the GIL while they work.
"""

import functools
import mmap
import os
import struct
import sys
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import zstandard

from .errors import FormatError
from .footer import Compression

DEFAULT_LEVELS = {Compression.GZIP: 6, Compression.ZSTD: 3}
# mtime 0, no flags, OS "unknown", as the reference's Go writer emits.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"

_local = threading.local()
_FILE_PIECE = 1 << 20
_LARGE_BLOCK = 4 << 20


def gzip_member(payload: bytes | mmap.mmap, level: int) -> bytes:
    deflater = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflater.compress(payload) + deflater.flush()
    trailer = struct.pack("<II", zlib.crc32(payload), len(payload) & 0xFFFFFFFF)
    return _GZIP_HEADER + body + trailer


def zstd_frame(payload: bytes | mmap.mmap, level: int) -> bytes:
    # A ZstdCompressor must not be shared between threads; keep one per thread.
    cache: dict[int, zstandard.ZstdCompressor] = getattr(_local, "zstd", None) or {}
    _local.zstd = cache
    compressor = cache.get(level)
    if compressor is None:
        compressor = cache[level] = zstandard.ZstdCompressor(level=level)
    return compressor.compress(payload)


@functools.cache
def prime_allocator() -> None:
    """glibc hands the free top of a heap back to the kernel once it is larger than
    its trim threshold, which stays at 128 KiB until a larger block has been freed.
    Every gzip member allocates and frees about 260 KiB of deflate state, so in a
    process that never freed a large block each member of a layer of small files
    would take fresh zeroed pages, a third of the conversion's time. Freeing one
    large block raises the threshold, as converting any large file does anyway."""
    block = bytearray(_LARGE_BLOCK)
    del block


def compress_member(compression: Compression, payload: bytes | mmap.mmap, level: int) -> bytes:
    if compression is Compression.GZIP:
        return gzip_member(payload, level)
    return zstd_frame(payload, level)


def gzip_streams_exactly(level: int) -> bool:
    """Whether `gzip_stream` gives `gzip_member`'s bytes at this level. Deflate's
    output does not depend on how its input is cut, except for stored blocks
    (level 0), which end where an output buffer ended."""
    return level != 0


def gzip_stream(pieces: Iterable[bytes], level: int) -> Iterator[bytes]:
    """The gzip member of the pieces' concatenation, given out as the pieces come in;
    see `gzip_streams_exactly`."""
    yield _GZIP_HEADER
    deflater = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    crc = size = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
        size += len(piece)
        out = deflater.compress(piece)
        if out:
            yield out
    yield deflater.flush() + struct.pack("<II", crc, size & 0xFFFFFFFF)


def zstd_stream(pieces: Iterable[bytes], size: int, level: int) -> Iterator[bytes]:
    """One zstd frame of the pieces' concatenation, `size` bytes in all, given out as
    the pieces come in. Its header records the content size, as a frame from
    `zstd_frame` does (readers that decompress a frame in one call need it); for an
    input larger than zstd's window its bytes differ from that frame's."""
    compressor = zstandard.ZstdCompressor(level=level).compressobj(size=size)
    for piece in pieces:
        out = compressor.compress(piece)
        if out:
            yield out
    yield compressor.flush()


# A zstd frame of up to this much input is made in one call over the mapped file:
# the bytes `zstd_frame` gives, which a frame made as a stream does not match. The
# mapping's pages count in the process's memory, so larger inputs (the TOC of many
# files, a member holding a long run of headers) are compressed as a stream.
_ZSTD_ONE_CALL_MAX = 16 << 20


def compress_file(compression: Compression, file: BinaryIO, level: int) -> Iterator[bytes]:
    """A member holding the file's whole content, compressed as a stream where that
    gives `compress_member`'s bytes. Where it does not (deflate's stored blocks, at
    gzip level 0, end where an output buffer ended; zstd's streaming compressor works
    through its input a window at a time) the file is mapped and compressed in one
    call, which takes page cache rather than heap for the input; but a zstd input
    beyond `_ZSTD_ONE_CALL_MAX` is a `zstd_stream` frame."""
    file.flush()
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    pieces = iter(lambda: file.read(_FILE_PIECE), b"")
    if compression is Compression.ZSTD and size > _ZSTD_ONE_CALL_MAX:
        yield from zstd_stream(pieces, size, level)
    elif compression is Compression.GZIP and gzip_streams_exactly(level):
        yield from gzip_stream(pieces, level)
    elif size == 0:
        yield compress_member(compression, b"", level)
    else:
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield compress_member(compression, mapped, level)


# zstd's decompressobj has no output bound, so untrusted frames are fed in small
# pieces and the output checked after each (a piece expands to a few MiB at most).
_ZSTD_FEED = 256


# A frame that holds a file's bytes also holds the tar padding after them and the
# next entries' headers: a frame whose header says it holds at most this much beyond
# what is asked of it is decompressed whole, in one call.
_ZSTD_WHOLE_SLACK = 64 << 10


def _frame_holds(data: bytes, size: int) -> bool:
    """Whether the zstd frame at the start of `data` says it holds `size` bytes, and
    at most _ZSTD_WHOLE_SLACK more."""
    return size <= zstandard.frame_content_size(data) <= size + _ZSTD_WHOLE_SLACK


_one_call = threading.local()  # a zstd decompressor per thread, for _whole_frame


def _whole_frame(data: bytes) -> bytes:
    """The zstd frame at the start of `data`, decompressed in one call: about 2.5
    times as fast as feeding it in pieces. Its header says how large it is (the
    caller checked), and a one-call decompression writes into a buffer of that size,
    so its output is bounded; a frame whose content is not that size fails. The
    thread's decompressor is kept: making one costs 13 µs, a small chunk's whole
    decompression a few (a one-call decompress keeps no state between calls)."""
    decompressor = getattr(_one_call, "zstd", None)
    if decompressor is None:
        decompressor = _one_call.zstd = zstandard.ZstdDecompressor()
    return decompressor.decompress(data)


def _inflate_member(compression: Compression, data: bytes, limit: int) -> tuple[bytes, bytes]:
    """Decompress the one member at the start of `data`, stopping once `limit` bytes
    are out. Returns (output, input left after the member, or b"" if stopped early)."""
    if compression is Compression.GZIP:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        # zlib takes a C ssize_t; a TOC's innerOffset can ask for more than that.
        out = d.decompress(data, min(limit, sys.maxsize))
        if d.eof:
            return out, d.unused_data
        if len(out) >= limit:
            return out, b""
        raise FormatError("compressed member is truncated")
    z = zstandard.ZstdDecompressor().decompressobj()
    pieces: list[bytes] = []
    produced = 0
    for start in range(0, len(data), _ZSTD_FEED):
        piece = z.decompress(data[start : start + _ZSTD_FEED])
        pieces.append(piece)
        produced += len(piece)
        if z.eof:
            return b"".join(pieces), z.unused_data + data[start + _ZSTD_FEED :]
        if produced >= limit:
            return b"".join(pieces), b""
    raise FormatError("compressed frame is truncated")


def decompress_span(compression: Compression, data: bytes, skip: int, length: int) -> bytes:
    """Bytes `skip .. skip+length` of the decompressed concatenation of the members
    that start at `data[0]`. Decompresses little more than needed; raises
    `FormatError` when the members are corrupt or end too early."""
    want = skip + length
    out = bytearray()
    rest = data
    try:
        if compression is Compression.ZSTD and want and _frame_holds(data, want):
            return _whole_frame(data)[skip:want]
        while len(out) < want:
            if not rest:
                raise FormatError(
                    f"compressed data ends after {len(out)} of {want} decompressed bytes"
                )
            piece, rest = _inflate_member(compression, rest, want - len(out))
            out += piece
    except (zlib.error, zstandard.ZstdError) as exc:
        raise FormatError(f"corrupt compressed data: {exc}") from None
    return bytes(out[skip:want])


def decompress_all(compression: Compression, data: bytes, limit: int) -> bytes:
    """Decompress every member in `data`, refusing output beyond `limit` bytes."""
    out = bytearray()
    rest = data
    try:
        while rest:
            piece, rest = _inflate_member(compression, rest, limit + 1 - len(out))
            out += piece
            if len(out) > limit:
                raise FormatError(f"decompresses to more than {limit} bytes")
    except (zlib.error, zstandard.ZstdError) as exc:
        raise FormatError(f"corrupt compressed data: {exc}") from None
    return bytes(out)


def inflate_stream(compression: Compression, read: Callable[[int], bytes], limit: int,
                   piece: int = 1 << 20) -> Iterator[bytes]:
    """Decompress every member of the stream `read(n)` returns, in pieces of at most
    `piece` bytes, refusing output beyond `limit` bytes."""
    produced = 0
    pending = b""
    try:
        while True:
            if not pending:
                pending = read(piece)
                if not pending:
                    return
            if compression is Compression.GZIP:
                inflater: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                inflater = zstandard.ZstdDecompressor().decompressobj()
            while True:
                if compression is Compression.GZIP:
                    out = inflater.decompress(pending, piece)
                    pending = inflater.unconsumed_tail
                else:  # no output bound: feed small pieces (see _ZSTD_FEED)
                    out = inflater.decompress(pending[:_ZSTD_FEED])
                    pending = pending[_ZSTD_FEED:]
                produced += len(out)
                if produced > limit:
                    raise FormatError(f"decompresses to more than {limit} bytes")
                if out:
                    yield out
                if inflater.eof:
                    pending = inflater.unused_data + pending
                    break
                if not pending:
                    pending = read(piece)
                    if not pending:
                        raise FormatError("compressed member is truncated")
    except (zlib.error, zstandard.ZstdError) as exc:
        raise FormatError(f"corrupt compressed data: {exc}") from None
