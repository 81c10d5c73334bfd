"""Memory of a benchmark node's snapshotter processes: lazypull's service and FUSE
manager, or stargz-snapshotter's daemon, read from /proc.

RSS counts every page a process maps, shared ones (libpython, libc) in full for each
process; PSS splits a shared page between the processes that map it, so the PSS of
two processes adds up to what they cost together.
"""

import os
import signal
import time
from pathlib import Path

from perf.harness import Node
from snapshotter import memory_trace

KB = 1024


def proc_status(pid: int | None) -> dict[str, int] | None:
    """VmRSS and VmHWM of `pid`, and its PSS, in bytes; None if it is gone."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key.lower() + "_bytes"] = int(value.split()[0]) * KB
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return found
    for line in rollup.splitlines():
        key, _, value = line.partition(":")
        if key == "Pss":
            found["pss_bytes"] = int(value.split()[0]) * KB
    return found


def children_of(pid: int | None) -> list[int]:
    """The PIDs of `pid`'s child processes (none if it is gone)."""
    if pid is None:
        return []
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in threads:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return found


def _children_status(pids: list[int]) -> dict[str, int] | None:
    """The summed figures of these processes (index builds of the FUSE manager, which
    are children of its own), None if there are none."""
    found = [m for m in map(proc_status, pids) if m]
    if not found:
        return None
    return {key: sum(m.get(key, 0) for m in found) for key in found[0]} | {"count": len(found)}


def node_memory(node: Node) -> dict:
    """Each snapshotter process's figures (None if gone) and their totals. The FUSE
    manager's children (processes that build layer indexes) count as one entry."""
    processes: dict[str, dict[str, int] | None] = {}
    if node.service is not None and node.service.process is not None:
        alive = node.service.process.poll() is None
        processes["service"] = proc_status(node.service.process.pid) if alive else None
        processes["fuse_manager"] = proc_status(node.service.fuse_manager_pid)
        processes["fuse_manager_children"] = _children_status(
            children_of(node.service.fuse_manager_pid))
    if node.stargz is not None and node.stargz.process is not None:
        processes["stargz"] = proc_status(node.stargz.process.pid) \
            if node.stargz.process.poll() is None else None
    live = [m for m in processes.values() if m]
    if memory_trace.trace_dir() is not None and node.service is not None:
        _ask_for_memory_report(node.service.fuse_manager_pid)

    def total(key: str) -> int | None:
        return sum(m.get(key, 0) for m in live) if live else None

    return {**processes, "total_rss_bytes": total("vmrss_bytes"),
            "total_hwm_bytes": total("vmhwm_bytes"), "total_pss_bytes": total("pss_bytes")}


def _ask_for_memory_report(pid: int | None) -> None:
    """With LAZYPULL_TRACEMALLOC set, the FUSE manager writes where its memory goes on
    SIGUSR2 (snapshotter/memory_trace.py); taken after the figures above, as tracing
    an allocation site costs memory of its own."""
    if pid is None:
        return
    os.kill(pid, signal.SIGUSR2)
    time.sleep(5)  # the report takes a snapshot of every traced block: let it finish
