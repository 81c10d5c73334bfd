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


# Fills the heap with small blocks, frees all but the last (which pins the top), and
# reports the heap's resident kB before and after trimming.
TRIM_PROBE = """
import ctypes, sys
sys.path.insert(0, {root!r})
from snapshotter import allocator

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def heap_rss_kb():
    rss, in_heap = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            in_heap = line.rstrip().endswith("[heap]")
        elif in_heap and line.startswith("Rss:"):
            rss += int(line.split()[1])
    return rss

blocks = [libc.malloc(1024) for _ in range(40000)]
for block in blocks:
    ctypes.memset(block, 1, 1024)
for block in blocks[:-1]:
    libc.free(block)
before = heap_rss_kb()
trimmed = allocator.trim()
print(trimmed, before, heap_rss_kb())
"""


def test_trim_returns_the_free_middle_of_the_heap() -> None:
    done = subprocess.run([sys.executable, "-c", TRIM_PROBE.format(root=str(REPO_ROOT))],
                          capture_output=True, text=True, check=True).stdout.split()
    trimmed, before, after = done[0], int(done[1]), int(done[2])
    assert trimmed == "True"
    assert before - after > 20_000  # of about 40 MB freed below the last block
