"""The lazy filesystem on a real FUSE mount, alone and as overlayfs lower layers.

One mount serves the whole module (pyfuse3 allows one per process, as in the
node service); its asyncio loop runs in a background thread. Each test adds its
own layers and removes them again.
"""

import asyncio
import contextlib
import errno
import hashlib
import io
import math
import os
import stat
import struct
import subprocess
import tarfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from estargz import BlobReader, BuildOptions, FileSource, Layer, Node, build
from snapshotter.lazy.filesystem import LazyFilesystem, ReadFn

from .fixtures.containerd import unmount_below
from .layers import big_payload, coverage_tar, stdlib_dir

CHUNK = 16 << 10
# A file capability the kernel accepts (v2, effective, cap_net_raw).
VALID_CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
STDLIB_SLICE = {
    "asyncio", "collections", "concurrent", "email", "encodings", "html", "http",
    "importlib", "json", "logging", "unittest", "urllib", "xml", "zoneinfo",
}

# -- building blobs and tars --------------------------------------------------


@dataclass
class Blob:
    reader: BlobReader

    @property
    def layer(self) -> Layer:
        return self.reader.layer

    async def read(self, node: Node, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self.reader.read_file, node, offset, length)


def make_blob(tar_bytes: bytes, path: Path, sources: list[FileSource]) -> Blob:
    with open(path, "wb") as out:
        result = build(io.BytesIO(tar_bytes), out, BuildOptions(chunk_size=CHUNK))
    source = FileSource.open(str(path))
    sources.append(source)
    return Blob(BlobReader.open(source, result.toc_digest))


def add_member(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE,
               data: bytes = b"", **fields: Any) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_650_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data else None)


def tar_of(build_members: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build_members(tar)
    return buf.getvalue()


def full_coverage_tar() -> bytes:
    """coverage_tar (multi-chunk files) plus a valid file capability and overlay
    xattrs from the image, which must not reach overlayfs."""
    def members(tar: tarfile.TarFile) -> None:
        for info in source.getmembers():
            tar.addfile(info, source.extractfile(info) if info.isreg() else None)
        caps = {"SCHILY.xattr.security.capability": VALID_CAPABILITY.decode()}
        add_member(tar, "usr/bin/capable", data=b"#!/bin/true\n", mode=0o755, pax_headers=caps)
        redirect = {"SCHILY.xattr.trusted.overlay.redirect": "/etc",
                    "SCHILY.xattr.user.kept": "yes"}
        add_member(tar, "srv", tarfile.DIRTYPE, uid=7, gid=8, pax_headers=redirect)
        add_member(tar, "srv/.wh..wh.plnk", tarfile.DIRTYPE)  # aufs bookkeeping
        add_member(tar, "srv/data", data=b"data\n", mode=0o640, uid=7, gid=8)

    with tarfile.open(fileobj=io.BytesIO(coverage_tar(big_size=300_000))) as source:
        return tar_of(members)


# -- the expected tree, from tar headers ------------------------------------------


@dataclass(eq=False)
class Want:
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0
    target: str = ""
    rdev: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    data: bytes = b""
    nlink: int = 1


def clean(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def expected_tree(tar_bytes: bytes) -> dict[str, Want]:
    """What overlayfs should see of a layer: the tar's entries, implicit parents
    as 0755 root directories, whiteouts as 0/0 character devices, opaque markers
    as an xattr, and no image-supplied overlay xattrs."""
    tree: dict[str, Want] = {"": Want(stat.S_IFDIR | 0o755)}
    kinds = {tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK,
             tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
             tarfile.FIFOTYPE: stat.S_IFIFO}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for info in tar.getmembers():
            path = clean(info.name)
            parts = path.split("/")
            for depth in range(1, len(parts)):
                tree.setdefault("/".join(parts[:depth]), Want(stat.S_IFDIR | 0o755))
            if info.islnk():
                tree[path] = tree[clean(info.linkname)]
                tree[path].nlink += 1
                continue
            name = parts[-1]
            if name == ".wh..wh..opq":
                tree["/".join(parts[:-1])].xattrs["trusted.overlay.opaque"] = b"y"
                continue
            if name.startswith(".wh..wh."):
                continue
            if name.startswith(".wh."):
                hidden = "/".join([*parts[:-1], name[4:]])
                tree[hidden] = Want(stat.S_IFCHR, info.uid, info.gid, int(info.mtime))
                continue
            want = Want(kinds.get(info.type, stat.S_IFREG) | info.mode, info.uid, info.gid,
                        int(info.mtime))
            if info.issym():
                want.mode = stat.S_IFLNK | 0o777
                want.target = info.linkname
                want.size = len(info.linkname.encode())
            elif info.isdev():
                want.rdev = os.makedev(info.devmajor, info.devminor)
            elif info.isreg():
                want.data = tar.extractfile(info).read()  # type: ignore[union-attr]
                want.size = len(want.data)
            want.xattrs = {
                key.removeprefix("SCHILY.xattr."): value.encode("utf-8", "surrogateescape")
                for key, value in info.pax_headers.items()
                if key.startswith("SCHILY.xattr.") and "trusted.overlay." not in key
            }
            if stat.S_ISDIR(want.mode) and path in tree:
                want.xattrs.update(tree[path].xattrs)
            tree[path] = want
    for path, want in tree.items():
        if stat.S_ISDIR(want.mode):
            want.nlink = 2 + sum(
                1 for other, child in tree.items()
                if other and other.rpartition("/")[0] == path and stat.S_ISDIR(child.mode)
            )
    return tree


def kernel_view_of(xattrs: dict[str, bytes]) -> dict[str, object]:
    # The kernel validates security.capability on the way out: a malformed value
    # (like the one coverage_tar carries) reads as EINVAL from any filesystem.
    out: dict[str, object] = dict(xattrs)
    cap = xattrs.get("security.capability")
    if cap is not None and len(cap) not in (20, 24):
        out["security.capability"] = errno.EINVAL
    return out


def signature(want: Want) -> dict[str, object]:
    return {
        "mode": oct(want.mode), "uid": want.uid, "gid": want.gid,
        "times": (want.mtime,) * 3, "size": want.size, "nlink": want.nlink,
        "rdev": want.rdev, "target": want.target, "xattrs": kernel_view_of(want.xattrs),
        "sha256": hashlib.sha256(want.data).hexdigest() if stat.S_ISREG(want.mode) else None,
    }


# -- the mounted tree, through the kernel ------------------------------------------


def walk(
    root: Path, selected: Callable[[str], bool] = lambda path: True
) -> Iterator[tuple[str, os.DirEntry[str] | None]]:
    """Every path below `root` (relative, "" first) that `selected` keeps."""
    yield "", None
    stack = [""]
    while stack:
        relative = stack.pop()
        with os.scandir(root / relative) as entries:
            for entry in entries:
                path = f"{relative}/{entry.name}" if relative else entry.name
                if not selected(path):
                    continue
                yield path, entry
                if entry.is_dir(follow_symlinks=False):
                    stack.append(path)


def observed(path: Path, entry: os.DirEntry[str] | None) -> dict[str, object]:
    st = os.lstat(path)
    if entry is not None:  # the type readdir reported agrees with lstat
        assert entry.is_dir(follow_symlinks=False) == stat.S_ISDIR(st.st_mode), path
        assert entry.is_symlink() == stat.S_ISLNK(st.st_mode), path
        assert entry.inode() == st.st_ino, path
    xattrs: dict[str, object] = {}
    for name in os.listxattr(path, follow_symlinks=False):
        try:
            xattrs[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            xattrs[name] = exc.errno
    sha = None
    if stat.S_ISREG(st.st_mode):
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return {
        "mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
        "times": (st.st_atime_ns // 10**9, st.st_mtime_ns // 10**9, st.st_ctime_ns // 10**9),
        "size": st.st_size, "nlink": st.st_nlink,
        "rdev": st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
        "target": os.readlink(path) if stat.S_ISLNK(st.st_mode) else "",
        "xattrs": xattrs, "sha256": sha,
    }


# -- the mount ----------------------------------------------------------------


def mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


@dataclass
class LazyMount:
    fs: LazyFilesystem
    loop: asyncio.AbstractEventLoop
    base: Path
    sources: list[FileSource] = field(default_factory=list)
    counter: int = 0

    def on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on the filesystem's loop, as the node service would."""
        async def call() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=30)

    def blob(self, tar_bytes: bytes) -> Blob:
        self.counter += 1
        return make_blob(tar_bytes, self.base / f"blob-{self.counter}", self.sources)

    def add(self, name: str, layer: Layer, read: ReadFn) -> Path:
        return Path(self.on_loop(self.fs.add_layer, name, layer, read))

    def remove(self, name: str) -> None:
        self.on_loop(self.fs.remove_layer, name)


@contextlib.contextmanager
def serving_lazy_mount(base: Path, thread_name: str) -> Iterator[LazyMount]:
    """A LazyFilesystem mounted at BASE/mnt, served by an event loop in its own thread
    (pyfuse3 allows one mount per process); closed on the way out, which must leave no
    mount behind, nor may the tests that used it."""
    mountpoint = base / "mnt"
    mountpoint.mkdir()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=thread_name, daemon=True)
    thread.start()
    fs = LazyFilesystem(str(mountpoint))
    mount = LazyMount(fs, loop, base)
    try:
        asyncio.run_coroutine_threadsafe(fs.start(), loop).result(timeout=30)
        assert str(mountpoint) in mounts_below(base)
        yield mount
    finally:
        leftovers_before_close = [p for p in mounts_below(base) if p != str(mountpoint)]
        unmount_below(base / "ovl")  # overlays of a failed test, before their lower goes
        try:
            asyncio.run_coroutine_threadsafe(fs.close(), loop).result(timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()
            for source in mount.sources:
                source.close()
            leftovers = mounts_below(base)
            unmount_below(base)
        assert not leftovers, f"still mounted after close: {leftovers}"
        assert not leftovers_before_close, f"a test left mounts behind: {leftovers_before_close}"


@pytest.fixture(scope="module")
def lazy_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LazyMount]:
    with serving_lazy_mount(tmp_path_factory.mktemp("lazyfs"), "lazy-fuse") as mount:
        yield mount


@pytest.fixture
def layers(lazy_mount: LazyMount) -> Iterator[LazyMount]:
    """The module's mount; layers a test adds are removed when it ends."""
    before = set(lazy_mount.on_loop(lazy_mount.fs.layer_names))
    yield lazy_mount
    for name in set(lazy_mount.on_loop(lazy_mount.fs.layer_names)) - before:
        lazy_mount.remove(name)


def drop_kernel_dentries_and_inodes() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


# -- tests -----------------------------------------------------------------------


def test_tree_matches_the_tar_entry_for_entry(layers: LazyMount) -> None:
    tar_bytes = full_coverage_tar()
    blob = layers.blob(tar_bytes)
    root = layers.add("coverage", blob.layer, blob.read)
    want = expected_tree(tar_bytes)

    seen: dict[str, dict[str, object]] = {}
    inodes: dict[int, set[str]] = {}
    for path, entry in walk(root):
        seen[path] = observed(root / path, entry)
        inodes.setdefault(os.lstat(root / path).st_ino, set()).add(path)

    assert sorted(seen) == sorted(want)  # also: markers and landmark hidden
    for path in want:
        assert seen[path] == signature(want[path]), path
    # Hard links are one inode; everything else has its own.
    groups: dict[int, set[str]] = {}
    for path, w in want.items():
        groups.setdefault(id(w), set()).add(path)
    assert sorted(map(sorted, inodes.values())) == sorted(map(sorted, groups.values()))
    assert {"usr/bin/tool", "usr/bin/tool-link"} in inodes.values()

    # Spot checks of what the comparison covers, against literal values.
    assert seen["var/cache"]["mode"] == oct(stat.S_IFCHR) and seen["var/cache"]["rdev"] == 0
    assert seen["opt"]["xattrs"] == {"trusted.overlay.opaque": b"y"}
    assert seen["srv"]["xattrs"] == {"user.kept": b"yes"}
    assert seen["usr/bin/capable"]["xattrs"] == {"security.capability": VALID_CAPABILITY}
    assert seen["usr/bin/tool"]["mode"] == oct(stat.S_IFREG | 0o4755)
    assert seen["dev/sda"]["rdev"] == os.makedev(8, 0)
    for hidden in ("opt/.wh..wh..opq", "var/.wh.cache", ".no.prefetch.landmark",
                   "srv/.wh..wh.plnk"):
        with pytest.raises(FileNotFoundError):
            os.lstat(root / hidden)
    assert (root / "usr/bin/tool").read_bytes() == big_payload(300_000)


def in_stdlib_slice(path: str) -> bool:
    parts = path.split("/")
    if "__pycache__" in parts:
        return False
    return parts[0] in STDLIB_SLICE or (len(parts) == 1 and parts[0].endswith(".py"))


def test_stdlib_slice_matches_its_source_tree(layers: LazyMount) -> None:
    source = Path(stdlib_dir())

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        path = clean(info.name)
        return info if not path or in_stdlib_slice(path) else None

    tar_bytes = tar_of(lambda tar: tar.add(source, arcname=".", filter=keep))
    blob = layers.blob(tar_bytes)
    root = layers.add("stdlib", blob.layer, blob.read)

    expected: dict[str, dict[str, object]] = {}
    subdirs: dict[str, int] = {}
    for path, _ in walk(source, in_stdlib_slice):
        st = os.lstat(source / path)
        mtime = math.floor(st.st_mtime + 0.5)
        expected[path] = {
            "mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
            "times": (mtime,) * 3,
            "size": 0 if stat.S_ISDIR(st.st_mode) else st.st_size,
            "target": os.readlink(source / path) if stat.S_ISLNK(st.st_mode) else "",
            "sha256": hashlib.sha256((source / path).read_bytes()).hexdigest()
            if stat.S_ISREG(st.st_mode) else None,
        }
        if stat.S_ISDIR(st.st_mode) and path:
            parent = path.rpartition("/")[0]
            subdirs[parent] = subdirs.get(parent, 0) + 1

    seen: dict[str, dict[str, object]] = {}
    for path, entry in walk(root):
        view = observed(root / path, entry)
        nlink = view.pop("nlink")
        if stat.S_ISDIR(int(str(view["mode"]), 8)):
            assert nlink == 2 + subdirs.get(path, 0), path
        for unused in ("rdev", "xattrs"):
            view.pop(unused)
        seen[path] = view
    assert len(expected) > 400
    assert sorted(seen) == sorted(expected)
    for path in expected:
        assert seen[path] == expected[path], path


def test_overlay_uses_two_lazy_layers_as_lowerdirs(layers: LazyMount) -> None:
    def lower(tar: tarfile.TarFile) -> None:
        add_member(tar, "etc", tarfile.DIRTYPE)
        add_member(tar, "etc/a", data=b"a from base\n")
        add_member(tar, "etc/b", data=b"b from base\n")
        add_member(tar, "gone", data=b"deleted above\n")
        add_member(tar, "gonedir", tarfile.DIRTYPE)
        add_member(tar, "gonedir/f", data=b"f\n")
        add_member(tar, "opq", tarfile.DIRTYPE)
        add_member(tar, "opq/old", data=b"old\n")
        add_member(tar, "opq/sub", tarfile.DIRTYPE)
        add_member(tar, "opq/sub/deep", data=b"deep\n")
        add_member(tar, "keep", tarfile.DIRTYPE)
        add_member(tar, "keep/old", data=b"kept\n")
        add_member(tar, "dev", tarfile.DIRTYPE)
        add_member(tar, "dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)

    def upper(tar: tarfile.TarFile) -> None:
        add_member(tar, ".wh.gone")
        add_member(tar, ".wh.gonedir")
        add_member(tar, "opq", tarfile.DIRTYPE)
        add_member(tar, "opq/.wh..wh..opq")
        add_member(tar, "opq/new", data=b"new\n")
        # An image cannot make a directory opaque through the xattr itself.
        opaque = {"SCHILY.xattr.trusted.overlay.opaque": "y"}
        add_member(tar, "keep", tarfile.DIRTYPE, pax_headers=opaque)
        add_member(tar, "keep/added", data=b"added\n")
        add_member(tar, "etc", tarfile.DIRTYPE)
        add_member(tar, "etc/b", data=b"b from top\n")
        add_member(tar, "etc/c", data=b"c from top\n")

    base_blob, top_blob = layers.blob(tar_of(lower)), layers.blob(tar_of(upper))
    base = layers.add("base", base_blob.layer, base_blob.read)
    top = layers.add("top", top_blob.layer, top_blob.read)
    assert stat.S_ISCHR(os.lstat(top / "gone").st_mode) and os.lstat(top / "gone").st_rdev == 0
    assert os.getxattr(top / "opq", "trusted.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(top / "keep")

    ovl = layers.base / "ovl"
    merged, upperdir, workdir = ovl / "merged", ovl / "upper", ovl / "work"
    for d in (merged, upperdir, workdir):
        d.mkdir(parents=True)
    options = f"lowerdir={top}:{base},upperdir={upperdir},workdir={workdir}"
    if os.path.exists("/sys/module/overlay/parameters/index"):
        options += ",index=off"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
                   check=True, capture_output=True)
    try:
        assert sorted(os.listdir(merged)) == ["dev", "etc", "keep", "opq"]
        assert sorted(os.listdir(merged / "opq")) == ["new"]
        assert not (merged / "opq/sub").exists()
        assert not (merged / "gone").exists() and not (merged / "gonedir").exists()
        assert sorted(os.listdir(merged / "keep")) == ["added", "old"]
        assert sorted(os.listdir(merged / "etc")) == ["a", "b", "c"]
        assert (merged / "etc/a").read_bytes() == b"a from base\n"
        assert (merged / "etc/b").read_bytes() == b"b from top\n"
        assert (merged / "keep/old").read_bytes() == b"kept\n"

        # Writes go to the upper directory; the lazy layers stay as they were.
        with open(merged / "etc/a", "ab") as f:
            f.write(b"appended\n")
        (merged / "gone").write_bytes(b"back again\n")
        (merged / "etc/c").unlink()
        assert (upperdir / "etc/a").read_bytes() == b"a from base\nappended\n"
        assert (upperdir / "gone").read_bytes() == b"back again\n"
        assert stat.S_ISCHR(os.lstat(upperdir / "etc/c").st_mode)  # overlay's own whiteout
        assert sorted(os.listdir(merged / "etc")) == ["a", "b"]
        assert (base / "etc/a").read_bytes() == b"a from base\n"
        assert (top / "etc/c").read_bytes() == b"c from top\n"
        # Device nodes of a lazy layer work inside the overlay (not on the FUSE mount).
        with open(merged / "dev/null", "wb") as f:
            assert f.write(b"discarded") == 9
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_failed_reads_give_eio_and_other_files_still_read(layers: LazyMount) -> None:
    def members(tar: tarfile.TarFile) -> None:
        add_member(tar, "good", data=b"good\n")
        add_member(tar, "broken", data=b"never read\n")
        add_member(tar, "short", data=b"only partly there\n")
        add_member(tar, "tail-broken", data=big_payload(400_000))

    blob = layers.blob(tar_of(members))

    async def flaky_read(node: Node, offset: int, length: int) -> bytes:
        if node.path == "broken":
            raise RuntimeError("registry went away")
        # Beyond what the kernel reads ahead (128 KiB) for a read at offset 0.
        if node.path == "tail-broken" and offset + length > 300_000:
            raise ConnectionError("range request failed")
        data = await blob.read(node, offset, length)
        return data[:-1] if node.path == "short" else data

    root = layers.add("flaky", blob.layer, flaky_read)
    for name in ("broken", "short", "broken"):
        with pytest.raises(OSError) as failure:
            (root / name).read_bytes()
        assert failure.value.errno == errno.EIO, name
    fd = os.open(root / "tail-broken", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == big_payload(400_000)[:4096]
        with pytest.raises(OSError) as failure:
            os.pread(fd, 4096, 390_000)
        assert failure.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert (root / "good").read_bytes() == b"good\n"
    assert os.stat(root / "broken").st_size == len(b"never read\n")


def test_the_tree_refuses_writes(layers: LazyMount) -> None:
    def members(tar: tarfile.TarFile) -> None:
        add_member(tar, "dir", tarfile.DIRTYPE, mode=0o777)
        add_member(tar, "dir/file", data=b"content\n", mode=0o666)
        add_member(tar, "null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)

    blob = layers.blob(tar_of(members))
    root = layers.add("readonly", blob.layer, blob.read)
    mountpoint = Path(layers.fs.mountpoint)
    attempts: dict[str, Callable[[], object]] = {
        "open for writing": lambda: os.open(root / "dir/file", os.O_RDWR),
        "truncate": lambda: os.truncate(root / "dir/file", 0),
        "create": lambda: (root / "dir/new").write_bytes(b"x"),
        "mkdir": lambda: (root / "dir/sub").mkdir(),
        "mkdir at the mount's root": lambda: (mountpoint / "sneaky").mkdir(),
        "unlink": lambda: (root / "dir/file").unlink(),
        "rmdir": lambda: (root / "dir").rmdir(),
        "rename": lambda: (root / "dir/file").rename(root / "dir/moved"),
        "chmod": lambda: os.chmod(root / "dir/file", 0o600),
        "chown": lambda: os.chown(root / "dir/file", 1, 1),
        "utime": lambda: os.utime(root / "dir/file", (0, 0)),
        "setxattr": lambda: os.setxattr(root / "dir/file", "user.x", b"1"),
        "symlink": lambda: os.symlink("x", root / "dir/link"),
        "link": lambda: os.link(root / "dir/file", root / "dir/hard"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as failure:
            attempt()
        assert failure.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), what
    # nodev: an image's device node cannot be opened straight from the mount.
    with pytest.raises(PermissionError):
        os.open(root / "null", os.O_RDONLY)
    assert (root / "dir/file").read_bytes() == b"content\n"
    assert sorted(os.listdir(root / "dir")) == ["file"]


def test_kernel_page_cache_serves_repeated_reads(layers: LazyMount) -> None:
    payload = big_payload(1 << 20, seed=3)

    def members(tar: tarfile.TarFile) -> None:
        add_member(tar, "small", data=b"small file\n")
        add_member(tar, "big", data=payload)

    blob = layers.blob(tar_of(members))
    calls: dict[str, int] = {}

    async def counting_read(node: Node, offset: int, length: int) -> bytes:
        calls[node.path] = calls.get(node.path, 0) + 1
        return await blob.read(node, offset, length)

    root = layers.add("cached", blob.layer, counting_read)
    for _ in range(3):
        assert (root / "small").read_bytes() == b"small file\n"
    assert calls == {"small": 1}
    assert (root / "big").read_bytes() == payload
    first_pass = calls["big"]
    assert first_pass >= 1
    assert (root / "big").read_bytes() == payload
    with open(root / "big", "rb") as f:
        f.seek(500_000)
        assert f.read(1000) == payload[500_000:501_000]
    assert calls == {"small": 1, "big": first_pass}


def test_layers_come_and_go_and_large_directories_list_fully(layers: LazyMount) -> None:
    names = [f"entry-{i:05d}-{'x' * 60}" for i in range(3000)]

    def crowded(tar: tarfile.TarFile) -> None:
        add_member(tar, "many", tarfile.DIRTYPE)
        for name in names:
            add_member(tar, f"many/{name}", data=name.encode())

    def single(content: bytes) -> bytes:
        return tar_of(lambda tar: add_member(tar, "version", data=content))

    mountpoint = Path(layers.fs.mountpoint)
    crowded_blob = layers.blob(tar_of(crowded))
    v1, v2 = layers.blob(single(b"one\n")), layers.blob(single(b"two\n"))
    root = layers.add("crowded", crowded_blob.layer, crowded_blob.read)
    listed = os.listdir(root / "many")
    assert len(listed) == len(names) and sorted(listed) == names
    assert (root / "many" / names[2999]).read_bytes() == names[2999].encode()

    swapped = layers.add("swapped", v1.layer, v1.read)
    assert {"crowded", "swapped"} <= set(os.listdir(mountpoint))
    assert (swapped / "version").read_bytes() == b"one\n"
    layers.remove("swapped")
    assert "swapped" not in os.listdir(mountpoint)
    # The kernel had MOUNT/swapped cached for a day; removal must reach it.
    assert not swapped.exists()
    assert layers.add("swapped", v2.layer, v2.read) == swapped
    assert (swapped / "version").read_bytes() == b"two\n"
    with pytest.raises(ValueError):
        layers.add("swapped", v1.layer, v1.read)
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError):
            layers.add(bad, v1.layer, v1.read)

    stats = os.statvfs(mountpoint)
    assert stats.f_bfree == 0 and stats.f_bavail == 0 and stats.f_namemax == 255
    assert stats.f_files > len(names) and stats.f_blocks > 0


def test_removed_layers_stay_usable_until_the_kernel_forgets_them(layers: LazyMount) -> None:
    tar_bytes = full_coverage_tar()
    blob = layers.blob(tar_bytes)

    def references() -> int:
        return layers.on_loop(lambda: layers.fs.kernel_references)  # type: ignore[no-any-return]

    def retained() -> list[str]:
        return layers.on_loop(layers.fs.retained_layer_names)  # type: ignore[no-any-return]

    def settled_references() -> int:
        drop_kernel_dentries_and_inodes()  # the kernel sends FORGET for what it drops
        count, deadline = references(), time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if references() == count:
                return count
            count = references()
        return count

    baseline = settled_references()
    root = layers.add("forgettable", blob.layer, blob.read)
    for path, _ in walk(root):  # readdirplus and lookups both make the kernel hold inodes
        os.lstat(root / path)
    distinct = {id(want) for want in expected_tree(tar_bytes).values()}  # hard links share
    assert references() >= baseline + len(distinct)
    file_fd = os.open(root / "usr/bin/tool", os.O_RDONLY)  # its dentry came from readdirplus
    try:
        layers.remove("forgettable")
        assert not root.exists()
        assert retained() == ["forgettable"]
        assert os.pread(file_fd, 1000, 250_000) == big_payload(300_000)[250_000:251_000]
    finally:
        os.close(file_fd)
    assert settled_references() == baseline
    assert retained() == []  # every inode forgotten: the layer is gone for good

    # Reached by lookups alone (nothing listed), then held open across removal.
    root = layers.add("forgettable", blob.layer, blob.read)
    file_fd = os.open(root / "usr/bin/tool", os.O_RDONLY)
    dir_fd = os.open(root / "usr/bin", os.O_RDONLY | os.O_DIRECTORY)
    try:
        layers.remove("forgettable")
        assert not root.exists()
        assert settled_references() > baseline and retained() == ["forgettable"]
        # The kernel still holds these inodes, so they must still answer.
        assert os.pread(file_fd, 1000, 250_000) == big_payload(300_000)[250_000:251_000]
        assert os.fstat(file_fd).st_size == 300_000
        assert "tool-link" in os.listdir(dir_fd)
    finally:
        os.close(file_fd)
        os.close(dir_fd)
    assert settled_references() == baseline
    assert retained() == []


def test_kernel_caches_entries_and_attributes(layers: LazyMount) -> None:
    blob = layers.blob(tar_of(lambda tar: add_member(tar, "present", data=b"here\n")))
    root = layers.add("metadata", blob.layer, blob.read)
    fs = layers.fs
    calls: dict[str, int] = {"lookup": 0, "getattr": 0}

    def counted(name: str) -> Callable[..., Awaitable[Any]]:
        handler = getattr(fs, name)

        async def counting(inode: int, *args: Any) -> Any:
            # The mount's own root has a short attribute timeout: it lists layers.
            if inode != pyfuse3.ROOT_INODE:
                calls[name] += 1
            return await handler(inode, *args)
        return counting

    # pyfuse3 looks handlers up on the instance for every request.
    for name in calls:
        setattr(fs, name, counted(name))
    try:
        for _ in range(3):
            assert os.stat(root / "present").st_size == 5
            assert not (root / "absent").exists()  # negative entries are cached too
    finally:
        for name in calls:
            delattr(fs, name)
    assert calls == {"lookup": 2, "getattr": 0}  # present, absent
