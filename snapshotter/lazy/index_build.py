"""A layer's TOC verified and indexed in a process of its own, off the event loop's core.

Building a layer's index from its TOC is pure CPU work (JSON decoding, checks, SQLite
inserts): in a thread of the FUSE manager it holds the interpreter lock against the
event loop that answers FUSE requests and verifies and stores prefetched chunks, just
when a container starts. Here `estargz.index_child` does it in a process of its own,
on another core, and its transient memory goes back to the system when it exits.

An `IndexBuilder` keeps a template process (`estargz.index_child --template`) that
has estargz imported and forks a process for each build: a millisecond, where an
interpreter's start and imports cost about 0.1 s of CPU on the cores a pull needs.
The template is a process of its own, started with exec: a bare fork of this threaded
process could leave the child waiting forever for a lock (SQLite's, the allocator's)
that another thread held at that moment. Without a builder, or while its template
cannot be started, a build starts `python -m estargz.index_child` for itself. A TOC
too small to be worth a process is indexed in a thread. A malformed TOC raises the
same FormatError subclass, with the same message, as `estargz.load_toc` in this
process; a full disk the same OSError or sqlite3 error.
"""

import asyncio
import collections
import contextlib
import glob
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass

import estargz
from estargz.index_child import FORMAT_ERRORS, PID_BYTES, READY, request_header

log = logging.getLogger(__name__)

# Builds at once: as many as there are cores. While layers are being opened the event
# loop mostly waits for them, and the processes share the cores without a common lock.
MAX_BUILDS = max(1, os.cpu_count() or 1)
# A compressed TOC smaller than this is indexed in a thread: a few milliseconds of
# work (a few hundred entries), less than a process's start.
IN_PROCESS_TOC_BYTES = 16 << 10
# How long a template may take to start (an interpreter, estargz's imports).
TEMPLATE_START_SECONDS = 30.0
_STDERR_SHOWN = 2000  # characters of a failed child's stderr kept in the error
_slots: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = \
    weakref.WeakKeyDictionary()
# The child imports estargz from where this process found it, whatever its sys.path.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(estargz.__file__)))

Process = asyncio.subprocess.Process


class IndexBuildError(RuntimeError):
    """The build process ended without an answer (killed, out of memory, a bug)."""


# How `BuiltIndex.describe` says where a build ran (perf/index_phases.py reads it).
_WHERE_SAID = {"child": "", "thread": " in process", "forked": " in a forked process"}


@dataclass(frozen=True)
class BuiltIndex:
    layer: estargz.Layer
    entries: int
    build_seconds: float  # the build itself (in the child, or in a thread)
    queued_seconds: float  # waiting for a free build slot
    total_seconds: float  # from the call to the open index
    # "child": a process started for it; "thread": a small TOC, indexed in a thread;
    # "forked": a process forked by the builder's template
    where: str = "child"

    def describe(self) -> str:
        where = _WHERE_SAID[self.where]
        return (f"index of {self.entries} entries built{where} in {self.total_seconds:.3f}s "
                f"({self.build_seconds:.3f}s building, {self.queued_seconds:.3f}s queued)")


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


async def _start_child() -> Process:
    """A process for one build, started for it."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "estargz.index_child", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_child_env())


async def _end(process: Process) -> None:
    """Stop a child of ours whose build is not wanted (any more)."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    if process.stdin is not None:
        process.stdin.close()
    await process.wait()  # reaped; its pipes close as it goes


class TemplateGone(Exception):
    """The template process exited, or stopped answering."""


class _Forked:
    """A build process forked by the template: a socket to it, and a pidfd to end it
    by (it is the template's child, not ours, and the kernel reaps it)."""

    def __init__(self, connection: socket.socket, pidfd: int):
        self.connection = connection
        self.pidfd = pidfd

    async def exchange(self, request: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.connection, request)
        self.connection.shutdown(socket.SHUT_WR)
        pieces = []
        while piece := await loop.sock_recv(self.connection, 1 << 16):
            pieces.append(piece)
        return b"".join(pieces)

    async def end(self) -> None:
        """Kill it, and return once it is gone."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        gone = loop.create_future()
        loop.add_reader(self.pidfd, lambda: gone.done() or gone.set_result(None))
        try:
            await gone  # a pidfd reads ready once its process has exited
        finally:
            loop.remove_reader(self.pidfd)

    def close(self) -> None:
        self.connection.close()
        os.close(self.pidfd)


class _Template:
    """A running `estargz.index_child --template` and the socket it forks builds on.
    It answers fork requests in order, each with the new process's id."""

    def __init__(self, process: Process, control: socket.socket):
        self.process = process
        self.control = control
        self._waiting: collections.deque[asyncio.Future[int]] = collections.deque()
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls) -> "_Template":
        control, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "estargz.index_child", "--template",
                stdin=theirs.fileno(), stdout=asyncio.subprocess.DEVNULL, env=_child_env())
        except BaseException:
            control.close()
            raise
        finally:
            theirs.close()
        control.setblocking(False)
        template = cls(process, control)
        try:
            ready = await asyncio.wait_for(template._receive(len(READY)),
                                           TEMPLATE_START_SECONDS)
            if ready != READY:
                raise TemplateGone(f"the template process answered {ready!r}")
        except BaseException:
            await template.close()
            raise
        template._reader = asyncio.create_task(template._read_pids())
        return template

    async def _receive(self, size: int) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        while len(data) < size:
            piece = await loop.sock_recv(self.control, size - len(data))
            if not piece:
                raise TemplateGone("the template process exited")
            data += piece
        return data

    async def _read_pids(self) -> None:
        """Hand each process id the template answers to the fork that asked for it.
        A fork cancelled meanwhile still takes its answer: the order is kept, and its
        process ends when it sees its socket closed."""
        try:
            while True:
                pid = int.from_bytes(await self._receive(PID_BYTES), "big")
                asked = self._waiting.popleft()
                if not asked.done():
                    asked.set_result(pid)
        except (OSError, TemplateGone, IndexError) as exc:
            gone = exc if isinstance(exc, TemplateGone) else TemplateGone(str(exc))
            while self._waiting:
                asked = self._waiting.popleft()
                if not asked.done():
                    asked.set_exception(gone)

    async def fork(self) -> _Forked:
        if self._reader is None or self._reader.done():
            raise TemplateGone("the template process exited")
        ours, theirs = socket.socketpair()
        try:
            try:
                socket.send_fds(self.control, [b"F"], [theirs.fileno()])
            except OSError as exc:
                raise TemplateGone(f"the template process is gone: {exc}") from None
            finally:
                theirs.close()
            asked: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._waiting.append(asked)
            pid = await asked
            # The build waits for its request, which only we can send: it is alive,
            # and its pid is its own, until we close our end.
            pidfd = os.pidfd_open(pid)
        except BaseException:
            ours.close()
            raise
        ours.setblocking(False)
        return _Forked(ours, pidfd)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.control.close()  # it exits when it sees the socket closed
        try:
            await asyncio.wait_for(self.process.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


class IndexBuilder:
    """The template process that `build_index` forks builds from. It is started by
    `start` and started again by the first build after it exited."""

    def __init__(self) -> None:
        self._template: _Template | None = None
        self._starting: asyncio.Task[_Template | None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start the template, if it does not run (in the background)."""
        if self._closed or (self._starting is not None and not self._starting.done()):
            return
        if self._template is not None and self._template.process.returncode is None:
            return
        self._starting = asyncio.create_task(self._start())

    async def _start(self) -> _Template | None:
        try:
            template = await _Template.start()
        except (OSError, TemplateGone, TimeoutError) as exc:
            log.warning("index builds start a process each: the template process did "
                        "not start: %s", exc)
            return None
        if self._closed:
            await template.close()
            return None
        self._template = template
        return template

    @property
    def template_pid(self) -> int | None:
        template = self._template
        return template.process.pid if template is not None \
            and template.process.returncode is None else None

    async def fork(self) -> _Forked | None:
        """A process forked for one build; None if there is no template to fork it
        (the caller then starts one of its own)."""
        template = self._template
        if template is None or template.process.returncode is not None:
            self.start()
            if self._starting is None:
                return None
            template = await asyncio.shield(self._starting)
            if template is None:
                return None
        try:
            return await template.fork()
        except (TemplateGone, OSError) as exc:
            log.warning("the index builds' template process is gone (%s); starting "
                        "another", exc)
            if self._template is template:
                self._template = None
                await template.close()
            self.start()
            return None

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        template, self._template = self._template, None
        if template is not None:
            await template.close()


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
        return BuiltIndex(layer, layer.entry_count, seconds, 0.0, seconds, where="thread")
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
        forked = await builder.fork() if builder is not None else None
        if forked is not None:
            answer = await _forked_answer(forked, request, index_path)
        else:
            answer = await _answer(await _start_child(), request, index_path)
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
                      time.perf_counter() - started,
                      where="forked" if forked is not None else "child")


async def _answer(process: Process, request: bytes, index_path: str) -> dict[str, object]:
    try:
        out, err = await process.communicate(request)
    except BaseException:  # cancelled: the build is not wanted any more
        await asyncio.shield(_end(process))
        _remove_partial(index_path)
        raise
    answer = _decoded(out)
    if process.returncode != 0 or answer is None:
        _remove_partial(index_path)
        problem = err.decode(errors="replace").strip()[-_STDERR_SHOWN:]
        raise IndexBuildError(f"the index build process ended with status "
                              f"{process.returncode}: {problem or 'no answer'}")
    return answer


async def _forked_answer(forked: _Forked, request: bytes, index_path: str
                         ) -> dict[str, object]:
    try:
        out = await forked.exchange(request)
    except BaseException as exc:  # cancelled, or the process died mid-request
        await asyncio.shield(forked.end())
        forked.close()
        _remove_partial(index_path)
        if isinstance(exc, OSError):
            raise IndexBuildError(f"the forked index build process failed: {exc}") from None
        raise
    forked.close()
    answer = _decoded(out)
    if answer is None or "crash" in answer:
        _remove_partial(index_path)
        problem = str(answer["crash"]).strip()[-_STDERR_SHOWN:] if answer is not None \
            else "it ended without an answer (killed?)"
        raise IndexBuildError(f"the forked index build process failed: {problem}")
    return answer


def _decoded(out: bytes) -> dict[str, object] | None:
    """A build process's reply line, or None if it wrote none (or not JSON)."""
    try:
        answer = json.loads(out.decode())
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None
