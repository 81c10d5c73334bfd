"""One FUSE mount that presents every lazy layer as a read-only directory tree.

MOUNT/<name> is the root of one layer, in the form overlayfs expects of a lower
directory (presentation.py: whiteouts as 0/0 character devices, opaque directories
by their xattr, markers and landmarks hidden). The tree and all
metadata come from the TOC; file bytes come from the layer's read callback, so a
layer is usable before any of its payload has been fetched.

Memory stays small whatever the layers hold: the tree is read from each layer's
index on demand, an inode number is derived from the layer and the node (so no table
of inodes is kept), and only recently used inodes and directory listings are cached.

pyfuse3 keeps its session in module globals: one LazyFilesystem can be mounted
per process, which is all the node service needs.
"""

import asyncio
import errno
import functools
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from estargz import Layer, Node
from estargz.layer import WHITEOUT_PREFIX

from .fuse_binding import pyfuse3
from .metrics import FUSE_LATENCY
from .presentation import (
    DirView,
    hidden_name,
    present_directory,
    presented_mode,
    presented_xattrs,
)

log = logging.getLogger(__name__)

ReadFn = Callable[[Node, int, int], Awaitable[bytes]]
"""`read(node, offset, length)`: exactly that many verified bytes of the file (or raise)."""
ObserveFn = Callable[[Node, int, int], None]
"""`observe(node, offset, length)`: a regular file of the layer was opened (length 0) or
read. Called on every open and read, before the bytes are fetched: it must be cheap."""

# ro: the kernel answers writes with EROFS before they reach us. allow_other:
# containers run as any uid, and default_permissions makes the kernel check them
# against our modes. nosuid/nodev: no setuid binary or device node of an image may
# be used straight from this mount (overlay mounts apply their own flags).
MOUNT_OPTIONS = frozenset(
    {"fsname=lazypull", "subtype=lazypull", "ro", "allow_other", "default_permissions",
     "nosuid", "nodev"}
)
# Layers never change, so the kernel may keep entries, attributes and pages this long.
CACHE_TIMEOUT = 24 * 3600.0
# The mount's root lists the layers, which come and go.
ROOT_ATTR_TIMEOUT = 1.0
_BLOCK_SIZE = 4096
_NS = 1_000_000_000
_DOTS = (b".", b"..")
# Inode numbers: the layer's serial in the high bits, then the node's id and whether
# it is presented as a whiteout. The mount's root is 1; every layer's serial is >= 1.
_SERIAL_SHIFT = 40
_NODE_MASK = (1 << _SERIAL_SHIFT) - 1
_INODE_CACHE = 16384  # inodes with their attributes, most recently used
_VIEW_CACHE = 64  # directory listings, most recently used

_mounted: "LazyFilesystem | None" = None  # pyfuse3's session is process-wide


class _LayerTree:
    """One mounted layer, and how many references to its inodes the kernel holds."""

    def __init__(self, name: str, layer: Layer, read: ReadFn, serial: int):
        self.name = name
        self.layer = layer
        self.read = read
        self.observe: ObserveFn | None = None
        self.serial = serial  # position in the root listing and inode numbers; never reused
        self.removed = False
        self.lookups = 0  # the kernel's references to inodes of this layer
        self.blocks = -(-layer.regular_bytes // _BLOCK_SIZE)
        self.files = layer.entry_count

    def ino(self, node: Node, whiteout: bool) -> int:
        return (self.serial << _SERIAL_SHIFT) | (node.id << 1) | int(whiteout)

    def find(self, directory: Node, name: bytes) -> tuple[Node, bool] | None:
        """The entry `name` of `directory` as presented: (node, shown as a whiteout)."""
        text = os.fsdecode(name)
        if hidden_name(text, directory == self.layer.root):
            return None
        child = self.layer.child(directory, text)
        if child is not None:
            return child, False
        if text in ("", ".", ".."):
            return None
        marker = self.layer.child(directory, WHITEOUT_PREFIX + text)
        return (marker, True) if marker is not None else None

    def parent_of(self, directory: Node) -> Node | None:
        """The parent directory, or None for the layer's root."""
        return self.layer.parent(directory)


class _Inode:
    """A node as the kernel knows it: its number and cached replies."""

    __slots__ = ("_attributes", "_xattrs", "ino", "node", "tree", "whiteout")

    def __init__(self, ino: int, tree: _LayerTree, node: Node, whiteout: bool):
        self.ino = ino
        self.tree = tree
        self.node = node
        self.whiteout = whiteout
        self._attributes: pyfuse3.EntryAttributes | None = None
        self._xattrs: dict[bytes, bytes] | None = None

    @property
    def is_dir(self) -> bool:
        return self.node.kind == "dir" and not self.whiteout

    def attributes(self) -> pyfuse3.EntryAttributes:
        if self._attributes is None:
            self._attributes = self._build_attributes()
        return self._attributes

    def xattrs(self) -> dict[bytes, bytes]:
        if self._xattrs is None:
            self._xattrs = presented_xattrs(self.node, self.whiteout)
        return self._xattrs

    def _build_attributes(self) -> pyfuse3.EntryAttributes:
        node = self.node
        attrs = _cacheable_attributes(self.ino, node.mtime * _NS)
        attrs.st_uid, attrs.st_gid = node.uid, node.gid
        attrs.st_mode = presented_mode(node, self.whiteout)
        if self.whiteout:
            attrs.st_nlink = 1
            return attrs
        if node.kind == "dir":
            attrs.st_nlink = 2 + node.subdirs
        else:
            attrs.st_nlink = max(node.nlink, 1)
        if node.kind in ("char", "block"):
            attrs.st_rdev = os.makedev(node.dev_major, node.dev_minor)
        attrs.st_size = node.size
        attrs.st_blocks = -(-node.size // 512)
        return attrs


def _cacheable_attributes(ino: int, time_ns: int) -> pyfuse3.EntryAttributes:
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = ino
    attrs.entry_timeout = CACHE_TIMEOUT
    attrs.attr_timeout = CACHE_TIMEOUT
    attrs.st_blksize = _BLOCK_SIZE
    attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = time_ns
    return attrs


def _negative_entry() -> pyfuse3.EntryAttributes:
    """No such name; the kernel may remember that for as long as the layer lives."""
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = 0
    attrs.entry_timeout = CACHE_TIMEOUT
    return attrs


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def _replies_eio_on_bugs(handler: Handler) -> Handler:
    """pyfuse3 answers only FUSEError; any other exception would leave the request
    unanswered and the caller hung. Every operation is timed for the metrics."""
    latency = FUSE_LATENCY.labels(handler.__name__)

    @functools.wraps(handler)
    async def guarded(*args: Any) -> Any:
        started = time.perf_counter()
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("lazy filesystem: %s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            latency.observe(time.perf_counter() - started)
            args[0].last_request_at = time.monotonic()

    return guarded  # type: ignore[return-value]


def _tell(tree: _LayerTree, node: Node, offset: int, length: int) -> None:
    """Pass an access on to the layer's observer; one that fails is dropped, never the
    request it watched."""
    assert tree.observe is not None
    try:
        tree.observe(node, offset, length)
    except Exception:
        log.exception("lazy filesystem: observer of layer %s failed; dropping it", tree.name)
        tree.observe = None


def _check_layer_name(name: str) -> None:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{name!r} cannot name a layer directory")


class LazyFilesystem(pyfuse3.Operations):
    """Every lazy layer of the node, each a read-only tree under `mountpoint`."""

    def __init__(self, mountpoint: str, max_tasks: int = 99):
        super().__init__()
        self.mountpoint = os.path.abspath(mountpoint)
        self._max_tasks = max_tasks  # concurrent FUSE requests, e.g. reads waiting on fetches
        self.last_request_at = 0.0  # time.monotonic() when a request was last answered
        self._trees: dict[str, _LayerTree] = {}  # mounted, by name
        self._serials: dict[int, _LayerTree] = {}  # mounted, or removed but still held
        self._inodes: OrderedDict[int, _Inode] = OrderedDict()
        self._views: OrderedDict[tuple[int, int], DirView] = OrderedDict()
        self._next_serial = 1
        self._mount_time_ns = 0
        self._main: asyncio.Task[None] | None = None
        self._invalidations: set[asyncio.Task[None]] = set()

    # -- layers ------------------------------------------------------------

    def add_layer(self, name: str, layer: Layer, read: ReadFn) -> str:
        """Present `layer` at MOUNT/name; returns that directory's path."""
        _check_layer_name(name)
        if name in self._trees:
            raise ValueError(f"a layer named {name!r} is already mounted")
        tree = _LayerTree(name, layer, read, self._next_serial)
        self._next_serial += 1
        self._trees[name] = tree
        self._serials[tree.serial] = tree
        return os.path.join(self.mountpoint, name)

    async def remove_layer(self, name: str) -> None:
        """Take the layer out of the tree; on return the kernel no longer resolves
        MOUNT/name. Inodes it still holds stay answerable until it forgets them."""
        tree = self._trees.pop(name)
        tree.removed = True
        if tree.lookups <= 0:
            self._drop(tree)
        if self.serving:
            # The kernel may keep MOUNT/name for CACHE_TIMEOUT: make it look again.
            task = asyncio.get_running_loop().create_task(self._invalidate_root_entry(name))
            self._invalidations.add(task)
            task.add_done_callback(self._invalidations.discard)
            await asyncio.shield(task)  # close() waits for it even if we are cancelled

    def observe_layer(self, name: str, observe: ObserveFn | None) -> None:
        """Tell `observe` of every open and read of a file in layer `name` (None: stop)."""
        self._trees[name].observe = observe

    def layer_names(self) -> list[str]:
        return list(self._trees)

    @property
    def kernel_references(self) -> int:
        """References to lazy inodes the kernel holds (for metrics and tests)."""
        return sum(tree.lookups for tree in self._serials.values())

    def retained_layer_names(self) -> list[str]:
        """Removed layers kept answerable because the kernel still holds inodes."""
        return [tree.name for tree in self._serials.values() if tree.removed]

    async def _invalidate_root_entry(self, name: str) -> None:
        try:
            # Blocks until the kernel is done, and the kernel may need this loop
            # meanwhile: run it in a thread.
            await asyncio.to_thread(
                pyfuse3.invalidate_entry, pyfuse3.ROOT_INODE, os.fsencode(name)
            )
        except FileNotFoundError:
            pass  # the kernel never looked it up
        except OSError as exc:
            log.warning("lazy filesystem: cannot invalidate %r: %s", name, exc)

    # -- mount lifetime ------------------------------------------------------

    @property
    def serving(self) -> bool:
        return self._main is not None and not self._main.done()

    def idle_seconds(self) -> float:
        """Since the last request was answered (background work gives way to requests)."""
        return time.monotonic() - self.last_request_at

    async def start(self) -> None:
        """Mount and serve requests from this event loop until `close()`."""
        global _mounted
        if _mounted is not None:
            raise RuntimeError("a lazy filesystem is already mounted in this process")
        pyfuse3.init(self, self.mountpoint, set(MOUNT_OPTIONS))
        _mounted = self
        self._mount_time_ns = time.time_ns()
        self._main = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        global _mounted
        try:
            await pyfuse3.main(max_tasks=self._max_tasks)
        finally:
            # Also when someone else unmounted us: the session must go.
            pyfuse3.close(unmount=True)
            _mounted = None

    async def close(self) -> None:
        """Finish the requests under way, unmount and release the session."""
        if self._main is None:
            return
        main, self._main = self._main, None
        if self._invalidations:
            await asyncio.gather(*self._invalidations, return_exceptions=True)
        if not main.done():
            pyfuse3.terminate()
        # Never cancel pyfuse3's loop: its workers would outlive the session.
        await asyncio.shield(main)

    async def run(self) -> None:
        """Serve until `close()` is called or the mount is taken away."""
        await self.start()
        main = self._main
        assert main is not None
        try:
            await asyncio.shield(main)
        finally:
            await self.close()

    async def __aenter__(self) -> "LazyFilesystem":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- inode table -------------------------------------------------------

    def _inode_of(self, tree: _LayerTree, node: Node, whiteout: bool) -> _Inode:
        ino = tree.ino(node, whiteout)
        inode = self._inodes.get(ino)
        if inode is None:
            inode = self._remember(_Inode(ino, tree, node, whiteout))
        return inode

    def _remember(self, inode: _Inode) -> _Inode:
        self._inodes[inode.ino] = inode
        if len(self._inodes) > _INODE_CACHE:
            self._inodes.popitem(last=False)
        return inode

    def _drop(self, tree: _LayerTree) -> None:
        """Forget a removed layer the kernel no longer holds."""
        self._serials.pop(tree.serial, None)
        for ino in [ino for ino, inode in self._inodes.items() if inode.tree is tree]:
            del self._inodes[ino]
        for key in [key for key in self._views if key[0] == tree.serial]:
            del self._views[key]

    def _known(self, ino: int) -> _Inode:
        inode = self._inodes.get(ino)
        if inode is not None:
            self._inodes.move_to_end(ino)
            return inode
        tree = self._serials.get(ino >> _SERIAL_SHIFT)
        node = tree.layer.node((ino & _NODE_MASK) >> 1) if tree is not None else None
        if tree is None or node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return self._remember(_Inode(ino, tree, node, bool(ino & 1)))

    def _view(self, directory: _Inode) -> DirView:
        key = (directory.tree.serial, directory.node.id)
        view = self._views.get(key)
        if view is None:
            view = present_directory(directory.node,
                                     directory.node == directory.tree.layer.root)
            self._views[key] = view
            if len(self._views) > _VIEW_CACHE:
                self._views.popitem(last=False)
        else:
            self._views.move_to_end(key)
        return view

    def _directory(self, ino: int) -> _Inode:
        inode = self._known(ino)
        if not inode.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    def _root_attributes(self) -> pyfuse3.EntryAttributes:
        attrs = _cacheable_attributes(pyfuse3.ROOT_INODE, self._mount_time_ns)
        attrs.attr_timeout = ROOT_ATTR_TIMEOUT
        attrs.st_mode = stat.S_IFDIR | 0o755
        attrs.st_nlink = 2 + len(self._trees)
        return attrs

    def _parent_attributes(self, directory: _Inode) -> pyfuse3.EntryAttributes:
        parent = directory.tree.parent_of(directory.node)
        if parent is None:
            return self._root_attributes()
        return self._inode_of(directory.tree, parent, False).attributes()

    # -- lookups and attributes ----------------------------------------------

    @_replies_eio_on_bugs
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE:
            if name in _DOTS:
                return self._root_attributes()
            tree = self._trees.get(os.fsdecode(name))
            if tree is None:
                raise pyfuse3.FUSEError(errno.ENOENT)  # not cached: layers come and go
            inode = self._inode_of(tree, tree.layer.root, False)
        else:
            parent = self._directory(parent_inode)
            if name == b".":
                inode = parent
            elif name == b"..":
                grandparent = parent.tree.parent_of(parent.node)
                if grandparent is None:
                    return self._root_attributes()
                inode = self._inode_of(parent.tree, grandparent, False)
            else:
                found = parent.tree.find(parent.node, name)
                if found is None:
                    return _negative_entry()
                inode = self._inode_of(parent.tree, *found)
        inode.tree.lookups += 1
        return inode.attributes()

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            tree = self._serials.get(ino >> _SERIAL_SHIFT)
            if tree is None:
                continue
            tree.lookups -= count
            # Numbers stay stable while a layer is mounted; a removed layer goes as
            # soon as the kernel lets go of all its inodes.
            if tree.lookups <= 0 and tree.removed:
                self._drop(tree)

    @_replies_eio_on_bugs
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            return self._root_attributes()
        return self._known(inode).attributes()

    @_replies_eio_on_bugs
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        known = self._known(inode)
        if known.whiteout or known.node.kind != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(known.node.link_target)

    @_replies_eio_on_bugs
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = self._known(inode).xattrs().get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_replies_eio_on_bugs
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode == pyfuse3.ROOT_INODE:
            return []
        return list(self._known(inode).xattrs())

    @_replies_eio_on_bugs
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        stats.f_bsize = stats.f_frsize = _BLOCK_SIZE
        stats.f_blocks = sum(tree.blocks for tree in self._trees.values())
        stats.f_bfree = stats.f_bavail = 0  # read-only: nothing is free to write
        stats.f_files = 1 + sum(tree.files for tree in self._trees.values())
        stats.f_ffree = stats.f_favail = 0
        stats.f_namemax = 255
        return stats

    # -- files -------------------------------------------------------------

    @_replies_eio_on_bugs
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        known = self._known(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        if known.whiteout or known.node.kind != "reg":
            raise pyfuse3.FUSEError(errno.EINVAL)
        if known.tree.observe is not None:
            _tell(known.tree, known.node, 0, 0)
        # Layers never change: pages the kernel has cached stay valid across opens.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    @_replies_eio_on_bugs
    async def read(self, fh: int, off: int, size: int) -> bytes:
        inode = self._known(fh)
        node = inode.node
        length = min(size, node.size - off)
        if length <= 0:
            return b""
        if inode.tree.observe is not None:
            _tell(inode.tree, node, off, length)
        try:
            data = await inode.tree.read(node, off, length)
        except Exception as exc:
            # The read function reports its failures (the fetcher: a warning naming the
            # layer and chunk, and a metric).
            log.debug("lazy filesystem: reading %s of layer %s failed: %s",
                      node.path, inode.tree.name, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if len(data) != length:
            # A short answer would reach the reader as zeros: fail the read instead.
            log.warning("lazy filesystem: read of %s got %d bytes, wanted %d",
                        node.path, len(data), length)
            raise pyfuse3.FUSEError(errno.EIO)
        return data

    async def release(self, fh: int) -> None:
        pass  # open() keeps no state

    # -- directories -------------------------------------------------------

    @_replies_eio_on_bugs
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            self._directory(inode)
        return inode

    @_replies_eio_on_bugs
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Positions: 0 ".", 1 "..", then the entries; an entry's next_id is its
        # position + 1, so a listing resumes right after the last entry sent.
        if fh == pyfuse3.ROOT_INODE:
            self._list_root(start_id, token)
            return
        directory = self._directory(fh)
        tree = directory.tree
        view = self._view(directory)
        for position in range(start_id, 2 + len(view.names)):
            child: _Inode | None = None
            if position == 0:
                name, attrs = b".", directory.attributes()
            elif position == 1:
                name, attrs = b"..", self._parent_attributes(directory)
            else:
                name = view.names[position - 2]
                child = self._inode_of(tree, *view.entries[name])
                attrs = child.attributes()
            if not pyfuse3.readdir_reply(token, name, attrs, position + 1):
                return
            if child is not None:  # readdirplus counts as a lookup, but not for dots
                tree.lookups += 1

    def _list_root(self, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        root = self._root_attributes()
        for position in range(start_id, 2):
            if not pyfuse3.readdir_reply(token, _DOTS[position], root, position + 1):
                return
        # A layer's position comes from its serial, so listings stay consistent
        # while layers are added and removed.
        for tree in list(self._trees.values()):
            position = tree.serial + 1
            if position < start_id:
                continue
            inode = self._inode_of(tree, tree.layer.root, False)
            name = os.fsencode(tree.name)
            if not pyfuse3.readdir_reply(token, name, inode.attributes(), position + 1):
                return
            tree.lookups += 1

    async def releasedir(self, fh: int) -> None:
        pass  # opendir() keeps no state
