"""perf/node_memory.py: a process's children are found and counted in the figures."""

import os
import subprocess
import sys

from perf.node_memory import _children_status, children_of, proc_status


def test_children_are_found_and_summed_then_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        assert child.pid in children_of(os.getpid())
        own = proc_status(child.pid)
        summed = _children_status([child.pid])
        assert own is not None and summed is not None
        assert summed["count"] == 1 and summed["vmrss_bytes"] > 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert child.pid not in children_of(os.getpid())
    assert _children_status([child.pid]) is None


def test_a_gone_process_has_no_children() -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    assert children_of(int(finished.stdout)) == []
    assert children_of(None) == []
