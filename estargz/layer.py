"""A validated view of one layer: its file tree and where each file's bytes live.

Built from a TOC and the blob's footer. Everything a lazy reader needs is here:
lookup by path, a POSIX-like tree (implicit parents become directories, hard links
share one node), the chunks that hold a byte range, and the prefetch region.
"""

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import TOCError
from .footer import Footer
from .toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC, TOCEntry, clean_name, parse_modtime

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
_IMPLICIT_DIR_MODE = 0o755


@dataclass(frozen=True)
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


@dataclass(eq=False)
class Node:
    """One inode of the layer. Hard links are the same Node under several paths."""

    path: str
    kind: str  # dir, reg, symlink, char, block, fifo
    mode: int = 0
    uid: int = 0
    gid: int = 0
    user_name: str = ""
    group_name: str = ""
    mtime: int = 0
    size: int = 0
    link_target: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""
    chunks: list[Chunk] = field(default_factory=list)
    children: dict[str, "Node"] = field(default_factory=dict)
    nlink: int = 1
    implicit: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def is_whiteout(self) -> bool:
        """A `.wh.NAME` file that hides NAME of lower layers (not the opaque marker)."""
        return self.name.startswith(WHITEOUT_PREFIX) and self.name != OPAQUE_WHITEOUT

    @property
    def is_opaque_dir(self) -> bool:
        """A directory that hides everything lower layers had under it."""
        return self.kind == "dir" and OPAQUE_WHITEOUT in self.children


class Layer:
    def __init__(self, toc: TOC, footer: Footer, toc_digest: str):
        self.toc = toc
        self.footer = footer
        self.toc_digest = toc_digest
        self.root = Node(path="", kind="dir", mode=_IMPLICIT_DIR_MODE, implicit=True)
        self._paths: dict[str, Node] = {"": self.root}
        self.prefetch_end: int | None = None
        self.has_no_prefetch_landmark = False
        # The reference writes userName/groupName only where the name changes for
        # an id ("may only be present for the first entry with the same UID"), so
        # an entry without one has the last name given for its uid or gid.
        self._user_names: dict[int, str] = {}
        self._group_names: dict[int, str] = {}
        self._build()

    # -- queries ---------------------------------------------------------

    def lookup(self, path: str) -> Node | None:
        """The node at `path` (relative, or absolute from the layer's root)."""
        try:
            return self._paths.get(clean_name(path.lstrip("/")))
        except TOCError:
            return None

    def walk(self) -> Iterator[tuple[str, Node]]:
        """Every (path, node) pair, parents before children, in name order."""
        stack = [("", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            for name in sorted(node.children, reverse=True):
                child = node.children[name]
                stack.append((f"{path}/{name}" if path else name, child))

    def chunks_for_range(self, node: Node, offset: int, length: int) -> list[Chunk]:
        """The chunks of `node` that hold bytes `offset .. offset+length` (clipped to EOF)."""
        end = min(offset + length, node.size)
        if offset >= end:
            return []
        starts = [c.file_offset for c in node.chunks]
        first = bisect.bisect_right(starts, offset) - 1
        last = bisect.bisect_left(starts, end)
        return node.chunks[first:last]

    def payload_chunks(self) -> list[Chunk]:
        """Every chunk of the layer in blob order (the order background fetch wants)."""
        seen: set[int] = set()
        out: list[Chunk] = []
        for _, node in self.walk():
            if node.kind == "reg" and id(node) not in seen:
                seen.add(id(node))
                out.extend(node.chunks)
        out.sort(key=lambda c: (c.blob_offset, c.inner_offset))
        return out

    @property
    def prefetch_size(self) -> int:
        """Bytes at the start of the blob that hold the prioritized files (0 if none)."""
        return self.prefetch_end or 0

    # -- construction ----------------------------------------------------

    def _build(self) -> None:
        entries = self.toc.entries
        payload_end = self.footer.payload_end
        offsets = sorted({e.offset for e in entries if e.has_payload} | {payload_end})
        current: Node | None = None  # regular file whose chunks are being collected
        covered = 0
        for index, entry in enumerate(entries):
            where = f"TOC entry #{index} ({entry.name!r})"
            if entry.has_payload and not entry.offset < payload_end:
                raise TOCError(
                    f"{where}: offset {entry.offset} is outside the payload "
                    f"(which ends at {payload_end})"
                )
            if entry.type == "chunk":
                path = clean_name(entry.name)
                if current is None or current.path != path:
                    raise TOCError(f"{where}: chunk does not follow its regular file")
                covered = self._add_chunk(current, entry, covered, offsets, where)
                continue
            if current is not None and covered != current.size:
                raise TOCError(
                    f"chunks of {current.path!r} cover {covered} of {current.size} bytes"
                )
            current, covered = None, 0
            self._note_owner_names(entry)
            node = self._add_entry(entry, where)
            if node is not None and node.kind == "reg" and entry.size > 0:
                current = node
                covered = self._add_chunk(node, entry, 0, offsets, where)
        if current is not None and covered != current.size:
            raise TOCError(f"chunks of {current.path!r} cover {covered} of {current.size} bytes")

    def _add_chunk(
        self, node: Node, entry: TOCEntry, covered: int, offsets: list[int], where: str
    ) -> int:
        if entry.chunk_offset != covered:
            raise TOCError(
                f"{where}: chunk starts at {entry.chunk_offset}, expected {covered} "
                "(chunks overlap or leave a gap)"
            )
        size = entry.chunk_size or (node.size - entry.chunk_offset)
        if size <= 0 or entry.chunk_offset + size > node.size:
            raise TOCError(f"{where}: chunk of {size} bytes at {entry.chunk_offset} "
                           f"does not fit a file of {node.size} bytes")
        blob_end = offsets[bisect.bisect_right(offsets, entry.offset)]
        node.chunks.append(
            Chunk(
                file_offset=entry.chunk_offset,
                size=size,
                blob_offset=entry.offset,
                blob_end=blob_end,
                inner_offset=entry.inner_offset,
                digest=entry.chunk_digest,
            )
        )
        return covered + size

    def _parent_dir(self, path: str, where: str) -> Node:
        # Walk up to the nearest known ancestor without recursing: paths can be deep.
        missing: list[str] = []
        parent_path = path.rpartition("/")[0]
        parent = self._paths.get(parent_path)
        while parent is None:
            missing.append(parent_path)
            parent_path = parent_path.rpartition("/")[0]
            parent = self._paths.get(parent_path)
        if parent.kind != "dir":
            raise TOCError(f"{where}: parent {parent_path!r} is not a directory")
        for implicit_path in reversed(missing):
            node = Node(path=implicit_path, kind="dir", mode=_IMPLICIT_DIR_MODE, implicit=True)
            parent.children[node.name] = node
            self._paths[implicit_path] = node
            parent = node
        return parent

    def _add_entry(self, entry: TOCEntry, where: str) -> Node | None:
        path = clean_name(entry.name)
        if path == "":
            if entry.type != "dir":
                raise TOCError(f"{where}: the root must be a directory")
            self._fill(self.root, entry)
            self.root.implicit = False
            return self.root
        parent = self._parent_dir(path, where)
        name = path.rsplit("/", 1)[-1]
        if entry.type == "hardlink":
            target = self._paths.get(clean_name(entry.link_name))
            if target is None or target is self._paths.get(path):
                raise TOCError(
                    f"{where}: hard link target {entry.link_name!r} is not an earlier entry"
                )
            if target.kind == "dir":
                raise TOCError(f"{where}: hard link to directory {entry.link_name!r}")
            self._replace(parent, name, path, target, where)
            target.nlink += 1
            return None
        existing = self._paths.get(path)
        if entry.type == "dir" and existing is not None and existing.kind == "dir":
            self._fill(existing, entry)  # a repeated directory updates its metadata
            existing.implicit = False
            return existing
        node = Node(path=path, kind=entry.type)
        self._fill(node, entry)
        self._replace(parent, name, path, node, where)
        if parent is self.root and node.kind == "reg":
            self._note_landmark(name, entry)
        return node

    def _replace(self, parent: Node, name: str, path: str, node: Node, where: str) -> None:
        old = parent.children.get(name)
        if old is not None:
            if old.kind == "dir" and old.children:
                raise TOCError(f"{where}: replaces non-empty directory {path!r}")
            old.nlink -= 1
        parent.children[name] = node
        self._paths[path] = node

    def _note_owner_names(self, entry: TOCEntry) -> None:
        if entry.user_name:
            self._user_names[entry.uid] = entry.user_name
        if entry.group_name:
            self._group_names[entry.gid] = entry.group_name

    def _fill(self, node: Node, entry: TOCEntry) -> None:
        node.mode = entry.mode
        node.uid, node.gid = entry.uid, entry.gid
        node.user_name = self._user_names.get(entry.uid, "")
        node.group_name = self._group_names.get(entry.gid, "")
        node.mtime = parse_modtime(entry.modtime)
        node.xattrs = dict(entry.xattrs)
        if node.kind == "reg":
            node.size = entry.size
            node.digest = entry.digest
        elif node.kind == "symlink":
            node.link_target = entry.link_name
            node.size = len(entry.link_name.encode())
        elif node.kind in ("char", "block"):
            node.dev_major, node.dev_minor = entry.dev_major, entry.dev_minor

    def _note_landmark(self, name: str, entry: TOCEntry) -> None:
        if name == PREFETCH_LANDMARK and entry.size > 0:
            self.prefetch_end = entry.offset
        elif name == NO_PREFETCH_LANDMARK:
            self.has_no_prefetch_landmark = True
            self.prefetch_end = 0
