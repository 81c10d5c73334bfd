"""A layer's index built in a child process (snapshotter.lazy.index_build): the same
tree as `estargz.load_toc` in this process, the same errors for a bad TOC, a full
disk raised as OSError, and nothing half-built left when a build is cancelled."""

import asyncio
import errno
import os
import sqlite3
import subprocess
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import estargz
from estargz import Compression, DigestMismatch, FormatError, TOCError, load_toc
from snapshotter.lazy.index_build import (
    MAX_BUILDS,
    SMALL_LAYER_BYTES,
    BuiltIndex,
    IndexBuilder,
    build_index,
    builds_in_a_child,
)

from .test_bad_input import edited, footer_of, index, sample_blob


def build(*args: object, **kwargs: object) -> Coroutine[Any, Any, BuiltIndex]:
    """`build_index` in a child process, whatever the TOC's size (the samples' are small)."""
    return build_index(*args, in_process_below=0, **kwargs)  # type: ignore[arg-type]


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
    built = asyncio.run(build(footer, toc, result.toc_digest, index_path=path))
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
    built = asyncio.run(build(footer, toc, result.toc_digest))
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
        asyncio.run(build(footer, toc, toc_digest, index_path=str(tmp_path / "i.db")))
    assert "is not an earlier entry" in str(child.value)
    assert type(child.value) is type(here.value) and str(child.value) == str(here.value)

    with pytest.raises(DigestMismatch, match="TOC digest is sha256:"):
        asyncio.run(build(footer, toc, "sha256:" + "0" * 64))
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
        asyncio.run(build(footer, toc, result.toc_digest, index_path=path))
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
        tasks = [asyncio.create_task(build(footer, toc, result.toc_digest,
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
    after = asyncio.run(build(footer, toc, result.toc_digest, index_path=path))
    assert after.entries > 0  # the slots were given back
    after.layer.close()


def test_a_small_toc_is_indexed_in_process(tmp_path: Path) -> None:
    blob, result = sample_blob(Compression.ZSTD)
    footer, toc = toc_of(blob)
    built = asyncio.run(build_index(footer, toc, result.toc_digest,
                                    index_path=str(tmp_path / "index.db")))
    assert built.in_process and "built in process" in built.describe()
    child = asyncio.run(build(footer, toc, result.toc_digest))
    assert not child.in_process
    assert tree(built.layer) == tree(child.layer)
    built.layer.close()
    child.layer.close()


async def _until(condition: Callable[[], object]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def test_builds_take_the_children_started_ahead(tmp_path: Path) -> None:
    blob, result = sample_blob(Compression.GZIP)
    footer, toc = toc_of(blob)

    async def go() -> None:
        builder = IndexBuilder(spares=1, spare_seconds=60)
        builder.warm()
        await asyncio.wait_for(_until(lambda: builder.waiting), 60)
        (spare,) = builder.waiting
        built = await build(footer, toc, result.toc_digest, builder=builder,
                            index_path=str(tmp_path / "index.db"))
        assert built.entries > 0
        built.layer.close()
        assert _gone(spare)  # it did the build and was reaped
        assert builder.waiting == []  # and none was started in its place
        builder.warm()
        await asyncio.wait_for(_until(lambda: builder.waiting), 60)
        (again,) = builder.waiting
        await builder.close()
        assert builder.waiting == [] and _gone(again)
        builder.warm()  # closed: starts nothing
        assert builder.waiting == [] and builder._adding == 0

    asyncio.run(go())


def test_a_spare_not_taken_is_ended() -> None:
    async def go() -> None:
        builder = IndexBuilder(spares=2, spare_seconds=0.5)
        builder.warm(2)
        await asyncio.wait_for(_until(lambda: len(builder.waiting) == 2), 60)
        spares = builder.waiting
        await asyncio.wait_for(_until(lambda: not builder.waiting), 60)
        await asyncio.wait_for(_until(lambda: all(_gone(pid) for pid in spares)), 60)
        await builder.close()

    asyncio.run(go())


def test_only_the_builds_about_to_be_asked_for_are_warmed() -> None:
    async def go() -> None:
        builder = IndexBuilder(spares=2, spare_seconds=60)
        builder.warm(0)  # no layer large enough: nothing started
        assert builder._adding == 0 and builder.waiting == []
        builder.warm(1)
        await asyncio.wait_for(_until(lambda: len(builder.waiting) == 1), 60)
        builder.warm(1)  # one already waits for that build
        assert builder._adding == 0
        builder.warm(5)  # more builds than spares: as many as spares
        await asyncio.wait_for(_until(lambda: len(builder.waiting) == 2), 60)
        spares = builder.waiting
        await builder.close()
        assert all(_gone(pid) for pid in spares)

    asyncio.run(go())


def test_small_layers_are_not_counted_as_builds_in_a_child() -> None:
    assert builds_in_a_child([]) == 0
    assert builds_in_a_child([SMALL_LAYER_BYTES - 1, 4096]) == 0
    assert builds_in_a_child([SMALL_LAYER_BYTES, 30 << 20, 10]) == 2
