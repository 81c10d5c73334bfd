"""What a run read from files, as the page cache shows it afterwards."""

import contextlib
import ctypes
import mmap
import os
from pathlib import Path


def resident_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache (mincore over a shared read-only mapping)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = (size + page - 1) // page
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return min(size, sum(1 for v in vector if v & 1) * page)
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def read_ahead_kb(path: Path) -> int | None:
    """The readahead of the block device under `path`: pages read past what the workload
    asked for count in its `bytes` read."""
    device = os.stat(path).st_dev
    block = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}").resolve()
    for queue in (block / "queue", block.parent / "queue"):
        with contextlib.suppress(OSError, ValueError):
            return int((queue / "read_ahead_kb").read_text())
    return None
