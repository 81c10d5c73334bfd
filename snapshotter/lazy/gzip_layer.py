"""An unmodified gzip layer served through its gzip index, in the shapes the lazy
path already consumes (docs/gzip-index.md, "The snapshotter side").

The gzip index's spans are the fetch unit: each becomes one chunk of the estargz
`Layer` model, whose digest is the sha256 of the span's uncompressed bytes and whose
blob range is the span's compressed range. A file's bytes are slices of one or more
spans (`Chunk.inner_offset` is where the slice starts in its span), so small files
that share a span share one cached, verified span. The tree is built into the same
SQLite index.db as a TOC's, so the FUSE tree, the fetcher, the chunk cache, the warm
set, profiles and restart serve it unchanged; the fetcher decodes its chunks with
`GzipSpanDecoder` instead of inflating gzip members.

Memory: the index's span records (76 bytes per span) and a dict of span starts; the
file table is streamed into SQLite, never held.
"""

import contextlib
import hashlib
import os
import sqlite3
from collections.abc import Iterator
from typing import TYPE_CHECKING

import gzindex
from estargz import Chunk, Layer, Span
from estargz.footer import Compression, Footer
from estargz.toc import TOCEntry

if TYPE_CHECKING:
    from .layer_files import LayerRecord

# Marks an index.db built from a gzip index (and which version of that mapping).
GZIP_FORMAT_KEY = "gzip_index_format"
GZIP_FORMAT = 1

_GZIP_SCHEMA = """
CREATE TABLE gzip_spans (offset INTEGER PRIMARY KEY, end_offset INTEGER, size INTEGER,
    digest TEXT);
CREATE TABLE hot_spans (rank INTEGER PRIMARY KEY, idx INTEGER);
"""


def layer_footer(layer_size: int) -> Footer:
    """What the estargz model wants of a footer: the payload is the whole blob."""
    return Footer(Compression.GZIP, layer_size, 0, layer_size, 0, None)


class GzipLayer(Layer):
    """A layer's tree built from its gzip index; one chunk per span in `spans`.
    `decoder` reads its chunks (set once the index blob is open)."""

    decoder: "GzipSpanDecoder"

    @classmethod
    def open_index(cls, index_path: str, footer: Footer, toc_digest: str
                   ) -> "GzipLayer | None":
        layer = super().open_index(index_path, footer, toc_digest)
        if layer is None:
            return None
        assert isinstance(layer, GzipLayer)
        rows = layer._query("SELECT value FROM meta WHERE key = ?", (GZIP_FORMAT_KEY,))
        if not rows or rows[0][0] != GZIP_FORMAT:
            layer.close()
            return None
        return layer

    def spans(self, start: int, stop: int) -> list[Span]:
        """Spans `start .. stop-1`, each with the one chunk that is the whole span."""
        rows = self._query(
            "SELECT s.offset, g.end_offset, s.smallest_file, g.size, g.digest FROM spans s "
            "JOIN gzip_spans g ON g.offset = s.offset WHERE s.idx >= ? AND s.idx < ? "
            "ORDER BY s.idx", (start, stop))
        return [Span(offset, end, (Chunk(0, size, offset, end, 0, digest),), smallest)
                for offset, end, smallest, size, digest in rows]

    def prefetch_span_ranges(self) -> list[tuple[int, int]]:
        """The spans of the index's hot files, in its priority order, as runs of
        adjacent span numbers."""
        ranges: list[tuple[int, int]] = []
        seen: set[int] = set()
        for (index,) in self._query("SELECT idx FROM hot_spans ORDER BY rank"):
            if index in seen:
                continue
            seen.add(index)
            if ranges and ranges[-1][1] == index:
                ranges[-1] = (ranges[-1][0], index + 1)
            else:
                ranges.append((index, index + 1))
        return ranges


class GzipSpanDecoder:
    """Turns a span's fetched compressed bytes into its verified uncompressed bytes
    (the whole span: what the cache holds under the span's digest)."""

    def __init__(self, index: gzindex.GzipIndex):
        self.index = index
        self._numbers = {span.compressed_offset: span.index for span in index.spans()}

    def decode(self, chunk: Chunk, compressed: bytes) -> bytes:
        number = self._numbers.get(chunk.blob_offset)
        if number is None:
            raise gzindex.IndexFormatError(
                f"no span of layer {self.index.layer_digest} starts at blob offset "
                f"{chunk.blob_offset}")
        span = self.index.span(number)
        data = gzindex.decode_span(self.index, span, compressed)
        if "sha256:" + span.digest.hex() != chunk.digest:  # index.db and index disagree
            raise gzindex.SpanDigestMismatch(f"span {number} is not chunk {chunk.digest}")
        return data

    @staticmethod
    def offset_in_decoded(chunk: Chunk) -> int:
        return chunk.inner_offset

    def close(self) -> None:
        self.index.close()


def _entries(index: gzindex.GzipIndex) -> Iterator[TOCEntry]:
    """The file table as TOC entries: a regular file's data as one chunk entry per
    span it touches (blob offset: the span's; inner offset: where it starts in it)."""
    spans = [(span.uncompressed_offset, span.uncompressed_end, span.compressed_offset,
              "sha256:" + span.digest.hex()) for span in index.spans()]
    for entry in index.entries():
        toc = TOCEntry(entry.name, entry.type, entry.size, entry.modtime, entry.link_name,
                       entry.mode, entry.uid, entry.gid, entry.user_name, entry.group_name,
                       0, entry.dev_major, entry.dev_minor, entry.xattrs)
        if entry.type != "reg" or entry.size == 0:
            yield toc
            continue
        for number in index.spans_for(entry.offset, entry.end):
            span_start, span_end, blob_offset, digest = spans[number]
            start = max(entry.offset, span_start)
            chunk = toc if start == entry.offset else TOCEntry(entry.name, "chunk")
            chunk.offset, chunk.chunk_offset = blob_offset, start - entry.offset
            chunk.chunk_size = min(entry.end, span_end) - start
            chunk.chunk_digest, chunk.inner_offset = digest, start - span_start
            yield chunk


def build_gzip_layer(index: gzindex.GzipIndex, index_digest: str, layer_size: int,
                     index_path: str) -> GzipLayer:
    """Build (and keep at `index_path`) the tree of the layer `index` describes. The
    gzip tables are added to a copy beside it, renamed into place when complete, so a
    crash never leaves a half-built index under the real name."""
    footer = layer_footer(layer_size)
    partial = index_path + ".gzip-building"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)
    Layer.build(_entries(index), footer, index_digest, index_path=partial).close()
    try:
        _add_gzip_tables(partial, index)
        os.replace(partial, index_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    layer = GzipLayer.open_index(index_path, footer, index_digest)
    if layer is None:
        raise gzindex.IndexFormatError(f"the tree built from index {index_digest} did not open")
    return layer


def _add_gzip_tables(path: str, index: gzindex.GzipIndex) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("BEGIN")
        for statement in _GZIP_SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        starts: set[int] = set()
        rows = []
        for span in index.spans():
            if span.compressed_offset in starts:
                raise gzindex.IndexFormatError(
                    f"two spans of layer {index.layer_digest} start at blob offset "
                    f"{span.compressed_offset}")
            starts.add(span.compressed_offset)
            rows.append((span.compressed_offset, span.compressed_end, span.uncompressed_size,
                         "sha256:" + span.digest.hex()))
        db.executemany("INSERT INTO gzip_spans VALUES (?, ?, ?, ?)", rows)
        # The estargz builder ends a chunk where the next one starts; a span ends where
        # its last deflate block does (one byte past the next span's start, at most).
        db.execute("UPDATE chunks SET blob_end = (SELECT end_offset FROM gzip_spans "
                   "WHERE offset = chunks.blob_offset)")
        db.execute("UPDATE spans SET end_offset = (SELECT end_offset FROM gzip_spans "
                   "WHERE offset = spans.offset)")
        _add_hot_spans(db, index)
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (GZIP_FORMAT_KEY, GZIP_FORMAT))
        db.execute("COMMIT")
    finally:
        db.close()


def _add_hot_spans(db: sqlite3.Connection, index: gzindex.GzipIndex) -> None:
    """The spans holding the hot files, in the hot list's order."""
    rank = 0
    for path in index.hot_files():
        node = _lookup(db, path)
        if node is None:
            continue
        for (blob_offset,) in db.execute(
                "SELECT blob_offset FROM chunks WHERE node = ? ORDER BY file_offset", (node,)):
            found = db.execute("SELECT idx FROM spans WHERE offset = ?",
                               (blob_offset,)).fetchone()
            if found is not None:
                db.execute("INSERT INTO hot_spans VALUES (?, ?)", (rank, found[0]))
                rank += 1


def _lookup(db: sqlite3.Connection, path: str) -> int | None:
    node = 1  # the root
    for part in [p for p in path.strip("/").split("/") if p]:
        row = db.execute("SELECT node FROM dirents WHERE parent = ? AND name = ?",
                         (node, part)).fetchone()
        if row is None:
            return None
        node = row[0]
    return node


def load_gzip_layer(index_file: str, record: "LayerRecord", index_path: str) -> GzipLayer:
    """A stored layer again (after a restart): its kept tree, or one built again from
    the stored index blob, which is checked against its digest first."""
    index = gzindex.GzipIndex.open(index_file)
    try:
        footer = layer_footer(record.size)
        layer = GzipLayer.open_index(index_path, footer, record.toc_digest)
        if layer is None:
            actual = _file_digest(index_file)
            if actual != record.toc_digest:
                raise gzindex.IndexFormatError(f"stored index {index_file} is {actual}, "
                                               f"not {record.toc_digest}")
            layer = build_gzip_layer(index, record.toc_digest, record.size, index_path)
    except BaseException:
        index.close()
        raise
    layer.decoder = GzipSpanDecoder(index)
    return layer


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return "sha256:" + digest.hexdigest()
