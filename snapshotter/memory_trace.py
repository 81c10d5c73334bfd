"""Where a node process's memory goes, on request: a diagnostic, off by default.

With LAZYPULL_TRACEMALLOC set to a directory, the process starts tracemalloc at once
and, on SIGUSR2, writes
`<dir>/memory-<pid>-<n>.txt`: the Python heap's largest allocation sites by traceback,
the live object counts by type, and /proc/self/smaps_rollup (anonymous against file
pages). tracemalloc costs memory and time of its own, so the figures of a traced run
are for attribution, not for reporting. LAZYPULL_TRACEMALLOC_FRAMES=0 leaves
tracemalloc off: the report then holds the figures outside the Python heap and
those of Python's small-object allocator (which it cannot give while tracing), of a
process the size it would be.
"""

import asyncio
import collections
import ctypes
import gc
import itertools
import logging
import os
import signal
import sys
import tempfile
import tracemalloc
from pathlib import Path

ENV_VAR = "LAZYPULL_TRACEMALLOC"
FRAMES_ENV_VAR = "LAZYPULL_TRACEMALLOC_FRAMES"
DEFAULT_FRAMES = 12
TOP_SITES = 40
TOP_TYPES = 30

log = logging.getLogger(__name__)
_dumps = itertools.count(1)


def trace_dir() -> Path | None:
    value = os.environ.get(ENV_VAR, "")
    return Path(value) if value else None


def frames() -> int:
    try:
        return max(0, int(os.environ.get(FRAMES_ENV_VAR, DEFAULT_FRAMES)))
    except ValueError:
        return DEFAULT_FRAMES


def start() -> bool:
    """Start tracing if asked; True if reports were asked for."""
    if trace_dir() is None:
        return False
    if frames() and not tracemalloc.is_tracing():
        tracemalloc.start(frames())
    return True


def install(loop: asyncio.AbstractEventLoop) -> bool:
    """Dump on SIGUSR2 if tracing was asked for; True if installed."""
    if not start():
        return False
    loop.add_signal_handler(signal.SIGUSR2, dump)
    return True


def dump() -> Path | None:
    """Write one report; its path (None if tracing is off or the write failed)."""
    directory = trace_dir()
    if directory is None:
        return None
    gc.collect()
    path = directory / f"memory-{os.getpid()}-{next(_dumps)}.txt"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(report())
    except OSError as exc:
        log.warning("cannot write the memory report %s: %s", path, exc)
        return None
    log.info("memory report written to %s", path)
    return path


def report() -> str:
    lines = _traced_lines() if tracemalloc.is_tracing() else ["tracemalloc off"]
    lines += ["", "== live objects by type =="]
    counts = collections.Counter(type(o).__name__ for o in gc.get_objects())
    lines += [f"{count:10d} {name}" for name, count in counts.most_common(TOP_TYPES)]
    lines += ["", "== outside the Python heap =="]
    lines += [f"{name}: {value / 1e6:.2f} MB" for name, value in native_figures().items()]
    lines += ["", "== Python's small-object allocator (sys._debugmallocstats) =="]
    lines.append(_small_object_stats())
    lines += ["", "== /proc/self/smaps_rollup =="]
    try:
        lines.append(Path("/proc/self/smaps_rollup").read_text())
    except OSError as exc:
        lines.append(f"unreadable: {exc}")
    return "\n".join(lines) + "\n"


def _traced_lines() -> list[str]:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    traced, peak = tracemalloc.get_traced_memory()
    lines = [f"traced now {traced / 1e6:.1f} MB, peak {peak / 1e6:.1f} MB", "",
             "== by file and line =="]
    for stat in snapshot.statistics("lineno")[:TOP_SITES]:
        lines.append(f"{stat.size / 1e6:8.2f} MB {stat.count:8d} {stat.traceback[0]}")
    lines += ["", "== by traceback =="]
    for stat in snapshot.statistics("traceback")[:TOP_SITES]:
        lines.append(f"{stat.size / 1e6:8.2f} MB {stat.count:8d} blocks")
        lines += [f"    {frame}" for frame in stat.traceback.format(most_recent_first=True)]
    return lines


def _small_object_stats() -> str:
    """The summary lines of sys._debugmallocstats, which writes to file descriptor 2:
    arenas in use, and the bytes their free pools and blocks pin."""
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")
    keep = ("# arenas", "# bytes in", "Total")
    return "\n".join(line for line in text.splitlines() if line.startswith(keep))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def native_figures() -> dict[str, int]:
    """glibc malloc's heap (in use, free but kept, mmapped) and SQLite's own count of
    the memory it holds (page caches, statements), in bytes; what is unavailable is
    left out."""
    figures: dict[str, int] = {}
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
        mallinfo2.restype = _MallInfo2
        info = mallinfo2()
        figures.update({"malloc in use": info.uordblks, "malloc free, kept": info.fordblks,
                        "malloc mmapped": info.hblkhd})
    except (OSError, AttributeError):
        pass
    try:
        sqlite = ctypes.CDLL("libsqlite3.so.0")
        sqlite.sqlite3_memory_used.restype = ctypes.c_int64
        sqlite.sqlite3_memory_highwater.restype = ctypes.c_int64
        sqlite.sqlite3_memory_highwater.argtypes = [ctypes.c_int]
        figures["sqlite in use"] = sqlite.sqlite3_memory_used()
        figures["sqlite high-water"] = sqlite.sqlite3_memory_highwater(0)
    except (OSError, AttributeError):
        pass
    return figures
