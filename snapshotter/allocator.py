"""glibc malloc settings for the long-running node processes.

Reads decompress and verify chunks of up to 4 MiB in worker threads. glibc raises
its mmap threshold once the first such buffer is freed and from then on serves them
from per-thread arenas, which keep the memory: the FUSE manager grew by about 70 MB
over 64 reads of a huge file. A fixed threshold keeps large buffers in their own
mappings (returned to the system when freed), and two arenas bound what the
threads hold on to.
"""

import ctypes
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 256 << 10
ARENAS = 2


def tune() -> bool:
    """Apply the settings; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) \
        and bool(mallopt(_M_ARENA_MAX, ARENAS))
    if not applied:
        log.debug("mallopt refused the allocator settings")
    return applied


def trim() -> bool:
    """Hand the free memory at the top and in the middle of malloc's heaps back to
    the system (glibc's malloc_trim); False where the C library is not glibc."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    return bool(malloc_trim(0))
