"""Inflate a gzip stream once, reporting its bytes and resumable checkpoints.

`scan_gzip` walks every member of a (possibly multi-member) gzip stream with the
system zlib's `inflate(Z_BLOCK)`, which stops at each deflate block boundary. At a
boundary at least `spacing` bytes of output after the previous checkpoint it
yields a `Checkpoint`: where the next block starts, to the bit, and the 32 KiB of
output before it, which is all a decompressor needs to resume there. Each member
starts with a checkpoint of its own (an empty window), so a span between two
checkpoints never crosses a member's trailer. Headers are parsed here and each
member's CRC32 and length are checked: a corrupt layer is refused, never indexed.

Two optional extras serve hot checkpoints (gzindex/hotplan.py): `boundaries`
collects the uncompressed offset of every block boundary a checkpoint could sit
at, and `cuts` names boundaries that get a checkpoint whatever the spacing.
"""

import ctypes
import struct
import zlib
from array import array
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from .errors import CorruptLayerError
from .zlib_api import (
    DATA_TYPE_BITS,
    DATA_TYPE_BLOCK_END,
    DATA_TYPE_LAST_BLOCK,
    Z_BLOCK,
    Z_BUF_ERROR,
    Z_OK,
    Z_STREAM_END,
    RawInflater,
)

_READ = 1 << 20
_OUT = 256 << 10
_FTEXT, _FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 1, 2, 4, 8, 16
_FRESERVED = 0xE0


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A place where inflating can resume: `compressed` is the blob offset of the
    first byte that still holds unread bits, of which the low `skip_bits` were
    already read; `window` is the output before it (empty at a member's start)."""

    uncompressed: int
    compressed: int
    skip_bits: int
    window: bytes
    member_start: bool


@dataclass(frozen=True, slots=True)
class MemberEnd:
    """A member's deflate data ends before blob offset `compressed`."""

    compressed: int
    uncompressed: int


class _Input:
    """Sequential reads of the blob with an absolute position and a little lookahead."""

    def __init__(self, read: Callable[[int], bytes]):
        self._read = read
        self.buf = b""
        self.off = 0  # consumed bytes of buf
        self.base = 0  # blob offset of buf[0]
        self.eof = False

    @property
    def position(self) -> int:
        return self.base + self.off

    @property
    def available(self) -> int:
        return len(self.buf) - self.off

    def fill(self) -> bool:
        """Read more; False at the end of the blob."""
        if self.eof:
            return False
        data = self._read(_READ)
        if not data:
            self.eof = True
            return False
        self.base += self.off
        self.buf = self.buf[self.off:] + data
        self.off = 0
        return True

    def take(self, n: int, what: str) -> bytes:
        while self.available < n:
            if not self.fill():
                raise CorruptLayerError(f"gzip stream is truncated in {what} "
                                        f"at byte {self.position}")
        data = self.buf[self.off:self.off + n]
        self.off += n
        return data

    def take_zero_terminated(self, what: str) -> None:
        while True:
            end = self.buf.find(b"\0", self.off)
            if end >= 0:
                self.off = end + 1
                return
            self.off = len(self.buf)
            if not self.fill():
                raise CorruptLayerError(f"gzip stream is truncated in {what}")

    def at_end(self) -> bool:
        """True when nothing but zero padding is left (consumed, if so)."""
        while True:
            rest = self.buf[self.off:]
            if rest.strip(b"\0"):
                return False
            self.off = len(self.buf)
            if not self.fill():
                return True


def _read_header(source: _Input) -> None:
    start = source.position
    magic = source.take(2, "a member header")
    if magic != b"\x1f\x8b":
        raise CorruptLayerError(f"not gzip data at byte {start} (magic {magic.hex()})")
    head = source.take(8, "a member header")
    method, flags = head[0], head[1]
    if method != 8:
        raise CorruptLayerError(f"gzip member at byte {start} uses compression method "
                                f"{method}, not deflate")
    if flags & _FRESERVED:
        raise CorruptLayerError(f"gzip member at byte {start} sets reserved header flags")
    if flags & _FEXTRA:
        (length,) = struct.unpack("<H", source.take(2, "the header's extra field"))
        source.take(length, "the header's extra field")
    if flags & _FNAME:
        source.take_zero_terminated("the header's file name")
    if flags & _FCOMMENT:
        source.take_zero_terminated("the header's comment")
    if flags & _FHCRC:
        source.take(2, "the header's CRC")


def _inflate_member(source: _Input, inflater: RawInflater, uncompressed: int, spacing: int,
                    out: ctypes.Array[ctypes.c_char], cuts: Collection[int],
                    boundaries: "array[int] | None") -> Iterator[bytes | Checkpoint]:
    """Inflate one member's deflate data, yielding output and checkpoints; leaves the
    input at its trailer."""
    stream = inflater.stream
    out_address = ctypes.addressof(out)
    last_checkpoint = uncompressed
    keep: bytes = b""  # holds the object next_in points into
    while True:
        if source.available == 0 and not source.fill():
            raise CorruptLayerError(f"gzip stream is truncated at byte {source.position}")
        keep, offset = source.buf, source.off
        stream.next_in = ctypes.cast(ctypes.c_char_p(keep), ctypes.c_void_p).value + offset
        stream.avail_in = len(keep) - offset
        while True:
            stream.next_out = out_address
            stream.avail_out = _OUT
            ret = inflater.inflate(Z_BLOCK)
            source.off = len(keep) - stream.avail_in
            produced = _OUT - stream.avail_out
            if produced:
                uncompressed += produced
                yield ctypes.string_at(out_address, produced)
            if ret == Z_STREAM_END:
                return
            if ret not in (Z_OK, Z_BUF_ERROR):
                raise CorruptLayerError(f"corrupt deflate data near byte {source.position}: "
                                        f"{inflater.message}")
            data_type = stream.data_type
            at_boundary = data_type & DATA_TYPE_BLOCK_END and not data_type & DATA_TYPE_LAST_BLOCK
            if at_boundary and boundaries is not None:
                boundaries.append(uncompressed)
            if at_boundary and (uncompressed - last_checkpoint >= spacing or (
                    uncompressed > last_checkpoint and uncompressed in cuts)):
                bits = data_type & DATA_TYPE_BITS
                position = source.position
                yield Checkpoint(uncompressed=uncompressed,
                                 compressed=position - 1 if bits else position,
                                 skip_bits=8 - bits if bits else 0,
                                 window=inflater.window(), member_start=False)
                last_checkpoint = uncompressed
            if stream.avail_in == 0 and stream.avail_out:
                break  # all input taken and no output held back: read more
            if ret == Z_BUF_ERROR and produced == 0:  # no progress with input left
                raise CorruptLayerError(f"corrupt deflate data near byte {source.position}")


def scan_gzip(read: Callable[[int], bytes], spacing: int, *, cuts: Collection[int] = (),
              boundaries: "array[int] | None" = None) -> Iterator[bytes | Checkpoint | MemberEnd]:
    """Output, checkpoints and member ends of the gzip stream that `read(n)` returns
    piece by piece; a checkpoint also at each boundary in `cuts` (a set, for speed),
    and every boundary's offset appended to `boundaries` if given. Raises
    `CorruptLayerError` for anything that is not valid gzip; zero bytes after the
    last member are allowed, as gzip allows them."""
    if spacing <= 0:
        raise ValueError("spacing must be positive")
    source = _Input(read)
    inflater = RawInflater()
    out = ctypes.create_string_buffer(_OUT)
    uncompressed = 0
    try:
        if source.at_end():
            raise CorruptLayerError("the layer is empty: no gzip member")
        while True:
            _read_header(source)
            inflater.reset()
            yield Checkpoint(uncompressed=uncompressed, compressed=source.position, skip_bits=0,
                             window=b"", member_start=True)
            crc, size = 0, 0
            for item in _inflate_member(source, inflater, uncompressed, spacing, out,
                                        cuts, boundaries):
                if isinstance(item, bytes):
                    crc = zlib.crc32(item, crc)
                    size += len(item)
                yield item
            uncompressed += size
            yield MemberEnd(compressed=source.position, uncompressed=uncompressed)
            expected_crc, expected_size = struct.unpack("<II", source.take(8, "a trailer"))
            if crc != expected_crc:
                raise CorruptLayerError(f"gzip member ending at byte {source.position} fails "
                                        f"its CRC32 ({crc:08x}, trailer says {expected_crc:08x})")
            if size & 0xFFFFFFFF != expected_size:
                raise CorruptLayerError(f"gzip member ending at byte {source.position} has "
                                        f"{size} bytes, its trailer says {expected_size} "
                                        "(mod 2^32)")
            if source.at_end():
                return
    finally:
        inflater.close()
