"""A layer's TOC verified and indexed in a child process, off the event loop's core.

Building a layer's index from its TOC is pure CPU work (JSON decoding, checks, SQLite
inserts): in a thread of the FUSE manager it holds the interpreter lock against the
event loop that answers FUSE requests and verifies and stores prefetched chunks, just
when a container starts. Here `estargz.index_child` does it in a process of its own,
on another core, and its transient memory goes back to the system when it exits.

The child is started with exec, not a bare fork of this threaded process (another
thread may hold SQLite's or the allocator's locks at that moment, and the child would
wait for them forever). Its start (an interpreter and estargz's imports, about 0.1 s of
CPU) would come before every build, so an `IndexBuilder` keeps children started ahead
(`warm`, called when a pull or mount begins) for a short while. A TOC too small to be
worth a process is indexed in a thread, as before. A malformed TOC raises the same
FormatError subclass, with the same message, as `estargz.load_toc` in this process; a
full disk the same OSError or sqlite3 error.
"""

import asyncio
import contextlib
import glob
import json
import os
import sqlite3
import sys
import tempfile
import time
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import estargz
from estargz.index_child import FORMAT_ERRORS, request_header

# Builds at once: as many as there are cores. While layers are being opened the event
# loop mostly waits for them, and the processes share the cores without a common lock.
MAX_BUILDS = max(1, os.cpu_count() or 1)
# A compressed TOC smaller than this is indexed in a thread: a few milliseconds of
# work (a few hundred entries), less than a child's start.
IN_PROCESS_TOC_BYTES = 16 << 10
# A layer blob smaller than this is taken to have a TOC indexed in a thread (a few
# hundred files at most): no child is started ahead for it, as none would be taken.
SMALL_LAYER_BYTES = 1 << 20
# A child started ahead waits this long for its build, then is ended (and ends itself
# after twice as long, should this process be gone).
SPARE_SECONDS = 5.0
_STDERR_SHOWN = 2000  # characters of a failed child's stderr kept in the error
_slots: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = \
    weakref.WeakKeyDictionary()
# The child imports estargz from where this process found it, whatever its sys.path.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(estargz.__file__)))

Process = asyncio.subprocess.Process


class IndexBuildError(RuntimeError):
    """The build process ended without an answer (killed, out of memory, a bug)."""


@dataclass(frozen=True)
class BuiltIndex:
    layer: estargz.Layer
    entries: int
    build_seconds: float  # the build itself (in the child, or in a thread)
    queued_seconds: float  # waiting for a free build slot
    total_seconds: float  # from the call to the open index
    in_process: bool = False  # a small TOC, indexed in a thread

    def describe(self) -> str:
        where = " in process" if self.in_process else ""
        return (f"index of {self.entries} entries built{where} in {self.total_seconds:.3f}s "
                f"({self.build_seconds:.3f}s building, {self.queued_seconds:.3f}s queued)")


def builds_in_a_child(layer_sizes: "list[int]") -> int:
    """How many of layers of these blob sizes likely build their index in a child."""
    return sum(size >= SMALL_LAYER_BYTES for size in layer_sizes)


def _slot() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    slot = _slots.get(loop)
    if slot is None:
        slot = _slots[loop] = asyncio.Semaphore(MAX_BUILDS)
    return slot


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [_PACKAGE_ROOT, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


async def _start_child(wait: float | None = None) -> Process:
    extra = ["--wait", str(wait)] if wait is not None else []
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "estargz.index_child", *extra, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_child_env())


async def _end(process: Process) -> None:
    """Stop a child of ours that has not been given its request (or is not wanted)."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    if process.stdin is not None:
        process.stdin.close()
    await process.wait()  # reaped; its pipes close as it goes


class IndexBuilder:
    """Children started ahead of the builds of a pull, for `build_index`."""

    def __init__(self, spares: int = MAX_BUILDS, spare_seconds: float = SPARE_SECONDS):
        self.spares = spares
        self.spare_seconds = spare_seconds
        self._ready: list[tuple[float, Process]] = []  # (started, process), oldest first
        self._tasks: set[asyncio.Task[None]] = set()  # spares being started or retired
        self._adding = 0
        self._closed = False

    def warm(self, builds: int = 1) -> None:
        """Start children so that as many wait as the `builds` about to be asked for
        (a pull or mount begins), at most `spares`: a child not taken costs memory
        until it is ended."""
        if self._closed:
            return
        for _ in range(min(builds, self.spares) - len(self._ready) - self._adding):
            self._adding += 1
            self._track(self._add_spare())

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add_spare(self) -> None:
        try:
            process = await _start_child(wait=2 * self.spare_seconds)
        except OSError:
            return  # no spare: a build starts its own child, and says why if it cannot
        finally:
            self._adding -= 1
        if self._closed:
            await _end(process)
            return
        self._ready.append((time.monotonic(), process))
        asyncio.get_running_loop().call_later(
            self.spare_seconds, lambda: self._track(self._retire(process)))

    async def _retire(self, process: Process) -> None:
        for entry in self._ready:
            if entry[1] is process:
                self._ready.remove(entry)
                await _end(process)
                return

    @property
    def waiting(self) -> list[int]:
        """The process ids of the children started ahead that wait for a build."""
        return [process.pid for _, process in self._ready]

    async def child(self) -> Process:
        """A started child for one build: a spare if one waits, else a new one. None is
        started in a spare's place: on 2 cores its start would slow the builds under
        way, and the next pull or mount warms again."""
        now = time.monotonic()
        while self._ready:
            started, process = self._ready.pop(0)
            if now - started < self.spare_seconds and process.returncode is None:
                return process
            await _end(process)
        return await _start_child()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task  # a spare being started is ended as soon as it is
        ready, self._ready = self._ready, []
        for _, process in ready:
            await _end(process)


def _remove_partial(index_path: str) -> None:
    """What a build that was stopped leaves beside its index (see estargz.layer)."""
    for path in glob.glob(glob.escape(index_path) + ".*.building"):
        with contextlib.suppress(OSError):
            os.unlink(path)


async def build_index(footer: estargz.Footer, toc_bytes: bytes, expected_digest: str | None,
                      max_toc_size: int = estargz.toc.DEFAULT_MAX_TOC_SIZE, *,
                      index_path: str | None = None,
                      builder: IndexBuilder | None = None,
                      in_process_below: int = IN_PROCESS_TOC_BYTES) -> BuiltIndex:
    """`estargz.load_toc(footer, toc_bytes, expected_digest, max_toc_size,
    index_path=index_path)`, run in a child process (one of `builder`'s if given), or
    in a thread for a TOC of fewer than `in_process_below` bytes. Without `index_path`
    the index is a temporary file that goes with the layer."""
    started = time.perf_counter()
    if len(toc_bytes) < in_process_below:
        layer = await asyncio.to_thread(estargz.load_toc, footer, toc_bytes, expected_digest,
                                        max_toc_size, index_path=index_path)
        seconds = time.perf_counter() - started
        return BuiltIndex(layer, layer.entry_count, seconds, 0.0, seconds, in_process=True)
    if index_path is not None:
        return await _build(footer, toc_bytes, expected_digest, max_toc_size, index_path,
                            builder, started)
    fd, path = tempfile.mkstemp(prefix="lazypull-layer-", suffix=".db")
    os.close(fd)
    try:
        # The open index keeps the unlinked file until the layer is closed.
        return await _build(footer, toc_bytes, expected_digest, max_toc_size, path, builder,
                            started)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _build(footer: estargz.Footer, toc_bytes: bytes, expected_digest: str | None,
                 max_toc_size: int, index_path: str, builder: IndexBuilder | None,
                 started: float) -> BuiltIndex:
    async with _slot():
        queued = time.perf_counter() - started
        request = request_header(footer, expected_digest, max_toc_size, index_path) + toc_bytes
        process = await (builder.child() if builder is not None else _start_child())
        answer = await _answer(process, request, index_path)
    error = answer.get("error")
    if error is not None:
        raise FORMAT_ERRORS.get(str(error), estargz.FormatError)(str(answer.get("message")))
    if "os_error" in answer:
        raise OSError(answer["os_error"], answer.get("message"), answer.get("filename"))
    if "sqlite_error" in answer:
        kind = getattr(sqlite3, str(answer["sqlite_error"]), sqlite3.Error)
        raise (kind if isinstance(kind, type) and issubclass(kind, sqlite3.Error)
               else sqlite3.Error)(str(answer.get("message")))
    layer = estargz.Layer.open_index(index_path, footer, str(answer["toc_digest"]))
    if layer is None:
        raise IndexBuildError(f"the index built at {index_path} does not open as complete")
    return BuiltIndex(layer, int(answer["entries"]), float(answer["seconds"]), queued,
                      time.perf_counter() - started)


async def _answer(process: Process, request: bytes, index_path: str) -> dict[str, object]:
    try:
        out, err = await process.communicate(request)
    except BaseException:  # cancelled: the build is not wanted any more
        await asyncio.shield(_end(process))
        _remove_partial(index_path)
        raise
    try:
        answer = json.loads(out.decode())
    except ValueError:
        answer = None
    if process.returncode != 0 or not isinstance(answer, dict):
        _remove_partial(index_path)
        problem = err.decode(errors="replace").strip()[-_STDERR_SHOWN:]
        raise IndexBuildError(f"the index build process ended with status "
                              f"{process.returncode}: {problem or 'no answer'}")
    return answer
