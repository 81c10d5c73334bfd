"""The node processes' malloc settings: large buffers stay in mappings of their own
(returned to the system when freed) instead of in arenas that keep them."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Frees a few 4 MiB buffers (glibc raises its mmap threshold after such a free unless
# told otherwise), then reports whether a new one is a mapping of its own.
PROBE = """
import ctypes, sys
sys.path.insert(0, {root!r})
from snapshotter import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = allocator.tune() if sys.argv[1] == "tuned" else None
for _ in range(3):
    buffer = bytearray(4 << 20)
    del buffer
before = libc.mallinfo2().hblks
buffer = bytearray(4 << 20)
print(applied, libc.mallinfo2().hblks - before)
"""


def probe(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", PROBE.format(root=str(REPO_ROOT)), mode],
                          capture_output=True, text=True, check=True).stdout.split()


def test_large_buffers_stay_mapped_after_tuning() -> None:
    assert probe("tuned") == ["True", "1"]
    # Untuned, glibc would keep the buffer in its heap: the setting is what differs.
    assert probe("plain") == ["None", "0"]
