"""Hostile layers at the format level and through the FUSE tree.

What tests/test_bad_input.py and tests/test_properties.py leave out: conflicting
entries for one name, parents that are symlinks out of the layer, names with NUL
characters, extended attributes beyond what Linux holds, paths thousands of levels
deep and TOCs whose missing parents would fill the disk. Each is refused with a
TOCError (or TarError for an input tar) that says why, or served as a tree that
stays inside the layer.
"""

import asyncio
import base64
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import estargz.layer
from estargz import BlobReader, BuildOptions, Compression, FileSource, TarError, TOCError, build
from estargz.layer import MAX_IMPLICIT_DIR_CHARS
from estargz.toc import (
    MAX_PATH_DEPTH,
    MAX_XATTR_LIST_BYTES,
    MAX_XATTR_NAME_BYTES,
    MAX_XATTR_VALUE_BYTES,
)

from .test_bad_input import BIG, edited, expect_toc_error, info, open_blob, tar_of
from .test_lazy_filesystem import LazyMount, serving_lazy_mount

FORMATS = [Compression.GZIP, Compression.ZSTD]
Edit = Callable[[list[dict]], object]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def appended(*extra: dict) -> Edit:
    return lambda entries: entries.extend(extra)


# -- one name, several entries ----------------------------------------------------------


@pytest.fixture(params=["names marked in the bitmap", "every name's bit taken"])
def name_memory(request, monkeypatch) -> None:
    """Each case twice: a build marks the names it gave in a bitmap and asks SQLite
    only when a name's bit is set; with a bitmap of one bit every name after the
    first is asked about."""
    if request.param != "names marked in the bitmap":
        monkeypatch.setattr(estargz.layer, "_NAME_BITS", 1)


@pytest.mark.usefixtures("name_memory")
@pytest.mark.parametrize("compression", FORMATS)
def test_a_later_entry_of_another_type_replaces_the_earlier(compression) -> None:
    """As extracting the tar would: the last entry for a name is what the layer holds."""
    blob, toc_digest = edited(compression, appended(
        {"name": "etc/hostname", "type": "dir", "mode": 0o700},  # a file becomes a directory
        {"name": "etc/hostname/inside", "type": "fifo"},
        {"name": "empty", "type": "symlink", "linkName": "/etc/passwd"},  # file -> symlink
        {"name": "fifo", "type": "dir"},
        {"name": "fifo", "type": "dir", "mode": 0o711},  # a repeated directory updates it
    ))
    reader = open_blob(blob, toc_digest)
    hostname = reader.lookup("etc/hostname")
    assert (hostname.kind, hostname.mode) == ("dir", 0o700)
    assert reader.lookup("etc/hostname/inside").kind == "fifo"
    assert reader.lookup("empty").link_target == "/etc/passwd"
    assert (reader.lookup("fifo").kind, reader.lookup("fifo").mode) == ("dir", 0o711)
    # The replaced file's chunks are no longer anyone's payload.
    assert all(c.size != len(b"workspace\n") for c in reader.layer.payload_chunks())
    assert reader.read_file(reader.lookup("bin/big")) == BIG


@pytest.mark.usefixtures("name_memory")
@pytest.mark.parametrize("compression", FORMATS)
def test_an_empty_directory_may_be_replaced_a_full_one_may_not(compression) -> None:
    blob, toc_digest = edited(compression, appended({"name": "d", "type": "dir"},
                                                    {"name": "d", "type": "fifo"}))
    assert open_blob(blob, toc_digest).lookup("d").kind == "fifo"
    expect_toc_error(compression, appended({"name": "bin", "type": "symlink",
                                            "linkName": "/usr/bin"}),
                     "replaces non-empty directory 'bin'")


@pytest.mark.usefixtures("name_memory")
@pytest.mark.parametrize("compression", FORMATS)
def test_a_hard_link_keeps_the_file_its_name_later_loses(compression) -> None:
    blob, toc_digest = edited(compression, appended({"name": "bin/big", "type": "fifo"}))
    reader = open_blob(blob, toc_digest)
    assert reader.lookup("bin/big").kind == "fifo"
    kept = reader.lookup("bin/link")  # a hard link to bin/big made before it was replaced
    assert kept.kind == "reg" and kept.nlink == 1
    assert reader.read_file(kept) == BIG


@pytest.mark.usefixtures("name_memory")
@pytest.mark.parametrize("compression", FORMATS)
def test_a_hard_link_to_a_name_whose_file_comes_later_is_refused(compression) -> None:
    expect_toc_error(compression, appended(
        {"name": "early", "type": "hardlink", "linkName": "late"},
        {"name": "late", "type": "fifo"}), "hard link target 'late' is not an earlier entry")


# -- parents that are symlinks -----------------------------------------------------------


@pytest.mark.parametrize("compression", FORMATS)
@pytest.mark.parametrize(("extra", "fragment"), [
    # A symlink out of the layer, then a name below it.
    ([{"name": "a", "type": "symlink", "linkName": "/etc"},
      {"name": "a/passwd", "type": "fifo"}], "parent 'a' is not a directory"),
    ([{"name": "a", "type": "symlink", "linkName": ".."},
      {"name": "a/b/escape", "type": "dir"}], "parent 'a' is not a directory"),
    # A name below a directory that a symlink then replaces.
    ([{"name": "a/passwd", "type": "fifo"},
      {"name": "a", "type": "symlink", "linkName": "/etc"}], "replaces non-empty directory 'a'"),
    # A hard link whose target is reached through a symlink.
    ([{"name": "a", "type": "symlink", "linkName": "/etc"},
      {"name": "l", "type": "hardlink", "linkName": "a/passwd"}],
     "hard link target 'a/passwd' is not an earlier entry"),
    ([{"name": "l", "type": "hardlink", "linkName": "bin/sym/../big"}], "'..' component"),
])
def test_names_below_a_symlink_are_refused(compression, extra: list[dict],
                                           fragment: str) -> None:
    expect_toc_error(compression, appended(*extra), fragment)


@pytest.mark.parametrize("compression", FORMATS)
def test_a_symlink_replaced_by_a_directory_holds_names_of_its_own(compression) -> None:
    blob, toc_digest = edited(compression, appended(
        {"name": "a", "type": "symlink", "linkName": "/etc"},
        {"name": "a", "type": "dir"},
        {"name": "a/passwd", "type": "fifo"}))
    reader = open_blob(blob, toc_digest)
    assert reader.lookup("a").kind == "dir" and reader.lookup("a").link_target == ""
    assert reader.lookup("a/passwd").path == "a/passwd"


# -- names the kernel would read otherwise --------------------------------------------------


@pytest.mark.parametrize("compression", FORMATS)
@pytest.mark.parametrize(("entry", "fragment"), [
    ({"name": "etc\u0000shadow", "type": "fifo"}, "contains a NUL character"),
    ({"name": "s", "type": "symlink", "linkName": "/etc\u0000x"},
     "linkName contains a NUL character"),
    ({"name": "h", "type": "hardlink", "linkName": "bin/big\u0000x"}, "NUL character"),
    ({"name": "x", "type": "fifo", "xattrs": {"user.a\u0000b": b64(b"v")}}, "NUL character"),
])
def test_nul_characters_are_refused(compression, entry: dict, fragment: str) -> None:
    expect_toc_error(compression, appended(entry), fragment)


def test_a_tar_with_a_nul_in_a_pax_name_is_refused() -> None:
    for pax in ({"path": "etc\0shadow"}, {"linkpath": "/etc\0x"}):
        tar = tar_of((info("a", tarfile.SYMTYPE, linkname="b", pax_headers=pax), b""))
        with pytest.raises(TarError, match="NUL character"):
            build(io.BytesIO(tar), io.BytesIO(), BuildOptions())


@pytest.mark.parametrize("compression", FORMATS)
def test_error_messages_quote_at_most_the_start_of_a_long_name(compression) -> None:
    name = "/" + "x" * 1_000_000
    blob, toc_digest = edited(compression, appended({"name": name, "type": "fifo"}))
    with pytest.raises(TOCError, match="is absolute") as caught:
        open_blob(blob, toc_digest)
    assert len(str(caught.value)) < 1000


# -- extended attributes -------------------------------------------------------------------


@pytest.mark.parametrize("compression", FORMATS)
def test_extended_attributes_beyond_what_linux_holds_are_refused(compression) -> None:
    many = {f"user.k{i}": b64(b"v") for i in range(100_000)}
    expect_toc_error(compression, appended({"name": "x", "type": "dir", "xattrs": many}),
                     f"xattr names take more than {MAX_XATTR_LIST_BYTES} bytes")
    big = {"user.big": b64(b"v" * (MAX_XATTR_VALUE_BYTES + 1))}
    expect_toc_error(compression, appended({"name": "x", "type": "fifo", "xattrs": big}),
                     f"more than {MAX_XATTR_VALUE_BYTES}")
    for name in ("", "user." + "n" * MAX_XATTR_NAME_BYTES):
        expect_toc_error(compression, appended({"name": "x", "type": "fifo",
                                                "xattrs": {name: b64(b"v")}}),
                         f"empty, longer than {MAX_XATTR_NAME_BYTES} bytes")


@pytest.mark.parametrize("compression", FORMATS)
def test_extended_attributes_up_to_the_limits_are_served(compression) -> None:
    # 4096 names of 15 bytes (16 with the NUL a list holds): exactly the list's limit.
    names = {f"user.k{i:09d}": b64(bytes([i % 251])) for i in range(4096)}
    value = bytes(range(256)) * (MAX_XATTR_VALUE_BYTES // 256)
    blob, toc_digest = edited(compression, appended(
        {"name": "many", "type": "fifo", "xattrs": names},
        {"name": "large", "type": "fifo", "xattrs": {"user.v": b64(value)}}))
    reader = open_blob(blob, toc_digest)
    assert len(reader.lookup("many").xattrs) == 4096
    assert reader.lookup("many").xattrs["user.k000000300"] == bytes([300 % 251])
    assert reader.lookup("large").xattrs == {"user.v": value}


def test_a_tar_with_too_many_extended_attributes_is_not_converted() -> None:
    pax = {f"SCHILY.xattr.user.k{i}": "v" for i in range(10_000)}
    tar = tar_of((info("a", pax_headers=pax), b"x"))
    with pytest.raises(TarError, match="too many extended attributes"):
        build(io.BytesIO(tar), io.BytesIO(), BuildOptions())


# -- deep paths ------------------------------------------------------------------------------


def deep(depth: int, top: str = "d") -> str:
    return "/".join([top] + ["d"] * (depth - 1))


@pytest.mark.parametrize("compression", FORMATS)
def test_a_path_ten_thousand_levels_deep_is_served(compression) -> None:
    path = deep(10_000) + "/f"
    blob, toc_digest = edited(compression, appended({"name": path, "type": "fifo"}))
    reader = open_blob(blob, toc_digest)
    assert reader.lookup(path).kind == "fifo"
    assert reader.lookup(deep(5_000)).implicit


@pytest.mark.parametrize("compression", FORMATS)
def test_deeper_paths_are_refused_before_they_are_split(compression) -> None:
    expect_toc_error(compression, appended({"name": deep(MAX_PATH_DEPTH + 1), "type": "fifo"}),
                     f"more than {MAX_PATH_DEPTH} components deep")
    expect_toc_error(compression, appended(
        {"name": "l", "type": "hardlink", "linkName": deep(MAX_PATH_DEPTH + 1)}),
        f"more than {MAX_PATH_DEPTH} components deep")


def test_parents_a_toc_leaves_out_have_a_budget() -> None:
    # A few hundred bytes of compressed TOC would otherwise write gigabytes of paths:
    # each of these names implies 16000 directories that store their whole path.
    names = [{"name": f"c{i}/" + deep(16_000) + "/f", "type": "fifo"} for i in range(8)]
    blob, toc_digest = edited(Compression.ZSTD, appended(*names))
    assert len(blob) < 10_000
    with pytest.raises(TOCError, match=f"more than {MAX_IMPLICIT_DIR_CHARS} characters"):
        open_blob(blob, toc_digest)


# -- through the FUSE tree -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lazy_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LazyMount]:
    """One FUSE mount for the module (pyfuse3 allows one per process)."""
    with serving_lazy_mount(tmp_path_factory.mktemp("hostilefs"), "hostile-fuse") as mount:
        yield mount


def serve(mount: LazyMount, name: str, compression: Compression, edit: Edit) -> Path:
    blob, toc_digest = edited(compression, edit)
    reader = BlobReader.open(FileSource(io.BytesIO(blob)), toc_digest)

    async def read(node, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(reader.read_file, node, offset, length)

    return mount.add(name, reader.layer, read)


def test_fuse_tree_keeps_names_under_real_directories(lazy_mount: LazyMount,
                                                      tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = serve(lazy_mount, "symlinks", Compression.GZIP, appended(
        {"name": "a", "type": "symlink", "linkName": str(outside)},
        {"name": "a", "type": "dir"},
        {"name": "a/inside", "type": "fifo"},
        {"name": "up", "type": "symlink", "linkName": "../../.."}))
    try:
        a = root / "a"
        assert stat.S_ISDIR(a.lstat().st_mode) and not a.is_symlink()
        assert os.listdir(a) == ["inside"]
        assert stat.S_ISFIFO((a / "inside").lstat().st_mode)
        assert os.path.realpath(a / "inside") == str(a / "inside")
        # A symlink is data: shown as the TOC says, never resolved by the layer itself.
        assert os.readlink(root / "up") == "../../.."
        assert stat.S_ISLNK((root / "up").lstat().st_mode)
        assert list(outside.iterdir()) == []
    finally:
        lazy_mount.remove("symlinks")


def test_fuse_tree_ten_thousand_levels_deep(lazy_mount: LazyMount) -> None:
    root = serve(lazy_mount, "deep", Compression.ZSTD,
                 appended({"name": deep(10_000) + "/f", "type": "fifo"}))
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(10_000):  # each level by its own fd: the path is past PATH_MAX
            fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
            if len(fds) > 64:
                os.close(fds.pop(1))
        assert os.listdir(fds[-1]) == ["f"]
        assert stat.S_ISFIFO(os.stat("f", dir_fd=fds[-1], follow_symlinks=False).st_mode)
        parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1])
        fds.append(parent)
        assert os.listdir(parent) == ["d"]
    finally:
        for fd in fds:
            os.close(fd)
        lazy_mount.remove("deep")


def test_fuse_tree_lists_extended_attributes_up_to_the_limit(lazy_mount: LazyMount) -> None:
    names = {f"user.k{i:09d}": b64(b"v") for i in range(4096)}
    root = serve(lazy_mount, "xattrs", Compression.GZIP,
                 appended({"name": "many", "type": "dir", "xattrs": names}))
    try:
        listed = os.listxattr(root / "many")
        assert sorted(listed) == sorted(names)
        assert os.getxattr(root / "many", "user.k000004095") == b"v"
    finally:
        lazy_mount.remove("xattrs")
