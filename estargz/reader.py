"""Open a blob through any random-access source and read verified file bytes.

The parsing steps are plain functions over bytes (`parse_footer`, `load_toc`,
`decode_chunk`), so an asyncio caller can drive them with its own fetcher;
`BlobReader` wires them to a synchronous `read_at` source.
"""

import hashlib
import io
import itertools
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol

from .codec import decompress_span, inflate_stream
from .errors import DigestMismatch, FormatError, TOCError
from .footer import MAX_FOOTER_SIZE, Compression, Footer, parse_footer
from .layer import Chunk, Layer, Node
from .toc import DEFAULT_MAX_TOC_SIZE, TOC_TAR_NAME, TOCEntry, iter_toc_entries

_BLOCK = 512


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class BlobSource(Protocol):
    """Random access to a blob: a local file, or later an HTTP range fetcher."""

    @property
    def size(self) -> int: ...

    def read_at(self, offset: int, length: int) -> bytes: ...


class FileSource:
    """A `BlobSource` over a local file or any seekable binary file object."""

    def __init__(self, file: BinaryIO):
        self._file = file
        self.size = file.seek(0, os.SEEK_END)
        try:
            self._fd: int | None = file.fileno()
        except (OSError, AttributeError, io.UnsupportedOperation):
            self._fd = None  # in-memory: seek and read, under a lock
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str) -> "FileSource":
        return cls(open(path, "rb"))

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError(
                f"read of {length} bytes at {offset} is outside the blob of {self.size} bytes"
            )
        if self._fd is not None:
            return os.pread(self._fd, length, offset)
        with self._lock:
            self._file.seek(offset)
            return self._file.read(length)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _toc_json_pieces(compression: Compression, read: Callable[[int], bytes],
                     limit: int) -> Iterator[bytes]:
    """The TOC JSON held in the compressed TOC bytes that the footer points at, in
    pieces: for gzip it is the content of the tar entry the member holds."""
    if compression is Compression.ZSTD:
        yield from inflate_stream(compression, read, limit)
        return
    pieces = inflate_stream(compression, read, limit + 4 * _BLOCK)
    head = b""
    for piece in pieces:
        head += piece
        if len(head) >= _BLOCK:
            break
    header, rest = head[:_BLOCK], head[_BLOCK:]
    if len(header) < _BLOCK:
        raise TOCError("TOC member is too short to hold a tar header")
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if name != TOC_TAR_NAME:
        raise TOCError(f"TOC tar entry is named {name!r}, expected {TOC_TAR_NAME!r}")
    try:
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise TOCError("TOC tar header has a malformed size") from None
    if size > limit:
        raise TOCError(f"TOC of {size} bytes exceeds the limit of {limit}")
    left = size
    for piece in itertools.chain([rest], pieces):
        if piece[:left]:
            yield piece[:left]
        left -= min(left, len(piece))
        if not left:
            break
    if left:
        raise TOCError("TOC member is truncated")
    for _ in pieces:  # the rest of the member must still decompress
        pass


def spool_toc_json(footer: Footer, toc: bytes | Readable, limit: int, out: BinaryIO) -> str:
    """Decompress the TOC (the bytes at the footer's toc_offset, or a file holding
    them) into `out`; returns the digest of the JSON."""
    read = io.BytesIO(toc).read if isinstance(toc, bytes | bytearray) else toc.read
    hasher = hashlib.sha256()
    try:
        for piece in _toc_json_pieces(footer.compression, read, limit):
            hasher.update(piece)
            out.write(piece)
    except TOCError:
        raise
    except FormatError as exc:
        raise TOCError(f"cannot decompress the TOC: {exc}") from None
    return "sha256:" + hasher.hexdigest()


def load_toc(
    footer: Footer,
    toc: bytes | Readable,
    expected_digest: str | None,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
    *,
    index_path: str | None = None,
) -> Layer:
    """Verify and index the TOC (the compressed bytes the footer points at, or a file
    holding them). `expected_digest` is the layer's toc.digest annotation; pass None
    only to inspect a blob that nothing vouches for. The JSON is spooled to a
    temporary file, checked against the digest and only then parsed, as a stream,
    into the layer's index (at `index_path` to keep it, else a temporary one)."""
    if footer.toc_length > max_toc_size:
        raise TOCError(f"compressed TOC of {footer.toc_length} bytes exceeds the limit")
    if footer.toc_uncompressed_size is not None and footer.toc_uncompressed_size > max_toc_size:
        raise TOCError(f"TOC of {footer.toc_uncompressed_size} bytes exceeds the limit")
    spool_dir = os.path.dirname(index_path) if index_path else None
    with tempfile.TemporaryFile(dir=spool_dir) as spooled:
        digest = spool_toc_json(footer, toc, max_toc_size, spooled)
        if expected_digest is not None and digest != expected_digest:
            raise DigestMismatch(f"TOC digest is {digest}, expected {expected_digest}")
        spooled.seek(0)
        return Layer.build(iter_toc_entries(spooled), footer, digest, index_path=index_path)


def iter_blob_toc(source: "BlobSource", footer: Footer,
                  max_toc_size: int = DEFAULT_MAX_TOC_SIZE) -> Iterator[TOCEntry]:
    """The entries of a blob's TOC, read again from the blob as a stream (for a
    full check, which walks them in order beside the tar stream)."""
    with tempfile.TemporaryFile() as spooled:
        spool_toc_json(footer, _SourceReader(source, footer.toc_offset, footer.toc_length),
                       max_toc_size, spooled)
        spooled.seek(0)
        yield from iter_toc_entries(spooled)


class _SourceReader:
    """`read(n)` over `length` bytes of a BlobSource from `offset`."""

    def __init__(self, source: "BlobSource", offset: int, length: int):
        self._source, self._offset, self._left = source, offset, length

    def read(self, size: int = -1) -> bytes:
        size = self._left if size < 0 else min(size, self._left)
        data = self._source.read_at(self._offset, size) if size else b""
        self._offset += len(data)
        self._left -= len(data)
        return data


def decode_chunk(compression: Compression, chunk: Chunk, compressed: bytes) -> bytes:
    """Decompress one chunk from the bytes at `chunk.blob_offset .. blob_end` and
    check it against its digest. Never returns bytes that fail the check."""
    data = decompress_span(compression, compressed, chunk.inner_offset, chunk.size)
    if len(data) != chunk.size:
        raise FormatError(f"chunk decompressed to {len(data)} bytes, expected {chunk.size}")
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != chunk.digest:
        raise DigestMismatch(f"chunk digest is {actual}, expected {chunk.digest}")
    return data


def read_footer(source: "BlobSource") -> Footer:
    """The footer at the end of the blob in `source`."""
    size = source.size
    tail_len = min(size, MAX_FOOTER_SIZE)
    return parse_footer(source.read_at(size - tail_len, tail_len), size)


class BlobReader:
    """A verified, random-access view of one eStargz or zstd:chunked blob."""

    def __init__(self, source: BlobSource, layer: Layer):
        self.source = source
        self.layer = layer

    @classmethod
    def open(
        cls,
        source: BlobSource,
        toc_digest: str | None = None,
        max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
    ) -> "BlobReader":
        footer = read_footer(source)
        if footer.toc_length > max_toc_size:
            raise TOCError(f"compressed TOC of {footer.toc_length} bytes exceeds the limit")
        toc = _SourceReader(source, footer.toc_offset, footer.toc_length)
        return cls(source, load_toc(footer, toc, toc_digest, max_toc_size))

    def toc_entries(self) -> Iterator[TOCEntry]:
        """The TOC's entries in TOC order, read again from the blob."""
        return iter_blob_toc(self.source, self.layer.footer)

    @property
    def compression(self) -> Compression:
        return self.layer.footer.compression

    def lookup(self, path: str) -> Node | None:
        return self.layer.lookup(path)

    def read_chunk(self, chunk: Chunk) -> bytes:
        compressed = self.source.read_at(chunk.blob_offset, chunk.compressed_size)
        return decode_chunk(self.compression, chunk, compressed)

    def read_file(self, node: Node, offset: int = 0, length: int | None = None) -> bytes:
        if node.kind != "reg":
            raise FormatError(f"{node.path!r} is not a regular file")
        length = node.size - offset if length is None else length
        end = min(offset + length, node.size)
        out = bytearray()
        for chunk in self.layer.chunks_for_range(node, offset, end - offset):
            data = self.read_chunk(chunk)
            lo = max(offset - chunk.file_offset, 0)
            hi = min(end - chunk.file_offset, chunk.size)
            out += data[lo:hi]
        return bytes(out)

    def prefetch_region(self) -> tuple[int, int]:
        """Blob byte range that holds the prioritized files (empty when none)."""
        return 0, self.layer.prefetch_size
