"""A layer's index built in a process of its own (snapshotter.lazy.index_build),
started for the build or forked by the builder's template: the same tree as
`estargz.load_toc` in this process, the same errors for a bad TOC, a full disk raised
as OSError, and nothing half-built left when a build is cancelled or its process dies.
The template itself: one for many builds, started again after it was killed, ended
by close and by its parent's exit."""

import asyncio
import errno
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import estargz
from estargz import Compression, DigestMismatch, FormatError, TOCError, load_toc
from snapshotter.lazy.index_build import (
    MAX_BUILDS,
    BuiltIndex,
    IndexBuilder,
    IndexBuildError,
    _forked_answer,
    build_index,
)

from .test_bad_input import edited, footer_of, index, sample_blob
from .test_layer_index import blob_of, many_files_tar


def _started_build(*args: object, **kwargs: object) -> Coroutine[Any, Any, BuiltIndex]:
    """`build_index` in a process started for it, whatever the TOC's size (the
    samples' are small)."""
    return build_index(*args, in_process_below=0, **kwargs)  # type: ignore[arg-type]


async def _forked_build(*args: object, **kwargs: object) -> BuiltIndex:
    """`build_index` in a process forked by a builder's template."""
    builder = IndexBuilder()
    builder.start()
    try:
        built = await build_index(*args, in_process_below=0,  # type: ignore[arg-type]
                                  builder=builder, **kwargs)
        assert built.where == "forked" and "in a forked process" in built.describe()
        return built
    finally:
        await builder.close()


@pytest.fixture(params=["started for the build", "forked by the template"])
def build(request) -> Callable[..., Coroutine[Any, Any, BuiltIndex]]:
    return _started_build if request.param == "started for the build" else _forked_build


def toc_of(blob: bytes) -> tuple[estargz.Footer, bytes]:
    footer = footer_of(blob)
    return footer, blob[footer.toc_offset:footer.toc_offset + footer.toc_length]


def tree(layer: estargz.Layer) -> list[tuple[object, ...]]:
    return [(path, n.kind, n.size, n.mode, n.mtime, n.nlink, n.link_target, n.xattrs,
             tuple(n.chunks)) for path, n in layer.walk()]


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD])
def test_child_builds_the_index_load_toc_builds(compression: Compression, build,
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


def test_without_a_path_the_index_is_temporary(build, tmp_path: Path) -> None:
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
def test_a_bad_toc_raises_what_load_toc_raises(compression: Compression, build,
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


def test_a_full_disk_raises_what_load_toc_raises(build, tiny_disk: Path) -> None:
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


def test_a_cancelled_build_leaves_no_partial_index(build, tmp_path: Path) -> None:
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


def test_a_small_toc_is_indexed_in_process(build, tmp_path: Path) -> None:
    blob, result = sample_blob(Compression.ZSTD)
    footer, toc = toc_of(blob)
    built = asyncio.run(build_index(footer, toc, result.toc_digest,
                                    index_path=str(tmp_path / "index.db")))
    assert built.where == "thread" and "built in process" in built.describe()
    child = asyncio.run(build(footer, toc, result.toc_digest))
    assert child.where != "thread"
    assert tree(built.layer) == tree(child.layer)
    built.layer.close()
    child.layer.close()


async def _until(condition: Callable[[], object]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def _sample_toc() -> tuple[estargz.Footer, bytes, str]:
    blob, result = sample_blob(Compression.GZIP)
    footer, toc = toc_of(blob)
    return footer, toc, result.toc_digest


async def _template_of(builder: IndexBuilder) -> int:
    await asyncio.wait_for(_until(lambda: builder.template_pid), 60)
    assert builder.template_pid is not None
    return builder.template_pid


def test_builds_are_forked_from_one_template(tmp_path: Path) -> None:
    footer, toc, digest = _sample_toc()

    async def go() -> None:
        builder = IndexBuilder()
        builder.start()
        template = await _template_of(builder)
        here = load_toc(footer, toc, digest)
        for n in range(3):
            built = await build_index(footer, toc, digest, in_process_below=0,
                                      builder=builder, index_path=str(tmp_path / f"{n}.db"))
            assert built.where == "forked" and tree(built.layer) == tree(here)
            built.layer.close()
        here.close()
        assert builder.template_pid == template  # the same one forked all three
        # and the kernel reaps them (a build answers, then exits)
        await asyncio.wait_for(_until(lambda: _children(template) == []), 30)
        await builder.close()
        assert builder.template_pid is None
        await asyncio.wait_for(_until(lambda: _gone(template)), 60)

    asyncio.run(go())


def test_a_killed_template_is_started_again(tmp_path: Path) -> None:
    footer, toc, digest = _sample_toc()

    async def go() -> None:
        builder = IndexBuilder()
        builder.start()
        first = await _template_of(builder)
        os.kill(first, signal.SIGKILL)
        await asyncio.wait_for(_until(lambda: builder.template_pid is None), 60)
        for n in range(2):  # the first may start a process of its own meanwhile
            built = await build_index(footer, toc, digest, in_process_below=0,
                                      builder=builder, index_path=str(tmp_path / f"{n}.db"))
            assert built.entries > 0
            built.layer.close()
        assert built.where == "forked"
        second = await _template_of(builder)
        assert second != first and not _gone(second)
        await builder.close()
        await asyncio.wait_for(_until(lambda: _gone(second)), 60)

    asyncio.run(go())


def test_the_template_ends_when_its_parent_dies() -> None:
    script = textwrap.dedent("""
        import asyncio, os, sys
        from snapshotter.lazy.index_build import IndexBuilder

        async def go():
            builder = IndexBuilder()
            builder.start()
            while builder.template_pid is None:
                await asyncio.sleep(0.01)
            print(builder.template_pid, flush=True)
            os._exit(0)  # no close: as if killed

        asyncio.run(go())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True, cwd=os.path.dirname(os.path.dirname(
                             os.path.abspath(estargz.__file__))))
    template = int(out.stdout.split()[0])
    asyncio.run(asyncio.wait_for(_until(lambda: _gone(template)), 30))


def test_a_build_process_that_dies_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    footer, toc, digest = _sample_toc()
    path = str(tmp_path / "index.db")

    async def go() -> None:
        builder = IndexBuilder()
        builder.start()
        await _template_of(builder)
        forked = await builder.fork()
        assert forked is not None
        await forked.end()  # killed before its request: EPIPE or no answer
        with pytest.raises(IndexBuildError, match="forked index build process failed"):
            await _forked_answer(forked, b"x" * (4 << 20), path)
        crashing = await builder.fork()
        assert crashing is not None
        with pytest.raises(IndexBuildError, match="KeyError"):  # a request it cannot read
            await _forked_answer(crashing, b'{"no": "header fields"}\n', path)
        built = await build_index(footer, toc, digest, in_process_below=0, builder=builder,
                                  index_path=path)
        assert built.where == "forked" and built.entries > 0  # the template still forks
        built.layer.close()
        await builder.close()

    asyncio.run(go())
    assert os.listdir(tmp_path) == ["index.db"]


def test_a_cancelled_forked_build_ends_its_process(tmp_path: Path) -> None:
    """Cancelled while its process builds: the process is killed, so no index appears
    after the cancellation, and nothing half-built is left."""
    blob, result = blob_of(many_files_tar(20_000))
    footer, toc = toc_of(blob)
    path = tmp_path / "index.db"

    async def go() -> None:
        builder = IndexBuilder()
        builder.start()
        template = await _template_of(builder)
        task = asyncio.create_task(build_index(footer, toc, result.toc_digest,
                                               builder=builder, index_path=str(path)))
        await asyncio.wait_for(_until(lambda: list(tmp_path.glob("*.building"))), 60)
        (pid,) = _children(template)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # It has exited by then (its pidfd said so); the kernel removes it right after.
        await asyncio.wait_for(_until(lambda: _gone(pid)), 30)
        await asyncio.sleep(1.0)  # what the build had left would be done by now
        assert os.listdir(tmp_path) == []
        await builder.close()

    asyncio.run(go())


def _children(pid: int) -> list[int]:
    return [int(child) for child in
            Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
