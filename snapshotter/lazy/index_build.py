"""A layer's TOC verified and indexed in a child process, off the event loop's core.

Building a layer's index from its TOC is pure CPU work (JSON decoding, checks, SQLite
inserts): in a thread of the FUSE manager it holds the interpreter lock against the
event loop that answers FUSE requests and verifies and stores prefetched chunks, just
when a container starts. Here `estargz.index_child` does it in a process of its own,
on the other core, and its transient memory goes back to the system when it exits.

The child is started with exec (not a bare fork of this threaded process, whose SQLite
and allocator locks another thread may hold at that moment). At most MAX_BUILDS run at
once, so the builds leave a core to the event loop. A malformed TOC raises the same
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
from dataclasses import dataclass

import estargz
from estargz.index_child import FORMAT_ERRORS, request_header

# Builds at once: one core is left to the event loop (on 2 cores, one build at a time).
MAX_BUILDS = max(1, (os.cpu_count() or 2) - 1)
_STDERR_SHOWN = 2000  # characters of a failed child's stderr kept in the error
_slots: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = \
    weakref.WeakKeyDictionary()
# The child imports estargz from where this process found it, whatever its sys.path.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(estargz.__file__)))


class IndexBuildError(RuntimeError):
    """The build process ended without an answer (killed, out of memory, a bug)."""


@dataclass(frozen=True)
class BuiltIndex:
    layer: estargz.Layer
    entries: int
    build_seconds: float  # the build itself, in the child
    queued_seconds: float  # waiting for a free build slot
    total_seconds: float  # from the call to the open index

    def describe(self) -> str:
        return (f"index of {self.entries} entries built in {self.total_seconds:.3f}s "
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


def _remove_partial(index_path: str) -> None:
    """What a build that was stopped leaves beside its index (see estargz.layer)."""
    for path in glob.glob(glob.escape(index_path) + ".*.building"):
        with contextlib.suppress(OSError):
            os.unlink(path)


async def build_index(footer: estargz.Footer, toc_bytes: bytes, expected_digest: str | None,
                      max_toc_size: int = estargz.toc.DEFAULT_MAX_TOC_SIZE, *,
                      index_path: str | None = None) -> BuiltIndex:
    """`estargz.load_toc(footer, toc_bytes, expected_digest, max_toc_size,
    index_path=index_path)`, run in a child process. Without `index_path` the index is
    a temporary file that goes with the layer."""
    started = time.perf_counter()
    if index_path is not None:
        return await _build(footer, toc_bytes, expected_digest, max_toc_size, index_path,
                            started)
    fd, path = tempfile.mkstemp(prefix="lazypull-layer-", suffix=".db")
    os.close(fd)
    try:
        # The open index keeps the unlinked file until the layer is closed.
        return await _build(footer, toc_bytes, expected_digest, max_toc_size, path, started)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _build(footer: estargz.Footer, toc_bytes: bytes, expected_digest: str | None,
                 max_toc_size: int, index_path: str, started: float) -> BuiltIndex:
    async with _slot():
        queued = time.perf_counter() - started
        answer = await _run_child(request_header(footer, expected_digest, max_toc_size,
                                                 index_path) + toc_bytes, index_path)
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


async def _run_child(request: bytes, index_path: str) -> dict[str, object]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "estargz.index_child", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_child_env())
    try:
        out, err = await process.communicate(request)
    except BaseException:  # cancelled: the build is not wanted any more
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.shield(process.wait())
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
