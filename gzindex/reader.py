"""Open an index blob and read verified bytes of the layer it indexes.

`GzipIndex` holds the header and the span records (SPAN.size bytes per span) in
memory and reads the file table, the hot list and windows from the index file
when asked, so a layer of any size costs little memory. Reading layer bytes takes
a function that fetches a byte range of the gzip blob (a local file, an HTTP
range request): `LayerReader` fetches a span's compressed bytes, inflates the
whole span from its checkpoint, and returns bytes only once the span hashes to
the digest in the index. An asyncio caller fetches `Span.compressed_range` itself
and hands the bytes to `decode_span` (in a thread).
"""

import bisect
import ctypes
import hashlib
import io
import json
import os
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from .entries import FileEntry, entry_from_line, iter_lines
from .errors import IndexFormatError, SpanDigestMismatch
from .format import (
    MAX_SPAN_OVERSHOOT,
    MAX_WINDOW,
    SPAN,
    Header,
    header_length,
    parse_header,
    preamble_size,
)
from .zlib_api import Z_BUF_ERROR, Z_OK, Z_STREAM_END, RawInflater

_READ = 1 << 20
MAX_HOT_LIST = 64 << 20

Fetch = Callable[[int, int], bytes]  # (offset, length) of the gzip blob -> bytes


@dataclass(frozen=True, slots=True)
class Span:
    """Uncompressed bytes `uncompressed_offset .. uncompressed_end` of the layer, which
    inflate from the blob's bytes `compressed_offset .. compressed_end`, skipping
    the low `skip_bits` of the first, with the window found at `window_offset`."""

    index: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed_offset: int
    compressed_end: int
    skip_bits: int
    window_offset: int
    window_size: int
    digest: bytes

    @property
    def uncompressed_end(self) -> int:
        return self.uncompressed_offset + self.uncompressed_size

    @property
    def compressed_range(self) -> tuple[int, int]:
        """(offset, length) of the blob bytes this span inflates from."""
        return self.compressed_offset, self.compressed_end - self.compressed_offset


class GzipIndex:
    """A parsed, checked index blob. Thread-safe: reads use pread."""

    def __init__(self, file: BinaryIO, owned: bool):
        self._file = file
        self._owned = owned
        self._fd: int | None
        try:
            self._fd = file.fileno()
        except (OSError, AttributeError, io.UnsupportedOperation):
            self._fd = None
        self._lock = threading.Lock()
        self.size = file.seek(0, os.SEEK_END)
        preamble = self._read(0, preamble_size())
        length = header_length(preamble)
        text = self._read(preamble_size(), length)
        if len(text) != length:
            raise IndexFormatError("index is truncated inside its header")
        self.header: Header = parse_header(text, self.size)
        self._check_sections()
        spans = self.header.sections["spans"]
        self._spans = self._read(spans.offset, spans.length)
        self._starts = array("Q")
        self._check_spans()

    @classmethod
    def open(cls, source: "str | os.PathLike[str] | BinaryIO | bytes") -> "GzipIndex":
        """Open an index from a path, a binary file (kept open) or bytes."""
        if isinstance(source, bytes | bytearray):
            return cls(io.BytesIO(bytes(source)), True)
        if isinstance(source, str | os.PathLike):
            file = open(source, "rb")  # noqa: SIM115 (closed in close())
            try:
                return cls(file, True)
            except BaseException:
                file.close()
                raise
        return cls(source, False)

    # -- the blob ---------------------------------------------------------------------

    def _read(self, offset: int, length: int) -> bytes:
        if self._fd is not None:
            return os.pread(self._fd, length, offset)
        with self._lock:
            self._file.seek(offset)
            return self._file.read(length)

    def _section_pieces(self, name: str) -> Iterator[bytes]:
        section = self.header.sections[name]
        end = section.offset + section.length
        for offset in range(section.offset, end, _READ):
            piece = self._read(offset, min(_READ, end - offset))
            if not piece:
                raise IndexFormatError("index is truncated")
            yield piece

    def _check_sections(self) -> None:
        """The spans, files and hot sections against the digests in the header."""
        for name in ("spans", "files", "hot"):
            digest = hashlib.sha256()
            for piece in self._section_pieces(name):
                digest.update(piece)
            if "sha256:" + digest.hexdigest() != self.header.sections[name].digest:
                raise IndexFormatError(f"index {name} section does not match its digest")

    def _check_spans(self) -> None:
        header = self.header
        windows = header.sections["windows"].length
        expected = 0
        for number in range(header.sections["spans"].count):
            span = self.span(number)
            if span.uncompressed_offset != expected or span.uncompressed_size == 0:
                raise IndexFormatError(f"index span {number} does not follow the one before")
            if span.uncompressed_size > header.spacing + MAX_SPAN_OVERSHOOT:
                raise IndexFormatError(f"index span {number} of {span.uncompressed_size} bytes "
                                       f"is too large for its spacing")
            if not span.compressed_offset < span.compressed_end <= header.layer_size \
                    or span.skip_bits > 7:
                raise IndexFormatError(f"index span {number} lies outside the layer")
            if span.window_offset + span.window_size > windows:
                raise IndexFormatError(f"index span {number} has its window outside the index")
            self._starts.append(span.uncompressed_offset)
            expected = span.uncompressed_end
        if expected != header.uncompressed_size:
            raise IndexFormatError(f"index spans cover {expected} bytes, the layer has "
                                   f"{header.uncompressed_size}")

    # -- what it describes ------------------------------------------------------------

    @property
    def layer_digest(self) -> str:
        return self.header.layer_digest

    @property
    def uncompressed_size(self) -> int:
        return self.header.uncompressed_size

    @property
    def span_count(self) -> int:
        return len(self._starts)

    def span(self, number: int) -> Span:
        fields = SPAN.unpack_from(self._spans, number * SPAN.size)
        (u_start, c_start, c_end, u_size, window_size, skip, window_offset, digest) = fields
        return Span(number, u_start, u_size, c_start, c_end, skip, window_offset, window_size,
                    digest)

    def spans(self) -> Iterator[Span]:
        for number in range(self.span_count):
            yield self.span(number)

    def span_at(self, offset: int) -> Span:
        """The span holding uncompressed byte `offset`."""
        if not 0 <= offset < self.uncompressed_size:
            raise ValueError(f"offset {offset} is outside the layer's "
                             f"{self.uncompressed_size} bytes")
        return self.span(bisect.bisect_right(self._starts, offset) - 1)

    def spans_for(self, start: int, end: int) -> range:
        """Numbers of the spans holding uncompressed bytes [start, end)."""
        if not 0 <= start <= end <= self.uncompressed_size:
            raise ValueError(f"range {start}..{end} is outside the layer's "
                             f"{self.uncompressed_size} bytes")
        if start == end:
            return range(0)
        first = bisect.bisect_right(self._starts, start) - 1
        last = bisect.bisect_left(self._starts, end) - 1
        return range(first, last + 1)

    def window(self, span: Span) -> bytes:
        if not span.window_size:
            return b""
        base = self.header.sections["windows"].offset
        data = self._read(base + span.window_offset, span.window_size)
        try:
            window = _bounded_zstd(data, MAX_WINDOW)
        except (zstandard.ZstdError, ValueError) as exc:
            raise SpanDigestMismatch(f"window of span {span.index} is corrupt: {exc}") from None
        return window

    def entries(self) -> Iterator[FileEntry]:
        """The file table in tar order, decoded as it is read."""
        compressed = io.BufferedReader(_PieceStream(self._section_pieces("files")))  # type: ignore[arg-type]
        reader = zstandard.ZstdDecompressor().stream_reader(compressed)
        count = 0
        try:
            for line in iter_lines(reader):
                yield entry_from_line(count, line, self.uncompressed_size)
                count += 1
        except zstandard.ZstdError as exc:
            raise IndexFormatError(f"index file table is corrupt: {exc}") from None
        if count != self.header.sections["files"].count:
            raise IndexFormatError(f"index file table has {count} entries, its header says "
                                   f"{self.header.sections['files'].count}")

    def hot_files(self) -> list[str]:
        """Paths to prefetch first, in priority order."""
        data = b"".join(self._section_pieces("hot"))
        try:
            paths = json.loads(_bounded_zstd(data, MAX_HOT_LIST))
        except (zstandard.ZstdError, ValueError):
            raise IndexFormatError("index hot list is corrupt") from None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise IndexFormatError("index hot list is not a list of paths")
        return paths

    def find(self, path: str) -> FileEntry | None:
        """The entry extraction would leave at `path` (a scan of the whole table)."""
        found = None
        for entry in self.entries():
            if entry.name == path:
                found = entry
        return found

    def close(self) -> None:
        if self._owned:
            self._file.close()

    def __enter__(self) -> "GzipIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bounded_zstd(data: bytes, limit: int) -> bytes:
    """Decompress a zstd frame of at most `limit` bytes, whatever its header claims."""
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
        out = reader.read(limit + 1)
    if len(out) > limit:
        raise ValueError(f"it holds more than {limit} bytes")
    return out


class _PieceStream(io.RawIOBase):
    """A readable stream over an iterator of byte pieces."""

    def __init__(self, pieces: Iterator[bytes]):
        self._pieces = pieces
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "memoryview | bytearray") -> int:  # type: ignore[override]
        while not self._rest:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._rest = piece
        size = min(len(buffer), len(self._rest))
        buffer[:size] = self._rest[:size]
        self._rest = self._rest[size:]
        return size


def inflate_span(span: Span, window: bytes, compressed: bytes) -> tuple[bytes, str | None]:
    """Inflate a span from its checkpoint (`window`, the bits to skip) without
    verifying it: the bytes produced, and zlib's complaint if it stopped on an error.
    Callers that serve bytes use `decode_span`, which checks size and digest."""
    inflater = RawInflater()
    try:
        data = compressed
        if span.skip_bits:
            inflater.prime(8 - span.skip_bits, compressed[0] >> span.skip_bits)
            data = compressed[1:]
        inflater.set_window(window)
        out = ctypes.create_string_buffer(span.uncompressed_size)
        stream = inflater.stream
        stream.next_in = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
        stream.avail_in = len(data)
        stream.next_out = ctypes.addressof(out)
        stream.avail_out = span.uncompressed_size
        ret = inflater.inflate(0)
        error = None if ret in (Z_OK, Z_STREAM_END, Z_BUF_ERROR) else inflater.message
        produced = span.uncompressed_size - stream.avail_out
    finally:
        inflater.close()
    return ctypes.string_at(out, produced), error


def decode_span(index: GzipIndex, span: Span, compressed: bytes) -> bytes:
    """The span's uncompressed bytes, inflated from `compressed` (the blob's bytes at
    `span.compressed_range`) and verified against the span's digest."""
    where = f"span {span.index} of layer {index.layer_digest}"
    if len(compressed) != span.compressed_end - span.compressed_offset:
        raise SpanDigestMismatch(f"{where}: got {len(compressed)} compressed bytes, "
                                 f"expected {span.compressed_end - span.compressed_offset}")
    result, error = inflate_span(span, index.window(span), compressed)
    if error is not None:
        raise SpanDigestMismatch(f"{where} does not inflate: {error}")
    if len(result) != span.uncompressed_size:
        raise SpanDigestMismatch(f"{where} inflates to {len(result)} bytes, not "
                                 f"{span.uncompressed_size}")
    if hashlib.sha256(result).digest() != span.digest:
        raise SpanDigestMismatch(f"{where} does not match its digest")
    return result


class LayerReader:
    """Verified random access to the uncompressed layer through `fetch(offset, length)`
    of the gzip blob. Keeps the last `cache_spans` decoded spans (memory: that many
    times the index's spacing)."""

    def __init__(self, index: GzipIndex, fetch: Fetch, cache_spans: int = 2):
        self.index = index
        self._fetch = fetch
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_spans = cache_spans
        self._lock = threading.Lock()

    def read_span(self, span: Span) -> bytes:
        with self._lock:
            cached = self._cache.get(span.index)
            if cached is not None:
                self._cache.move_to_end(span.index)
                return cached
        offset, length = span.compressed_range
        data = decode_span(self.index, span, self._fetch(offset, length))
        if self._cache_spans:
            with self._lock:
                self._cache[span.index] = data
                while len(self._cache) > self._cache_spans:
                    self._cache.popitem(last=False)
        return data

    def iter_range(self, start: int, end: int) -> Iterator[bytes]:
        """Uncompressed bytes [start, end) of the layer, a span's worth at a time."""
        for number in self.index.spans_for(start, end):
            span = self.index.span(number)
            data = self.read_span(span)
            lo = max(start, span.uncompressed_offset) - span.uncompressed_offset
            hi = min(end, span.uncompressed_end) - span.uncompressed_offset
            yield data[lo:hi]

    def read(self, start: int, end: int) -> bytes:
        return b"".join(self.iter_range(start, end))

    def read_file(self, entry: FileEntry, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of a regular file's content, from `offset`, `length` at most."""
        if entry.type != "reg":
            raise ValueError(f"{entry.name!r} is a {entry.type}, not a regular file")
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        first = entry.offset + min(offset, entry.size)
        last = entry.end if length is None else min(entry.end, first + length)
        return self.read(first, last)


def file_fetcher(blob: BinaryIO) -> Fetch:
    """A `Fetch` over a local copy of the gzip blob."""
    lock = threading.Lock()

    def fetch(offset: int, length: int) -> bytes:
        with lock:
            blob.seek(offset)
            data = blob.read(length)
        if len(data) != length:
            raise SpanDigestMismatch(f"blob has no {length} bytes at {offset}: it is truncated")
        return data

    return fetch
