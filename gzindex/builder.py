"""Build the index of a gzip layer in one pass over it.

The layer is read once: `scan_gzip` inflates it and marks checkpoints, the
uncompressed bytes are hashed per span and as a whole (the diff_id), and the same
bytes feed the streaming tar reader that lists the members. Windows and the file
table go to temporary files as they come; memory holds only the span records
(SPAN.size bytes per span) and one piece of output, whatever the layer's size.

`scan_layer` leaves the result open (`ScannedLayer`), so a caller can look at its
paths, for instance to decide the hot files of a whole image, before it writes
the final index with `ScannedLayer.write`. Once the hot files are known,
`rescan_for_hot_files` reads the layer a second time with extra checkpoints
around them (gzindex/hotplan.py), so a prefetch of the hot files fetches little
else; a layer without hot files is not read again.
"""

import hashlib
import io
import json
import os
import tempfile
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from estargz.tarindex import scan_tar_stream

from .entries import FileEntry, entry_from_line, iter_lines
from .errors import CorruptLayerError
from .format import (
    DEFAULT_SPACING,
    MAX_SPACING,
    MAX_SPAN_OVERSHOOT,
    MIN_SPACING,
    SPAN,
    Header,
    Section,
)
from .hotplan import DEFAULT_MERGE_GAP, hot_extents, merge_runs, plan_cuts
from .scan import Checkpoint, MemberEnd, scan_gzip

# Level 9 makes windows 5% larger than level 19 does, 7 times faster.
_WINDOW_LEVEL = 9
_TABLE_LEVEL = 10
_TABLE_BATCH = 512  # entries compressed at once
_COPY = 1 << 20
# Hot checkpoints may grow the index's spans, files and windows to this share of
# the layer, no further (the header and hot list stay well within 2%): past it the
# closest runs of hot bytes are merged (fewer windows) instead.
HOT_INDEX_SHARE = 0.019
_HOT_ATTEMPTS = 3


@dataclass(frozen=True)
class IndexResult:
    digest: str
    size: int
    span_count: int
    file_count: int
    hot_count: int
    layer_digest: str
    layer_size: int
    diff_id: str
    uncompressed_size: int


class _HashingReader:
    """Reads the layer and hashes it: the digest the index names is the one it read."""

    def __init__(self, blob: BinaryIO):
        self._blob = blob
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, size: int) -> bytes:
        data = self._blob.read(size)
        self.hash.update(data)
        self.size += len(data)
        return data


class _Spans:
    """Closes spans as checkpoints and member ends go by; writes their windows."""

    def __init__(self, windows: BinaryIO, spacing: int):
        self._limit = spacing + MAX_SPAN_OVERSHOOT
        self.records = bytearray()
        self.count = 0
        self._windows = windows
        self._window_end = 0
        self._compress = zstandard.ZstdCompressor(level=_WINDOW_LEVEL,
                                                   write_checksum=True)
        self._open: Checkpoint | None = None
        self._hash = hashlib.sha256()
        self._size = 0

    def data(self, piece: bytes) -> None:
        self._hash.update(piece)
        self._size += len(piece)
        if self._size > self._limit:
            raise CorruptLayerError(f"the layer has a deflate block that inflates to more "
                                    f"than {MAX_SPAN_OVERSHOOT >> 20} MiB: no checkpoint can "
                                    "bound the reads of that part of it")

    def checkpoint(self, point: Checkpoint) -> None:
        if not point.member_start:  # a member's start comes after its MemberEnd
            self._close(point.compressed + (1 if point.skip_bits else 0))
        self._open, self._hash, self._size = point, hashlib.sha256(), 0

    def member_end(self, end: MemberEnd) -> None:
        self._close(end.compressed)

    def _close(self, compressed_end: int) -> None:
        point, self._open = self._open, None
        if point is None or self._size == 0:
            return  # nothing inflates from there (an empty member, an empty last block)
        window = self._compress.compress(point.window) if point.window else b""
        self._windows.write(window)
        self.records += SPAN.pack(point.uncompressed, point.compressed, compressed_end,
                                  self._size, len(window), point.skip_bits, self._window_end,
                                  self._hash.digest())
        self._window_end += len(window)
        self.count += 1


class _Uncompressed:
    """The layer's uncompressed bytes as a stream, for the tar reader; reading it
    drives the inflation and the span bookkeeping."""

    def __init__(self, events: Iterator[bytes | Checkpoint | MemberEnd], spans: _Spans):
        self._events = events
        self._spans = spans
        self._piece = b""
        self._at = 0
        self.diff_id = hashlib.sha256()
        self.size = 0

    def _next_piece(self) -> bool:
        for event in self._events:
            if isinstance(event, bytes):
                self._spans.data(event)
                self.diff_id.update(event)
                self.size += len(event)
                self._piece, self._at = event, 0
                return True
            if isinstance(event, Checkpoint):
                self._spans.checkpoint(event)
            else:
                self._spans.member_end(event)
        return False

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(_COPY), b""))
        while self._at >= len(self._piece):
            if not self._next_piece():
                return b""
        out = self._piece[self._at:self._at + size]
        self._at += len(out)
        return out

    def drain(self) -> None:
        while self.read(_COPY):
            pass


class ScannedLayer:
    """A layer read through: its spans, windows and file table, not yet an index."""

    def __init__(self, spacing: int, tmpdir: str | None):
        self._windows = tempfile.TemporaryFile(dir=tmpdir)  # noqa: SIM115 (closed in close())
        self._files = tempfile.TemporaryFile(dir=tmpdir)  # noqa: SIM115
        self.spans = _Spans(self._windows, spacing)
        self.file_count = 0
        self.layer_digest = ""
        self.layer_size = 0
        self.diff_id = ""
        self.uncompressed_size = 0
        self.spacing = spacing
        # Uncompressed offsets of the block boundaries: 8 bytes each, not a list's 36.
        self.boundaries: array[int] = array("Q")
        self.hot_checkpoints = 0  # extra checkpoints asked for around hot files

    def section_sizes(self) -> tuple[int, int, int]:
        """Bytes of the spans, file table and windows sections so far."""
        return (len(self.spans.records), self._files.seek(0, os.SEEK_END),
                self._windows.seek(0, os.SEEK_END))

    def entries(self) -> Iterator[FileEntry]:
        """The file table as written (checked again as it is read back)."""
        self._files.seek(0)
        reader = zstandard.ZstdDecompressor().stream_reader(self._files, closefd=False)
        for number, line in enumerate(iter_lines(reader)):
            yield entry_from_line(number, line, self.uncompressed_size)

    def write(self, out: BinaryIO, hot_files: Iterable[str] = ()) -> IndexResult:
        """Write the index blob to `out` (at its current position)."""
        hot = list(dict.fromkeys(hot_files))
        hot_bytes = zstandard.ZstdCompressor(level=_TABLE_LEVEL).compress(
            json.dumps(hot, ensure_ascii=False).encode())
        spans = bytes(self.spans.records)
        files_size = self._files.seek(0, os.SEEK_END)
        windows_size = self._windows.seek(0, os.SEEK_END)
        sections: dict[str, Section] = {}
        sizes = {"spans": len(spans), "files": files_size, "hot": len(hot_bytes),
                 "windows": windows_size}
        digests = {"spans": _digest(io.BytesIO(spans)), "files": _digest(self._files),
                   "hot": _digest(io.BytesIO(hot_bytes))}
        counts = {"spans": self.spans.count, "files": self.file_count, "hot": len(hot)}
        header_size = 0
        while True:  # the offsets depend on the header's length, which holds them
            offset = header_size
            for name in ("spans", "files", "hot", "windows"):
                sections[name] = Section(offset, sizes[name], counts.get(name, 0),
                                         digests.get(name, ""))
                offset += sizes[name]
            header = Header(self.layer_digest, self.layer_size, self.diff_id,
                            self.uncompressed_size, self.spacing, dict(sections))
            if len(header.to_bytes()) == header_size:
                break
            header_size = len(header.to_bytes())
        digest = hashlib.sha256()
        written = 0

        def emit(data: bytes) -> None:
            nonlocal written
            out.write(data)
            digest.update(data)
            written += len(data)

        emit(header.to_bytes())
        emit(spans)
        _copy(self._files, emit)
        emit(hot_bytes)
        _copy(self._windows, emit)
        return IndexResult(digest="sha256:" + digest.hexdigest(), size=written,
                           span_count=self.spans.count, file_count=self.file_count,
                           hot_count=len(hot), layer_digest=self.layer_digest,
                           layer_size=self.layer_size, diff_id=self.diff_id,
                           uncompressed_size=self.uncompressed_size)

    def close(self) -> None:
        self._windows.close()
        self._files.close()

    def __enter__(self) -> "ScannedLayer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _digest(file: BinaryIO) -> str:
    file.seek(0)
    digest = hashlib.sha256()
    while piece := file.read(_COPY):
        digest.update(piece)
    return "sha256:" + digest.hexdigest()


def _copy(file: BinaryIO, emit: Callable[[bytes], None]) -> None:
    file.seek(0)
    while piece := file.read(_COPY):
        emit(piece)


def scan_layer(blob: BinaryIO, *, spacing: int = DEFAULT_SPACING,
               expected_digest: str | None = None, tmpdir: str | None = None,
               cuts: Collection[int] = ()) -> ScannedLayer:
    """Read the gzip layer in `blob` (from its current position to its end) once,
    with a checkpoint also at each block boundary in `cuts`.

    Raises `CorruptLayerError` for data that is not valid gzip, `estargz.TarError`
    for a tar that is not fit for a layer, and `CorruptLayerError` when the bytes
    read are not `expected_digest`."""
    if not MIN_SPACING <= spacing <= MAX_SPACING:
        raise ValueError(f"spacing must be between {MIN_SPACING} and {MAX_SPACING} bytes")
    layer = ScannedLayer(spacing, tmpdir)
    try:
        source = _HashingReader(blob)
        stream = _Uncompressed(scan_gzip(source.read, spacing, cuts=frozenset(cuts),
                                         boundaries=layer.boundaries), layer.spans)
        layer.hot_checkpoints = len(cuts)
        table = zstandard.ZstdCompressor(level=_TABLE_LEVEL).stream_writer(
            layer._files, closefd=False)
        lines: list[bytes] = []
        for member in scan_tar_stream(stream):  # type: ignore[arg-type]
            lines.append(FileEntry.from_member(member).to_line())
            layer.file_count += 1
            if len(lines) >= _TABLE_BATCH:
                table.write(b"".join(lines))
                lines.clear()
        table.write(b"".join(lines))
        table.flush(zstandard.FLUSH_FRAME)
        stream.drain()  # the padding after the tar, and every member's CRC check
        layer.layer_digest = "sha256:" + source.hash.hexdigest()
        layer.layer_size = source.size
        layer.diff_id = "sha256:" + stream.diff_id.hexdigest()
        layer.uncompressed_size = stream.size
        if expected_digest and layer.layer_digest != expected_digest:
            raise CorruptLayerError(f"layer read is {layer.layer_digest}, expected "
                                    f"{expected_digest}")
    except BaseException:
        layer.close()
        raise
    return layer


def rescan_for_hot_files(layer: ScannedLayer, blob: BinaryIO, hot_files: Iterable[str], *,
                         gap: int = DEFAULT_MERGE_GAP,
                         index_share: float | None = HOT_INDEX_SHARE,
                         tmpdir: str | None = None, start: int = 0) -> ScannedLayer | None:
    """The layer read again (from `blob`, at `start`) with checkpoints around its
    hot files; None when none are needed (no hot file holds data) or none fit.

    Each extra checkpoint costs a window in the index. With `index_share`, an index
    that comes out larger than that share of the layer (or a tenth more than the
    plain index, if that is larger) is built again with the
    closest runs of hot bytes merged, as many as its overshoot says (a few times at
    most, then without extra checkpoints)."""
    runs = merge_runs(hot_extents(layer.entries(), hot_files), gap)
    plain = sum(layer.section_sizes())
    # A layer whose index is that large already (incompressible data: windows that
    # do not shrink) may still grow it by a tenth.
    limit = None if index_share is None else max(int(layer.layer_size * index_share),
                                                 plain + plain // 10)
    for _ in range(_HOT_ATTEMPTS):
        cuts = plan_cuts(runs, layer.boundaries)
        if not cuts:
            return None
        blob.seek(start)
        again = scan_layer(blob, spacing=layer.spacing, expected_digest=layer.layer_digest,
                           tmpdir=tmpdir, cuts=cuts)
        size = sum(again.section_sizes())
        if limit is None or size <= limit:
            return again
        again.close()
        if plain >= limit or len(runs) == 1:
            return None
        # Scale the runs down by how far the extra windows overshot their room.
        fits = (limit - plain) / (size - plain)
        runs = merge_runs(runs, 0, min(int(len(runs) * fits), len(runs) - 1))
    return None


def build_index(blob: BinaryIO, out: BinaryIO, *, spacing: int = DEFAULT_SPACING,
                hot_files: Iterable[str] = (), tmpdir: str | None = None,
                hot_checkpoints: bool = True, gap: int = DEFAULT_MERGE_GAP,
                index_share: float | None = HOT_INDEX_SHARE) -> IndexResult:
    """Index the gzip layer in `blob` and write the index blob to `out`; with hot
    files (and `hot_checkpoints`), `blob` is read twice: it must be seekable."""
    hot = list(hot_files)
    start = blob.tell() if hot and hot_checkpoints else 0
    with scan_layer(blob, spacing=spacing, tmpdir=tmpdir) as layer:
        if hot and hot_checkpoints:
            again = rescan_for_hot_files(layer, blob, hot, gap=gap, index_share=index_share,
                                         tmpdir=tmpdir, start=start)
            if again is not None:
                with again:
                    return again.write(out, hot)
        return layer.write(out, hot)
