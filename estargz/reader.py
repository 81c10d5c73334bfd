"""Open a blob through any random-access source and read verified file bytes.

The parsing steps are plain functions over bytes (`parse_footer`, `load_toc`,
`decode_chunk`), so an asyncio caller can drive them with its own fetcher;
`BlobReader` wires them to a synchronous `read_at` source.
"""

import hashlib
import io
import os
import threading
from typing import BinaryIO, Protocol

from .codec import decompress_all, decompress_span
from .digests import sha256_digest
from .errors import DigestMismatch, FormatError, TOCError
from .footer import MAX_FOOTER_SIZE, Compression, Footer, parse_footer
from .layer import Chunk, Layer, Node
from .toc import DEFAULT_MAX_TOC_SIZE, TOC_TAR_NAME, parse_toc

_BLOCK = 512


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


def toc_json_from_member(compression: Compression, data: bytes, limit: int) -> bytes:
    """The TOC JSON held in the compressed TOC bytes that the footer points at."""
    if compression is Compression.ZSTD:
        return decompress_all(compression, data, limit)
    stream = decompress_all(compression, data, limit + 4 * _BLOCK)
    header = stream[:_BLOCK]
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
    if _BLOCK + size > len(stream):
        raise TOCError("TOC member is truncated")
    return stream[_BLOCK : _BLOCK + size]


def load_toc(
    footer: Footer,
    toc_bytes: bytes,
    expected_digest: str | None,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
) -> Layer:
    """Verify and index the TOC. `expected_digest` is the layer's toc.digest
    annotation; pass None only to inspect a blob that nothing vouches for."""
    if footer.toc_length > max_toc_size:
        raise TOCError(f"compressed TOC of {footer.toc_length} bytes exceeds the limit")
    if footer.toc_uncompressed_size is not None and footer.toc_uncompressed_size > max_toc_size:
        raise TOCError(f"TOC of {footer.toc_uncompressed_size} bytes exceeds the limit")
    try:
        toc_json = toc_json_from_member(footer.compression, toc_bytes, max_toc_size)
    except TOCError:
        raise
    except FormatError as exc:
        raise TOCError(f"cannot decompress the TOC: {exc}") from None
    digest = sha256_digest(toc_json)
    if expected_digest is not None and digest != expected_digest:
        raise DigestMismatch(f"TOC digest is {digest}, expected {expected_digest}")
    return Layer(parse_toc(toc_json), footer, digest)


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
        size = source.size
        tail_len = min(size, MAX_FOOTER_SIZE)
        footer = parse_footer(source.read_at(size - tail_len, tail_len), size)
        if footer.toc_length > max_toc_size:
            raise TOCError(f"compressed TOC of {footer.toc_length} bytes exceeds the limit")
        toc_bytes = source.read_at(footer.toc_offset, footer.toc_length)
        return cls(source, load_toc(footer, toc_bytes, toc_digest, max_toc_size))

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
