"""A lazy layer written out as a plain directory (snapshotter/lazy/materialize.py):
entry for entry what the FUSE mount presents, usable by overlayfs the same way, and
whole or absent whatever goes wrong."""

import errno
import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from estargz import Node
from snapshotter.lazy.layer_files import tree_path
from snapshotter.lazy.materialize import materialize

from .layers import big_payload, coverage_tar
from .test_lazy_filesystem import (
    VALID_CAPABILITY,
    LazyMount,
    add_member,
    expected_tree,
    observed,
    serving_lazy_mount,
    signature,
    tar_of,
    walk,
)

BIG = 5_000_000  # more than one read of the writer


def written_out_tar() -> bytes:
    """Every kind of entry (coverage_tar without its malformed capability, which no
    filesystem takes), a file larger than one read, hard links to it, a valid
    capability and overlay xattrs from the image."""
    def members(tar: tarfile.TarFile) -> None:
        for info in source.getmembers():
            tar.addfile(info, source.extractfile(info) if info.isreg() else None)
        caps = {"SCHILY.xattr.security.capability": VALID_CAPABILITY.decode("latin-1")}
        add_member(tar, "usr/bin/capable", data=b"#!/bin/true\n", mode=0o755, pax_headers=caps)
        redirect = {"SCHILY.xattr.trusted.overlay.redirect": "/etc",
                    "SCHILY.xattr.user.kept": "yes"}
        add_member(tar, "srv", tarfile.DIRTYPE, uid=7, gid=8, mode=0o750, pax_headers=redirect)
        add_member(tar, "srv/.wh..wh.plnk", tarfile.DIRTYPE)  # aufs bookkeeping
        add_member(tar, "srv/data", data=b"data\n", mode=0o640, uid=7, gid=8)
        add_member(tar, "srv/big", data=big_payload(BIG), mode=0o600)
        add_member(tar, "srv/big-link", tarfile.LNKTYPE, linkname="srv/big")
        add_member(tar, "ro", tarfile.DIRTYPE, mode=0o555)
        add_member(tar, "ro/inside", data=b"x", mode=0o444)

    with tarfile.open(fileobj=io.BytesIO(coverage_tar(tarfile.GNU_FORMAT, 300_000))) as source:
        return tar_of(members)


def comparable(seen: dict[str, object]) -> dict[str, object]:
    """A written tree's atimes, ctimes and directory sizes are its filesystem's own;
    all else must match, mtimes too."""
    times = seen.pop("times")
    assert isinstance(times, tuple)
    if str(seen["mode"]).startswith("0o40"):
        seen.pop("size")
    return {**seen, "mtime": times[1]}


def tree_of(root: Path) -> tuple[dict[str, dict[str, object]], list[list[str]]]:
    """Every entry below `root` as observed, and its hard-link groups."""
    seen: dict[str, dict[str, object]] = {}
    inodes: dict[int, list[str]] = {}
    for path, entry in walk(root):
        seen[path] = comparable(observed(root / path, entry))
        inodes.setdefault(os.lstat(root / path).st_ino, []).append(path)
    return seen, sorted(sorted(group) for group in inodes.values())


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LazyMount]:
    """A FUSE mount, to compare the written tree with, and its event loop."""
    with serving_lazy_mount(tmp_path_factory.mktemp("written"), "written-fuse") as mount:
        yield mount


def write_out(mount: LazyMount, layer: object, read: object, directory: Path) -> object:
    return mount.on_loop(materialize, layer, read, str(directory))


def test_written_tree_is_the_fuse_view_entry_for_entry(layers: LazyMount,
                                                       tmp_path: Path) -> None:
    tar_bytes = written_out_tar()
    blob = layers.blob(tar_bytes)
    fuse_root = layers.add("written", blob.layer, blob.read)
    (tmp_path / "snap").mkdir()
    written = write_out(layers, blob.layer, blob.read, tmp_path / "snap")
    tree = Path(tree_path(str(tmp_path / "snap")))

    through_fuse, fuse_links = tree_of(fuse_root)
    on_disk, disk_links = tree_of(tree)
    assert on_disk == through_fuse
    assert disk_links == fuse_links
    # and both as the tar says (mtimes from its headers)
    want = expected_tree(tar_bytes)
    assert sorted(on_disk) == sorted(want)
    for path, w in want.items():
        assert on_disk[path] == comparable(signature(w)), path
    assert ["srv/big", "srv/big-link"] in disk_links
    assert on_disk["srv/big"]["nlink"] == 2
    assert on_disk["var/cache"]["mode"] == oct(0o20000) and on_disk["var/cache"]["rdev"] == 0
    assert on_disk["opt"]["xattrs"] == {"trusted.overlay.opaque": b"y"}
    assert on_disk["srv"]["xattrs"] == {"user.kept": b"yes"}
    assert on_disk["usr/bin/tool"]["mode"] == oct(0o104755)  # setuid kept after chown
    assert on_disk["ro"]["mode"] == oct(0o40555)
    assert (tree / "srv/big").read_bytes() == big_payload(BIG)
    regular = sum(w.size for p, w in want.items() if w.data and p != "srv/big-link"
                  and p != "deep/long-hardlink" and p != "usr/bin/tool-link")
    assert (written.entries, written.bytes, written.existed) == (  # type: ignore[attr-defined]
        len(want) - 1, regular, False)
    # nothing but the tree is left in the snapshot's directory
    assert os.listdir(tmp_path / "snap") == ["tree"]


def test_overlayfs_takes_the_tree_as_a_lower_layer(layers: LazyMount, tmp_path: Path) -> None:
    blob = layers.blob(written_out_tar())
    (tmp_path / "snap").mkdir()
    write_out(layers, blob.layer, blob.read, tmp_path / "snap")
    below = tmp_path / "below"
    (below / "var/cache").mkdir(parents=True)
    (below / "var/cache/old").write_text("hidden by the whiteout")
    (below / "opt").mkdir()
    (below / "opt/old").write_text("hidden by the opaque directory")
    (below / "etc").mkdir()
    (below / "etc/kept").write_text("merged")
    merged = tmp_path / "merged"
    merged.mkdir()
    lower = f"{tree_path(str(tmp_path / 'snap'))}:{below}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}",
                    str(merged)], check=True)
    try:
        assert not (merged / "var/cache").exists()
        assert sorted(os.listdir(merged / "opt")) == ["new"]
        assert sorted(os.listdir(merged / "etc")) == ["empty", "hostname", "kept"]
        assert (merged / "usr/bin/tool").read_bytes() == big_payload(300_000)
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_a_failed_read_leaves_no_tree(layers: LazyMount, tmp_path: Path) -> None:
    blob = layers.blob(written_out_tar())

    async def failing(node: Node, offset: int, length: int) -> bytes:
        if node.path.endswith("srv/big") and offset > 0:
            raise OSError(5, "chunk failed verification")
        return await blob.read(node, offset, length)

    (tmp_path / "snap").mkdir()
    with pytest.raises(OSError, match="verification"):
        write_out(layers, blob.layer, failing, tmp_path / "snap")
    assert os.listdir(tmp_path / "snap") == []

    async def short(node: Node, offset: int, length: int) -> bytes:
        data = await blob.read(node, offset, length)
        return data[:-1] if node.path.endswith("etc/hostname") else data

    with pytest.raises(OSError, match="wanted"):
        write_out(layers, blob.layer, short, tmp_path / "snap")
    assert os.listdir(tmp_path / "snap") == []


def test_leftovers_go_and_a_placed_tree_stays(layers: LazyMount, tmp_path: Path) -> None:
    blob = layers.blob(written_out_tar())
    snap = tmp_path / "snap"
    (snap / "tree.new-dead/usr").mkdir(parents=True)  # a write that died with its process
    written = write_out(layers, blob.layer, blob.read, snap)
    assert not written.existed  # type: ignore[attr-defined]
    assert os.listdir(snap) == ["tree"]
    marker = Path(tree_path(str(snap))) / "etc/hostname"
    before = os.stat(marker).st_ino
    again = write_out(layers, blob.layer, blob.read, snap)
    assert again.existed and again.entries == 0  # type: ignore[attr-defined]
    assert os.stat(marker).st_ino == before


def test_a_malformed_capability_is_refused_whole(layers: LazyMount, tmp_path: Path) -> None:
    # The kernel refuses coverage_tar's malformed security.capability, as it would to
    # containerd's unpacker: the tree is not written and the FUSE view goes on serving.
    blob = layers.blob(coverage_tar())
    (tmp_path / "snap").mkdir()
    with pytest.raises(OSError, match="Invalid argument"):
        write_out(layers, blob.layer, blob.read, tmp_path / "snap")
    assert os.listdir(tmp_path / "snap") == []


def test_a_full_disk_leaves_no_tree(layers: LazyMount, tmp_path: Path) -> None:
    blob = layers.blob(written_out_tar())
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        (small / "snap").mkdir()
        with pytest.raises(OSError) as failed:
            write_out(layers, blob.layer, blob.read, small / "snap")
        assert failed.value.errno == errno.ENOSPC
        assert os.listdir(small / "snap") == []
        assert os.statvfs(small).f_bfree == os.statvfs(small).f_blocks  # all of it freed
    finally:
        subprocess.run(["umount", str(small)], check=True)
