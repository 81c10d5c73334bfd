"""A lazy layer written out as a plain directory, once it is wanted local for good.

Every lookup, open and read of a FUSE directory is a round trip through this process;
a container that starts on a node that unpacked its image makes none. So a layer
whose bytes a node keeps anyway (a warm-set entry with policy `full`) is written out
as SNAPSHOT/tree, exactly as the FUSE mount presents it (presentation.py), and new
overlay mounts take that directory as their lower layer. Mounts made before keep the
FUSE directory, which stays served until the snapshot goes.

Every byte comes through the layer's read function, so it is verified against the TOC
as any read is. The tree is built under a temporary name, flushed to disk, and renamed
into place: it exists whole or not at all, and a failure (a corrupt chunk, a full
disk) leaves the layer served as before.
"""

import asyncio
import ctypes
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from estargz import Layer, Node

from .filesystem import ReadFn
from .layer_files import tree_path
from .presentation import present_directory, presented_mode, presented_xattrs

log = logging.getLogger(__name__)

_STAGING_PREFIX = "tree.new-"
# Bytes of file content read before the writes queued so far go to disk, in one
# hand-off to a worker thread: small files cost one thread switch per batch, not each.
BATCH_BYTES = 8 << 20
READ_BYTES = 4 << 20  # one read of a large file


@dataclass(frozen=True)
class TreeWritten:
    entries: int
    bytes: int
    seconds: float
    existed: bool = False


async def materialize(layer: Layer, read: ReadFn, directory: str) -> TreeWritten:
    """Write `layer` as presented to DIRECTORY/tree, unless it is there already."""
    final = tree_path(directory)
    if await asyncio.to_thread(os.path.isdir, final):
        return TreeWritten(0, 0, 0.0, existed=True)
    started = time.monotonic()
    staging = await asyncio.to_thread(_fresh_staging, directory)
    try:
        writer = _TreeWriter(layer, read, staging)
        await writer.write()
        await asyncio.to_thread(_place, staging, final)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, staging, True)
        raise
    return TreeWritten(writer.entries, writer.bytes, time.monotonic() - started)


def _fresh_staging(directory: str) -> str:
    """A new staging directory; those of a write that died with its process go."""
    for name in os.listdir(directory):
        if name.startswith(_STAGING_PREFIX):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=directory)


def _place(staging: str, final: str) -> None:
    # Contents on disk before the name: after a power loss the tree is whole or absent.
    _syncfs(staging)
    os.rename(staging, final)
    fd = os.open(os.path.dirname(final), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs: {os.strerror(code)}", path)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


class _TreeWriter:
    """Creates the entries of one layer below `root`, directory by directory. File
    contents are read on the event loop; the writes queue up and run in a worker
    thread in batches, in order."""

    def __init__(self, layer: Layer, read: ReadFn, root: str):
        self.layer = layer
        self.read = read
        self.root = os.fsencode(root)
        self.entries = 0
        self.bytes = 0
        self._queue: list[Callable[[], None]] = []
        self._queued_bytes = 0
        self._linked: dict[int, bytes] = {}  # node id of a hard-linked file -> first path
        self._directories: list[tuple[bytes, Node]] = []

    async def write(self) -> None:
        stack: list[tuple[bytes, Node]] = [(self.root, self.layer.root)]
        self._directories.append((self.root, self.layer.root))
        while stack:
            path, directory = stack.pop()
            view = present_directory(directory, directory == self.layer.root)
            for name in view.names:
                node, whiteout = view.entries[name]
                child = os.path.join(path, name)
                self.entries += 1
                if whiteout or node.kind != "reg":
                    self._queue.append(lambda c=child, n=node, w=whiteout: _create(c, n, w))
                    if node.kind == "dir" and not whiteout:
                        stack.append((child, node))
                        self._directories.append((child, node))
                    continue
                await self._file(child, node)
            await self._flush_if(BATCH_BYTES)
        # Directories last: creating their entries changed their times.
        for path, node in self._directories:
            self._queue.append(lambda p=path, n=node: _set_metadata(p, n, False))
        await self._flush_if(0)

    async def _file(self, path: bytes, node: Node) -> None:
        first = self._linked.get(node.id)
        if first is not None:
            self._queue.append(lambda: os.link(first, path))
            return
        if node.nlink > 1:
            self._linked[node.id] = path
        if node.size <= READ_BYTES:
            data = await self._content(node, 0, node.size)
            self._queue.append(lambda: _write_file(path, node, [data]))
            self._queued_bytes += len(data)
            await self._flush_if(BATCH_BYTES)
            return
        await self._flush_if(0)
        fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                     0o600)
        try:
            for offset in range(0, node.size, READ_BYTES):
                data = await self._content(node, offset, min(READ_BYTES, node.size - offset))
                await asyncio.to_thread(_write_all, fd, data)
        finally:
            await asyncio.to_thread(os.close, fd)
        self._queue.append(lambda: _set_metadata(path, node, False))

    async def _content(self, node: Node, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        data = await self.read(node, offset, length)
        if len(data) != length:
            raise OSError(f"{node.path}: read {len(data)} bytes at {offset}, wanted {length}")
        self.bytes += length
        return data

    async def _flush_if(self, at_least: int) -> None:
        if self._queue and self._queued_bytes >= at_least:
            queue, self._queue, self._queued_bytes = self._queue, [], 0
            await asyncio.to_thread(_run_all, queue)


def _run_all(operations: list[Callable[[], None]]) -> None:
    for operation in operations:
        operation()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_file(path: bytes, node: Node, pieces: list[bytes]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for piece in pieces:
            _write_all(fd, piece)
    finally:
        os.close(fd)
    _set_metadata(path, node, False)


def _create(path: bytes, node: Node, whiteout: bool) -> None:
    """A directory, whiteout, symlink, device or fifo; metadata set but for directories
    (their times change while their entries are made)."""
    mode = presented_mode(node, whiteout)
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFDIR:
        os.mkdir(path, 0o700)
        return
    if kind == stat.S_IFLNK:
        os.symlink(os.fsencode(node.link_target), path)
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        device = 0 if whiteout else os.makedev(node.dev_major, node.dev_minor)
        os.mknod(path, kind | 0o600, device)
    elif kind == stat.S_IFIFO:
        os.mknod(path, stat.S_IFIFO | 0o600)
    else:
        raise ValueError(f"{node.path}: cannot write an entry of mode {oct(mode)}")
    _set_metadata(path, node, whiteout)


def _set_metadata(path: bytes, node: Node, whiteout: bool) -> None:
    mode = presented_mode(node, whiteout)
    os.chown(path, node.uid, node.gid, follow_symlinks=False)
    if not stat.S_ISLNK(mode):  # after chown, which clears setuid and setgid bits
        os.chmod(path, stat.S_IMODE(mode))
    for name, value in presented_xattrs(node, whiteout).items():
        os.setxattr(path, name, value, follow_symlinks=False)
    mtime = node.mtime * 1_000_000_000
    os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
