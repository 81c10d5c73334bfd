"""A layer's index built in a child process (snapshotter.lazy.index_build): the same
tree as `estargz.load_toc` in this process, the same errors for a bad TOC, a full
disk raised as OSError, and nothing half-built left when a build is cancelled."""

import asyncio
import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import estargz
from estargz import Compression, DigestMismatch, FormatError, TOCError, load_toc
from snapshotter.lazy.index_build import MAX_BUILDS, build_index

from .test_bad_input import edited, footer_of, index, sample_blob


def toc_of(blob: bytes) -> tuple[estargz.Footer, bytes]:
    footer = footer_of(blob)
    return footer, blob[footer.toc_offset:footer.toc_offset + footer.toc_length]


def tree(layer: estargz.Layer) -> list[tuple[object, ...]]:
    return [(path, n.kind, n.size, n.mode, n.mtime, n.nlink, n.link_target, n.xattrs,
             tuple(n.chunks)) for path, n in layer.walk()]


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD])
def test_child_builds_the_index_load_toc_builds(compression: Compression,
                                                tmp_path: Path) -> None:
    blob, result = sample_blob(compression)
    footer, toc = toc_of(blob)
    path = str(tmp_path / "index.db")
    built = asyncio.run(build_index(footer, toc, result.toc_digest, index_path=path))
    here = load_toc(footer, toc, result.toc_digest)
    try:
        assert built.entries == here.entry_count > 0
        assert tree(built.layer) == tree(here)
        assert list(built.layer.iter_spans()) == list(here.iter_spans())
        assert built.layer.prefetch_size == here.prefetch_size
        assert built.layer.toc_digest == result.toc_digest
    finally:
        built.layer.close()
        here.close()
    assert os.listdir(tmp_path) == ["index.db"]  # kept, and nothing else left beside it
    reopened = estargz.Layer.open_index(path, footer, result.toc_digest)
    assert reopened is not None
    reopened.close()


def test_without_a_path_the_index_is_temporary(tmp_path: Path) -> None:
    blob, result = sample_blob(Compression.GZIP)
    footer, toc = toc_of(blob)
    before = _temporary_indexes()
    built = asyncio.run(build_index(footer, toc, result.toc_digest))
    try:
        assert built.layer.lookup("/") is not None and built.entries > 0
        (db,) = _temporary_indexes() - before
        assert db.endswith("(deleted)")  # open, but gone from the file system
    finally:
        built.layer.close()


def _temporary_indexes() -> set[str]:
    """What this process's open temporary layer indexes are (their fds' targets)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "lazypull-layer-" in target:
            found.add(f"{fd} {target}")
    return found


def _hardlink_to_a_later_file(entries: list[dict]) -> None:
    first = index(entries, "etc/hostname")
    entries.insert(first, {"name": "early-link", "type": "hardlink",
                           "linkName": "etc/hostname"})


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD])
def test_a_bad_toc_raises_what_load_toc_raises(compression: Compression,
                                               tmp_path: Path) -> None:
    blob, toc_digest = edited(compression, _hardlink_to_a_later_file)
    footer, toc = toc_of(blob)
    with pytest.raises(TOCError) as here:
        load_toc(footer, toc, toc_digest)
    with pytest.raises(TOCError) as child:
        asyncio.run(build_index(footer, toc, toc_digest, index_path=str(tmp_path / "i.db")))
    assert "is not an earlier entry" in str(child.value)
    assert type(child.value) is type(here.value) and str(child.value) == str(here.value)

    with pytest.raises(DigestMismatch, match="TOC digest is sha256:"):
        asyncio.run(build_index(footer, toc, "sha256:" + "0" * 64))
    with pytest.raises(FormatError, match="cannot decompress the TOC"):
        asyncio.run(build_index(footer, b"\x1f\x8b" + b"x" * len(toc), toc_digest))
    assert os.listdir(tmp_path) == []


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "disk"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(root)],
                   check=True)
    yield root
    subprocess.run(["umount", "-l", str(root)], check=False)


def test_a_full_disk_raises_what_load_toc_raises(tiny_disk: Path) -> None:
    blob, result = sample_blob(Compression.GZIP)
    footer, toc = toc_of(blob)
    (tiny_disk / "filler").write_bytes(b"\0" * (60 << 10))
    path = str(tiny_disk / "index.db")
    with pytest.raises((OSError, sqlite3.Error)) as here:
        load_toc(footer, toc, result.toc_digest, index_path=path)
    with pytest.raises((OSError, sqlite3.Error)) as child:
        asyncio.run(build_index(footer, toc, result.toc_digest, index_path=path))
    assert type(child.value) is type(here.value)
    if isinstance(here.value, OSError):
        assert child.value.errno == here.value.errno == errno.ENOSPC  # type: ignore[union-attr]
    else:
        assert str(child.value) == str(here.value) == "database or disk is full"
    assert sorted(os.listdir(tiny_disk)) == ["filler"]


def test_a_cancelled_build_leaves_no_partial_index(tmp_path: Path) -> None:
    blob, result = sample_blob(Compression.GZIP)
    footer, toc = toc_of(blob)
    path = str(tmp_path / "index.db")

    async def go() -> None:
        # More builds than may run at once: the last ones are cancelled while queued,
        # the running one while its child works or right after.
        tasks = [asyncio.create_task(build_index(footer, toc, result.toc_digest,
                                                 index_path=f"{path}.{n}"))
                 for n in range(MAX_BUILDS + 2)]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".building")]
    after = asyncio.run(build_index(footer, toc, result.toc_digest, index_path=path))
    assert after.entries > 0  # the slots were given back
    after.layer.close()
