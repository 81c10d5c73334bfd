"""A validated view of one layer: its file tree and where each file's bytes live.

Built from a TOC's entries and the blob's footer. Everything a lazy reader needs is
here: lookup by path, a POSIX-like tree (implicit parents become directories, hard
links share one node), the chunks that hold a byte range, the blob's spans in order,
and the prefetch region.

The tree lives in an SQLite file, not in Python objects: a layer of a million files
costs a few hundred bytes of disk per file and almost no memory. Entries are added
as they are parsed, so a TOC is never held whole. Nodes are small records read on
demand; the file can be kept (a service reopens it after a restart) or be a
temporary one that goes with the layer.
"""

import contextlib
import json
import os
import sqlite3
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import TOCError
from .footer import Footer
from .toc import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC,
    EntryWhere,
    TOCEntry,
    clean_name,
    parse_modtime,
    shown,
)

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
_IMPLICIT_DIR_MODE = 0o755
_ROOT_ID = 1
# Bumped whenever the tables change: an index of another version is rebuilt.
INDEX_FORMAT = 2
# Each open layer keeps at most this much of its index in memory (SQLite's page cache).
_PAGE_CACHE_KIB = 2048
# ...while it is built: its B-trees and the sorts of its CREATE INDEX stay in memory
# (a Debian base layer's 6,654 entries, a 1.9 MB index: 0.27 s to build with 2 MiB,
# 0.20 s with 16). Large builds run in a process of their own that ends with them.
_BUILD_PAGE_CACHE_KIB = 32 << 10
# ...and, once built and serving, this much: the kernel's page cache holds the file as
# well, and the FUSE manager keeps one open layer per lazy layer (the python workspace
# image's layers held 2.1 MB more with 2 MiB each, docs/node-memory.md).
_SERVING_PAGE_CACHE_KIB = 512
_DIR_CACHE = 4096  # directories remembered by path while a layer is built...
_DIR_CACHE_CHARS = 32 << 20  # ...and the most path text they may hold
# Implicit parents each store their whole path, so one deep name implies text that
# grows with the square of its depth (10^4 levels: 10^8 characters). Their paths
# may hold this much in all; a TOC that implies more is refused.
MAX_IMPLICIT_DIR_CHARS = 256 << 20
_SPAN_BLOCK = 128  # spans read from the index at once
# A build marks each name it gives in a bitmap of this many bits (1 MiB), at the bit
# its hash picks: a name whose bit is clear is new without a query, and its directory
# entry goes in with a batch. A set bit (the name given before, or another with the
# same bit) asks SQLite. The bitmap's size is fixed, whatever the number of names; a
# layer of 10^6 names asks SQLite for about one in nine.
_NAME_BITS = 1 << 23


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a regular file, stored in the member(s) at `blob_offset .. blob_end`."""

    file_offset: int
    size: int
    blob_offset: int
    blob_end: int
    inner_offset: int
    digest: str

    @property
    def compressed_size(self) -> int:
        return self.blob_end - self.blob_offset


@dataclass(frozen=True, slots=True)
class Span:
    """A compressed member of the blob (`offset .. end`) and the chunks it holds.
    `smallest_file` is the size of the smallest file with a chunk in it."""

    offset: int
    end: int
    chunks: tuple[Chunk, ...]
    smallest_file: int

    @property
    def size(self) -> int:
        return self.end - self.offset


class Node:
    """One inode of the layer. Hard links are the same node (equal `id`) under
    several paths; `path` is the one it was first given."""

    __slots__ = ("_layer", "dev_major", "dev_minor", "digest", "gid", "group_name", "id",
                 "implicit", "kind", "link_target", "mode", "mtime", "nlink", "path", "size",
                 "subdirs", "uid", "user_name", "xattrs")

    def __init__(self, path: str, kind: str, mode: int = 0, uid: int = 0, gid: int = 0,
                 user_name: str = "", group_name: str = "", mtime: int = 0, size: int = 0,
                 link_target: str = "", dev_major: int = 0, dev_minor: int = 0,
                 xattrs: dict[str, bytes] | None = None, digest: str = "", nlink: int = 1,
                 implicit: bool = False, id: int = 0, layer: "Layer | None" = None,
                 subdirs: int = 0):
        self.path, self.kind, self.mode, self.uid, self.gid = path, kind, mode, uid, gid
        self.user_name, self.group_name, self.mtime, self.size = user_name, group_name, mtime, size
        self.link_target, self.dev_major, self.dev_minor = link_target, dev_major, dev_minor
        self.xattrs = xattrs or {}
        self.digest, self.nlink, self.implicit, self.id = digest, nlink, implicit, id
        # A directory's subdirectories, whiteouts left out (its st_nlink is 2 + this).
        self.subdirs = subdirs
        self._layer = layer

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        if self.id or other.id:
            return self.id == other.id and self._layer is other._layer
        return self is other

    def __hash__(self) -> int:
        return hash(self.id) if self.id else id(self)

    def __repr__(self) -> str:
        return f"Node({self.path!r}, {self.kind}, id={self.id})"

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def is_whiteout(self) -> bool:
        """A `.wh.NAME` file that hides NAME of lower layers (not the opaque marker)."""
        return self.name.startswith(WHITEOUT_PREFIX) and self.name != OPAQUE_WHITEOUT

    @property
    def children(self) -> dict[str, "Node"]:
        """The entries of a directory, in name order (empty for anything else)."""
        if self._layer is None or self.kind != "dir":
            return {}
        return dict(self._layer.children(self))

    @property
    def chunks(self) -> list[Chunk]:
        """The chunks of a regular file, in file order."""
        if self._layer is None or self.kind != "reg":
            return []
        return self._layer.chunks(self)

    @property
    def is_opaque_dir(self) -> bool:
        """A directory that hides everything lower layers had under it."""
        return (self.kind == "dir" and self._layer is not None
                and self._layer.child(self, OPAQUE_WHITEOUT) is not None)


_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE nodes (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, kind TEXT NOT NULL,
    mode INTEGER DEFAULT 0, uid INTEGER DEFAULT 0, gid INTEGER DEFAULT 0,
    user_name TEXT DEFAULT '', group_name TEXT DEFAULT '', mtime INTEGER DEFAULT 0,
    size INTEGER DEFAULT 0, link_target TEXT DEFAULT '', dev_major INTEGER DEFAULT 0,
    dev_minor INTEGER DEFAULT 0, xattrs TEXT, digest TEXT DEFAULT '',
    nlink INTEGER DEFAULT 1, implicit INTEGER DEFAULT 0, subdirs INTEGER DEFAULT 0);
CREATE TABLE dirents (parent INTEGER, name TEXT, node INTEGER,
    PRIMARY KEY (parent, name)) WITHOUT ROWID;
CREATE TABLE chunks (node INTEGER, file_offset INTEGER, size INTEGER, blob_offset INTEGER,
    blob_end INTEGER, inner_offset INTEGER, digest TEXT,
    PRIMARY KEY (node, file_offset)) WITHOUT ROWID;
CREATE TABLE member_starts (offset INTEGER PRIMARY KEY);
CREATE TABLE spans (idx INTEGER PRIMARY KEY, offset INTEGER, end_offset INTEGER,
    smallest_file INTEGER);
"""
# Built once the entries are in: the index that orders chunks in the blob.
_SPAN_SCHEMA = """
CREATE INDEX chunks_in_blob ON chunks (blob_offset, inner_offset);
INSERT INTO spans (idx, offset, end_offset, smallest_file)
    SELECT row_number() OVER (ORDER BY c.blob_offset) - 1, c.blob_offset, max(c.blob_end),
           min(n.size)
    FROM chunks c JOIN nodes n ON n.id = c.node GROUP BY c.blob_offset;
CREATE UNIQUE INDEX spans_by_offset ON spans (offset);
"""
# What an entry says of its node, in the order `_Builder._columns` gives them.
_ENTRY_COLUMNS = ("mode", "uid", "gid", "user_name", "group_name", "mtime", "xattrs", "size",
                  "digest", "link_target", "dev_major", "dev_minor")
_NODE_COLUMNS = ("id, path, kind, mode, uid, gid, user_name, group_name, mtime, size, "
                 "link_target, dev_major, dev_minor, xattrs, digest, nlink, implicit, subdirs")
_CHUNK_COLUMNS = "file_offset, size, blob_offset, blob_end, inner_offset, digest"


def _encode_xattrs(xattrs: dict[str, bytes]) -> str | None:
    if not xattrs:
        return None
    return json.dumps({k: v.decode("latin-1") for k, v in xattrs.items()})


def _decode_xattrs(text: str | None) -> dict[str, bytes]:
    if not text:
        return {}
    return {k: v.encode("latin-1") for k, v in json.loads(text).items()}


class Layer:
    """The layer's tree, read from its index. Build one with `Layer.build` (or from
    a parsed `TOC`), or reopen a kept index with `Layer.open_index`."""

    def __init__(self, toc: TOC | Iterable[TOCEntry], footer: Footer, toc_digest: str, *,
                 index_path: str | None = None):
        entries = toc.entries if isinstance(toc, TOC) else toc
        self.footer = footer
        self.toc_digest = toc_digest
        self._lock = threading.RLock()
        # A kept index is built beside its place and renamed when complete, so a crash
        # never leaves a half-built one under the real name.
        building = None if index_path is None else _building_path(index_path)
        try:
            self._db = _open_for_build(building)
        except BaseException:  # a full disk, say: no file is left either way
            if building is not None:
                with contextlib.suppress(OSError):
                    os.unlink(building)
            raise
        try:
            _Builder(self._db, footer).run(entries)
            self._set_meta({"format": INDEX_FORMAT, "toc_digest": toc_digest,
                            **_footer_meta(footer)})
            self._db.commit()
            if building is not None and index_path is not None:
                os.replace(building, index_path)
        except BaseException:
            self._db.close()
            if building is not None:
                with contextlib.suppress(OSError):
                    os.unlink(building)
            raise
        self._after_open()

    @classmethod
    def build(cls, entries: Iterable[TOCEntry], footer: Footer, toc_digest: str, *,
              index_path: str | None = None) -> "Layer":
        return cls(entries, footer, toc_digest, index_path=index_path)

    @classmethod
    def open_index(cls, index_path: str, footer: Footer, toc_digest: str) -> "Layer | None":
        """The layer of a kept index, or None if it is not a complete index of this
        TOC (a crash during a build, another format): then build it again."""
        if not os.path.exists(index_path):
            return None
        layer = cls.__new__(cls)
        layer.footer, layer.toc_digest = footer, toc_digest
        layer._lock = threading.RLock()
        try:
            layer._db = _connect(index_path)
            meta = dict(layer._db.execute("SELECT key, value FROM meta"))
        except sqlite3.Error:
            with contextlib.suppress(Exception):
                layer._db.close()
            return None
        expected = {"format": INDEX_FORMAT, "toc_digest": toc_digest, **_footer_meta(footer)}
        if any(meta.get(key) != value for key, value in expected.items()) \
                or meta.get("complete") != 1:
            layer._db.close()
            return None
        layer._after_open()
        return layer

    def _after_open(self) -> None:
        self._db.execute("PRAGMA query_only = 1")
        self._db.execute(f"PRAGMA cache_size = -{_SERVING_PAGE_CACHE_KIB}")
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        self.prefetch_end: int | None = meta.get("prefetch_end")
        self.has_no_prefetch_landmark = bool(meta.get("no_prefetch_landmark"))
        self.entry_count: int = meta["entry_count"]
        self.regular_bytes: int = meta["regular_bytes"]  # of every distinct regular file
        self.span_count: int = meta["span_count"]
        self._span_blocks: OrderedDict[int, list[Span]] = OrderedDict()
        root = self.node(_ROOT_ID)
        assert root is not None
        self.root = root

    def _set_meta(self, values: dict[str, Any]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Layer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the tree ----------------------------------------------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _node(self, row: tuple[Any, ...]) -> Node:
        (node_id, path, kind, mode, uid, gid, user_name, group_name, mtime, size, link_target,
         dev_major, dev_minor, xattrs, digest, nlink, implicit, subdirs) = row
        return Node(path, kind, mode, uid, gid, user_name, group_name, mtime, size,
                    link_target, dev_major, dev_minor, _decode_xattrs(xattrs), digest, nlink,
                    bool(implicit), node_id, self, subdirs)

    def node(self, node_id: int) -> Node | None:
        """The node with this id (ids are stable for the life of the index)."""
        rows = self._query(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id = ?", (node_id,))
        return self._node(rows[0]) if rows else None

    def child(self, directory: Node, name: str) -> Node | None:
        rows = self._query(
            f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id = "
            "(SELECT node FROM dirents WHERE parent = ? AND name = ?)", (directory.id, name))
        return self._node(rows[0]) if rows else None

    def children(self, directory: Node) -> list[tuple[str, Node]]:
        """(name, node) of every entry of `directory`, in name order."""
        rows = self._query(
            f"SELECT d.name, {', '.join('n.' + c for c in _NODE_COLUMNS.split(', '))} "
            "FROM dirents d JOIN nodes n ON n.id = d.node WHERE d.parent = ? ORDER BY d.name",
            (directory.id,))
        return [(row[0], self._node(row[1:])) for row in rows]

    def lookup(self, path: str) -> Node | None:
        """The node at `path` (relative, or absolute from the layer's root)."""
        try:
            parts = clean_name(path.lstrip("/")).split("/")
        except TOCError:
            return None
        node: Node | None = self.root
        for part in parts if parts != [""] else []:
            if node is None or node.kind != "dir":
                return None
            node = self.child(node, part)
        return node

    def parent(self, node: Node) -> Node | None:
        """The directory that holds `node` at its path (None for the root)."""
        if node.id == _ROOT_ID:
            return None
        return self.lookup(node.path.rpartition("/")[0])

    def walk(self) -> Iterator[tuple[str, Node]]:
        """Every (path, node) pair, parents before children, in name order."""
        stack = [("", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.kind == "dir":
                for name, child in reversed(self.children(node)):
                    stack.append((f"{path}/{name}" if path else name, child))

    # -- file bytes --------------------------------------------------------

    def chunks(self, node: Node) -> list[Chunk]:
        rows = self._query(f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE node = ? "
                           "ORDER BY file_offset", (node.id,))
        return [Chunk(*row) for row in rows]

    def chunks_for_range(self, node: Node, offset: int, length: int) -> list[Chunk]:
        """The chunks of `node` that hold bytes `offset .. offset+length` (clipped to EOF)."""
        end = min(offset + length, node.size)
        if offset >= end:
            return []
        rows = self._query(
            f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE node = ?1 AND file_offset < ?3 AND "
            "file_offset >= (SELECT max(file_offset) FROM chunks WHERE node = ?1 AND "
            "file_offset <= ?2) ORDER BY file_offset", (node.id, offset, end))
        return [Chunk(*row) for row in rows]

    def payload_chunks(self) -> Iterator[Chunk]:
        """Every chunk of the layer's files in blob order (the order background fetch
        wants)."""
        for span in self.iter_spans():
            yield from span.chunks

    def iter_spans(self) -> Iterator[Span]:
        """Every span in blob order, read from the index a block at a time."""
        for start in range(0, self.span_count, _SPAN_BLOCK):
            yield from self.spans(start, start + _SPAN_BLOCK)

    def chunk_digests(self) -> Iterator[str]:
        for chunk in self.payload_chunks():
            yield chunk.digest

    # -- spans, in blob order ------------------------------------------------

    def span(self, index: int) -> Span:
        """The `index`-th span of the blob (0 <= index < span_count)."""
        block = index // _SPAN_BLOCK
        spans = self._span_blocks.get(block)
        if spans is None:
            start = block * _SPAN_BLOCK
            spans = self.spans(start, start + _SPAN_BLOCK)
            with self._lock:
                self._span_blocks[block] = spans
                if len(self._span_blocks) > 64:
                    self._span_blocks.popitem(last=False)
        else:
            with self._lock, contextlib.suppress(KeyError):
                self._span_blocks.move_to_end(block)
        return spans[index - block * _SPAN_BLOCK]

    def spans(self, start: int, stop: int) -> list[Span]:
        """Spans `start .. stop-1` with their chunks."""
        rows = self._query(
            "SELECT s.idx, s.offset, s.end_offset, s.smallest_file, "
            + ", ".join("c." + c for c in _CHUNK_COLUMNS.split(", "))
            + " FROM spans s JOIN chunks c ON c.blob_offset = s.offset "
            "WHERE s.idx >= ? AND s.idx < ? ORDER BY s.idx, c.inner_offset, c.digest",
            (start, stop))
        spans: list[Span] = []
        members: list[Chunk] = []
        for index, row in enumerate(rows):
            members.append(Chunk(*row[4:]))
            if index + 1 == len(rows) or rows[index + 1][0] != row[0]:
                spans.append(Span(row[1], row[2], tuple(members), row[3]))
                members = []
        return spans

    def span_index(self, blob_offset: int) -> int | None:
        """The index of the span that starts at `blob_offset`, if one does."""
        rows = self._query("SELECT idx FROM spans WHERE offset = ?", (blob_offset,))
        return rows[0][0] if rows else None

    def spans_before(self, blob_offset: int) -> int:
        """How many spans start before `blob_offset`."""
        rows = self._query("SELECT count(*) FROM spans WHERE offset < ?", (blob_offset,))
        return rows[0][0]

    @property
    def prefetch_size(self) -> int:
        """Bytes at the start of the blob that hold the prioritized files (0 if none)."""
        return self.prefetch_end or 0

    def prefetch_span_ranges(self) -> list[tuple[int, int]]:
        """The spans to prefetch, as (first, stop) runs of span numbers in priority
        order: here the region before the landmark."""
        stop = self.spans_before(self.prefetch_size)
        return [(0, stop)] if stop else []


def _footer_meta(footer: Footer) -> dict[str, Any]:
    return {"compression": str(footer.compression), "toc_offset": footer.toc_offset,
            "payload_end": footer.payload_end}


def _connect(path: str, cache_kib: int = _PAGE_CACHE_KIB) -> sqlite3.Connection:
    # Shared between the event loop and worker threads; Layer serializes the use.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute(f"PRAGMA cache_size = -{cache_kib}")
    return db


def _building_path(index_path: str) -> str:
    """A new file beside `index_path`, unique to this build."""
    fd, path = tempfile.mkstemp(dir=os.path.dirname(index_path) or ".",
                                prefix=os.path.basename(index_path) + ".",
                                suffix=".building")
    os.close(fd)
    return path


def _open_for_build(index_path: str | None) -> sqlite3.Connection:
    """A new, empty index: at `index_path`, or in a temporary file that is unlinked
    at once and so goes when the layer is closed (or the process ends)."""
    if index_path is None:
        fd, path = tempfile.mkstemp(prefix="lazypull-layer-", suffix=".db")
        os.close(fd)
        try:
            db = _connect(path, _BUILD_PAGE_CACHE_KIB)
            db.execute("PRAGMA user_version = 0")  # creates the file's header now
        finally:
            os.unlink(path)
    else:
        db = _connect(index_path, _BUILD_PAGE_CACHE_KIB)
    # Written once, then only read: a crash mid-build leaves an index without the
    # `complete` mark, which is built again.
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    db.executescript(_SCHEMA)
    db.execute("BEGIN")
    return db


class _Builder:
    """Adds TOC entries to a new index, checking what makes a layer: every chunk
    follows its file and covers it without gaps, hard links name earlier entries,
    no file is used as a directory."""

    def __init__(self, db: sqlite3.Connection, footer: Footer):
        self.db = db
        self.footer = footer
        self.next_id = _ROOT_ID + 1
        self.dirs: OrderedDict[str, int] = OrderedDict()  # path -> id, recent ones
        self.dir_chars = 0  # of the paths in `dirs`
        self.implicit_chars = 0  # of the paths of implicit directories made so far
        # The reference writes userName/groupName only where the name changes for
        # an id ("may only be present for the first entry with the same UID"), so
        # an entry without one has the last name given for its uid or gid.
        self.user_names: dict[int, str] = {}
        self.group_names: dict[int, str] = {}
        self.meta: dict[str, Any] = {}
        self.pending_chunks: list[tuple[Any, ...]] = []
        self.pending_nodes: list[tuple[Any, ...]] = []
        self.pending_offsets: list[tuple[int]] = []  # where members with payload start
        self.pending_dirents: list[tuple[int, str, int]] = []
        self.names = bytearray((_NAME_BITS + 7) // 8)  # the names given (_NAME_BITS)
        db.execute("INSERT INTO nodes (id, path, kind, mode, nlink, implicit) "
                   "VALUES (?, '', 'dir', ?, 1, 1)", (_ROOT_ID, _IMPLICIT_DIR_MODE))

    # -- entries -------------------------------------------------------------

    def run(self, entries: Iterable[TOCEntry]) -> None:
        payload_end = self.footer.payload_end
        current: tuple[int, str, int] | None = None  # (id, path, size) of the file
        covered = 0
        count = 0
        for index, entry in enumerate(entries):
            count += 1
            where = EntryWhere(index, entry.name)
            if entry.has_payload:
                if not entry.offset < payload_end:
                    raise TOCError(f"{where}: offset {entry.offset} is outside the payload "
                                   f"(which ends at {payload_end})")
                self.pending_offsets.append((entry.offset,))
            if entry.type == "chunk":
                path = clean_name(entry.name)
                if current is None or current[1] != path:
                    raise TOCError(f"{where}: chunk does not follow its regular file")
                covered = self._add_chunk(current, entry, covered, where)
                continue
            self._check_covered(current, covered)
            current, covered = None, 0
            self._note_owner_names(entry)
            node = self._add_entry(entry, where)
            if node is not None and entry.type == "reg" and entry.size > 0:
                current = node
                covered = self._add_chunk(node, entry, 0, where)
        self._check_covered(current, covered)
        self._flush()
        self._finish(count)

    def _check_covered(self, current: tuple[int, str, int] | None, covered: int) -> None:
        if current is not None and covered != current[2]:
            raise TOCError(f"chunks of {shown(current[1])} cover {covered} of {current[2]} bytes")

    def _add_chunk(self, node: tuple[int, str, int], entry: TOCEntry, covered: int,
                   where: EntryWhere) -> int:
        node_id, _, file_size = node
        if entry.chunk_offset != covered:
            raise TOCError(
                f"{where}: chunk starts at {entry.chunk_offset}, expected {covered} "
                "(chunks overlap or leave a gap)"
            )
        size = entry.chunk_size or (file_size - entry.chunk_offset)
        if size <= 0 or entry.chunk_offset + size > file_size:
            raise TOCError(f"{where}: chunk of {size} bytes at {entry.chunk_offset} "
                           f"does not fit a file of {file_size} bytes")
        # blob_end is the next chunk's offset in the blob: filled in at the end.
        self.pending_chunks.append((node_id, entry.chunk_offset, size, entry.offset,
                                    entry.inner_offset, entry.chunk_digest))
        if len(self.pending_chunks) >= 4096:
            self._flush_chunks()
        return covered + size

    def _flush_chunks(self) -> None:
        self.db.executemany(
            "INSERT INTO chunks (node, file_offset, size, blob_offset, inner_offset, digest) "
            "VALUES (?, ?, ?, ?, ?, ?)", self.pending_chunks)
        self.db.executemany("INSERT OR IGNORE INTO member_starts VALUES (?)",
                            self.pending_offsets)
        self.pending_chunks, self.pending_offsets = [], []

    # -- the tree --------------------------------------------------------------

    def _find(self, parent: int, name: str) -> tuple[int, str, int] | None:
        """(id, kind, nlink) of the entry `name` of directory `parent`."""
        self._flush()
        return self.db.execute(
            "SELECT n.id, n.kind, n.nlink FROM dirents d JOIN nodes n ON n.id = d.node "
            "WHERE d.parent = ? AND d.name = ?", (parent, name)).fetchone()

    def _resolve(self, path: str) -> tuple[int, str, int] | None:
        """(id, kind, nlink) of the node at `path`, or None."""
        if path == "":
            return _ROOT_ID, "dir", 1
        parent_path, _, name = path.rpartition("/")
        parent = self._dir_id(parent_path)
        if parent is None:
            return None
        return self._find(parent, name)

    def _dir_id(self, path: str) -> int | None:
        """The id of the directory at `path`, or None if there is none."""
        # Up to the nearest remembered ancestor, then down: paths can be deep.
        below: list[str] = []
        ancestor = path
        while ancestor and ancestor not in self.dirs:
            below.append(ancestor)
            ancestor = ancestor.rpartition("/")[0]
        node_id = self.dirs[ancestor] if ancestor else _ROOT_ID
        for step in reversed(below):
            found = self._find(node_id, step.rsplit("/", 1)[-1])
            if found is None or found[1] != "dir":
                return None
            node_id = found[0]
            self._remember_dir(step, node_id)
        return node_id

    def _remember_dir(self, path: str, node_id: int) -> None:
        if path not in self.dirs:
            self.dir_chars += len(path)
        self.dirs[path] = node_id
        while len(self.dirs) > _DIR_CACHE or self.dir_chars > _DIR_CACHE_CHARS:
            self.dir_chars -= len(self.dirs.popitem(last=False)[0])

    def _forget_dir(self, path: str) -> None:
        if self.dirs.pop(path, None) is not None:
            self.dir_chars -= len(path)

    def _parent_dir(self, path: str, where: EntryWhere) -> int:
        """The id of the directory that holds `path`, made (implicitly) if missing."""
        parent_path = path.rpartition("/")[0]
        if parent_path == "":
            return _ROOT_ID
        known = self.dirs.get(parent_path)
        if known is not None:
            return known
        # From the nearest remembered ancestor down, one component at a time, so a
        # path thousands of directories deep costs one pass, not one per level.
        ends = [i for i, c in enumerate(parent_path) if c == "/"] + [len(parent_path)]
        first, node_id = 0, _ROOT_ID
        for k in range(len(ends) - 2, -1, -1):
            ancestor = self.dirs.get(parent_path[:ends[k]])
            if ancestor is not None:
                first, node_id = k + 1, ancestor
                break
        missing = False
        for k in range(first, len(ends)):
            step = parent_path[:ends[k]]
            name = step[ends[k - 1] + 1:] if k else step
            if not missing:
                found = self._find(node_id, name)
                if found is not None:
                    if found[1] != "dir":
                        raise TOCError(f"{where}: parent {shown(step)} is not a directory")
                    node_id = found[0]
                    self._remember_dir(step, node_id)
                    continue
                missing = True  # and so is everything below it
            self.implicit_chars += len(step)
            if self.implicit_chars > MAX_IMPLICIT_DIR_CHARS:
                raise TOCError(f"{where}: the parent directories the TOC leaves out would "
                               f"hold more than {MAX_IMPLICIT_DIR_CHARS} characters of paths")
            child = self._new_node(step, "dir", mode=_IMPLICIT_DIR_MODE, implicit=1)
            self._link(node_id, name, child)
            self._remember_dir(step, child)
            node_id = child
        return node_id

    def _new_node(self, path: str, kind: str, **columns: Any) -> int:
        node_id = self.next_id
        self.next_id += 1
        names = ", ".join(["id", "path", "kind", "nlink", *columns])
        marks = ", ".join("?" * (4 + len(columns)))
        self.db.execute(f"INSERT INTO nodes ({names}) VALUES ({marks})",
                        (node_id, path, kind, 1, *columns.values()))
        return node_id

    def _link(self, parent: int, name: str, node_id: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO dirents VALUES (?, ?, ?)",
                        (parent, name, node_id))
        self._mark(parent, name)

    def _claim(self, parent: int, name: str, node_id: int) -> bool:
        """Give `name` in `parent` to `node_id` if no entry has it yet: True if given."""
        if not self._mark(parent, name):
            self.pending_dirents.append((parent, name, node_id))
            return True
        self._flush()  # a repeated name, or another with the same bit: ask SQLite
        try:
            self.db.execute("INSERT INTO dirents VALUES (?, ?, ?)", (parent, name, node_id))
        except sqlite3.IntegrityError:
            return False  # the name exists
        return True

    def _mark(self, parent: int, name: str) -> bool:
        """Set the name's bit in `names`; True if it was set already."""
        bit = hash((parent, name)) % _NAME_BITS
        byte, mask = bit >> 3, 1 << (bit & 7)
        was_set = bool(self.names[byte] & mask)
        self.names[byte] |= mask
        return was_set

    def _flush(self) -> None:
        """Write the batched entries and chunks: before any query that may need them."""
        if self.pending_dirents:
            self.db.executemany("INSERT INTO dirents VALUES (?, ?, ?)", self.pending_dirents)
            self.pending_dirents = []
        if self.pending_nodes:
            names = ", ".join(["id", "path", "kind", *_ENTRY_COLUMNS])
            marks = ", ".join("?" * (3 + len(_ENTRY_COLUMNS)))
            self.db.executemany(f"INSERT INTO nodes ({names}) VALUES ({marks})",
                                self.pending_nodes)
            self.pending_nodes = []
        self._flush_chunks()

    def _columns(self, entry: TOCEntry) -> tuple[Any, ...]:
        """The entry's values of _ENTRY_COLUMNS, in that order."""
        size, digest, link_target, dev_major, dev_minor = 0, "", "", 0, 0
        kind = entry.type
        if kind == "reg":
            size, digest = entry.size, entry.digest
        elif kind == "symlink":
            link_target = entry.link_name
            size = len(link_target.encode())
        elif kind in ("char", "block"):
            dev_major, dev_minor = entry.dev_major, entry.dev_minor
        return (entry.mode, entry.uid, entry.gid, self.user_names.get(entry.uid, ""),
                self.group_names.get(entry.gid, ""), parse_modtime(entry.modtime),
                _encode_xattrs(entry.xattrs) if entry.xattrs else None, size, digest,
                link_target, dev_major, dev_minor)

    def _add_entry(self, entry: TOCEntry, where: EntryWhere) -> tuple[int, str, int] | None:
        """Adds the entry; returns (id, path, size) of the node it made or updated."""
        path = clean_name(entry.name)
        if path == "":
            if entry.type != "dir":
                raise TOCError(f"{where}: the root must be a directory")
            self._update(_ROOT_ID, entry)
            return _ROOT_ID, path, 0
        parent = self._parent_dir(path, where)
        name = path.rsplit("/", 1)[-1]
        if entry.type != "hardlink":
            # The common case, a name not seen before: the name is claimed, and its
            # directory entry and node are inserted later in a batch.
            node_id = self.next_id
            if self._claim(parent, name, node_id):
                self.next_id += 1
                self.pending_nodes.append((node_id, path, entry.type, *self._columns(entry)))
                if len(self.pending_nodes) >= 4096:
                    self._flush()
                return self._added(parent, name, path, node_id, entry)
            # the name exists: replace or update it below
        self._flush()
        existing = self._find(parent, name)
        if entry.type == "hardlink":
            target = self._resolve(clean_name(entry.link_name))
            if target is None or (existing is not None and target[0] == existing[0]):
                raise TOCError(
                    f"{where}: hard link target {shown(entry.link_name)} is not an earlier entry"
                )
            if target[1] == "dir":
                raise TOCError(f"{where}: hard link to directory {shown(entry.link_name)}")
            self._replace(parent, name, path, existing, target[0], where)
            self.db.execute("UPDATE nodes SET nlink = nlink + 1 WHERE id = ?", (target[0],))
            return None
        if entry.type == "dir" and existing is not None and existing[1] == "dir":
            self._update(existing[0], entry)  # a repeated directory updates its metadata
            return existing[0], path, 0
        node_id = self._new_node(path, entry.type,
                                 **dict(zip(_ENTRY_COLUMNS, self._columns(entry), strict=True)))
        self._replace(parent, name, path, existing, node_id, where)
        return self._added(parent, name, path, node_id, entry)

    def _added(self, parent: int, name: str, path: str, node_id: int, entry: TOCEntry
               ) -> tuple[int, str, int]:
        if entry.type == "dir":
            self._remember_dir(path, node_id)
        if parent == _ROOT_ID and entry.type == "reg":
            self._note_landmark(name, entry)
        return node_id, path, entry.size

    def _update(self, node_id: int, entry: TOCEntry) -> None:
        assignments = ", ".join(f"{name} = ?" for name in _ENTRY_COLUMNS)
        self.db.execute(f"UPDATE nodes SET {assignments}, implicit = 0 WHERE id = ?",
                        (*self._columns(entry), node_id))

    def _replace(self, parent: int, name: str, path: str, old: tuple[int, str, int] | None,
                 node_id: int, where: EntryWhere) -> None:
        if old is not None:
            old_id, old_kind, old_nlink = old
            if old_kind == "dir":
                if self.db.execute("SELECT 1 FROM dirents WHERE parent = ? LIMIT 1",
                                   (old_id,)).fetchone():
                    raise TOCError(f"{where}: replaces non-empty directory {shown(path)}")
                self._forget_dir(path)
            if old_nlink <= 1:  # nothing reaches it any more: its chunks are no payload
                self._flush_chunks()
                self.db.execute("DELETE FROM chunks WHERE node = ?", (old_id,))
                self.db.execute("DELETE FROM nodes WHERE id = ?", (old_id,))
            else:
                self.db.execute("UPDATE nodes SET nlink = nlink - 1 WHERE id = ?", (old_id,))
        self._link(parent, name, node_id)

    def _note_owner_names(self, entry: TOCEntry) -> None:
        if entry.user_name:
            self.user_names[entry.uid] = entry.user_name
        if entry.group_name:
            self.group_names[entry.gid] = entry.group_name

    def _note_landmark(self, name: str, entry: TOCEntry) -> None:
        if name == PREFETCH_LANDMARK and entry.size > 0:
            self.meta["prefetch_end"] = entry.offset
        elif name == NO_PREFETCH_LANDMARK:
            self.meta["no_prefetch_landmark"] = 1
            self.meta["prefetch_end"] = 0

    # -- the end -----------------------------------------------------------------

    def _finish(self, count: int) -> None:
        db = self.db
        # A chunk's member ends where the next entry's payload (reachable or not) begins.
        db.execute("INSERT OR IGNORE INTO member_starts VALUES (?)", (self.footer.payload_end,))
        db.execute("UPDATE chunks SET blob_end = (SELECT min(offset) FROM member_starts "
                   "WHERE offset > chunks.blob_offset)")
        db.execute("DROP TABLE member_starts")
        # Counted once here: a lookup of a directory then reads no other row for its
        # st_nlink (counting 10^3 entries took milliseconds when the pages were on disk).
        db.execute("UPDATE nodes SET subdirs = (SELECT count(*) FROM dirents d JOIN nodes c "
                   "ON c.id = d.node WHERE d.parent = nodes.id AND c.kind = 'dir' "
                   "AND substr(d.name, 1, 4) != ?) WHERE kind = 'dir'", (WHITEOUT_PREFIX,))
        for statement in _SPAN_SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        regular_bytes = db.execute(
            "SELECT coalesce(sum(size), 0) FROM nodes WHERE kind = 'reg'").fetchone()[0]
        span_count = db.execute("SELECT count(*) FROM spans").fetchone()[0]
        self.meta.update({"entry_count": count, "regular_bytes": regular_bytes,
                          "span_count": span_count, "complete": 1})
        db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", self.meta.items())

