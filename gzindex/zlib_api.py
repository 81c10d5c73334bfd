"""The parts of the system zlib that Python's `zlib` module does not expose.

Finding checkpoints needs `inflate(Z_BLOCK)`, which stops at deflate block
boundaries and reports the bit position there, and `inflateGetDictionary`, which
hands out the 32 KiB window a later reader resumes with. Both are reached through
ctypes; the struct below follows `z_stream` in zlib.h.
"""

import ctypes
import ctypes.util
import functools

Z_OK = 0
Z_STREAM_END = 1
Z_NEED_DICT = 2
Z_DATA_ERROR = -3
Z_MEM_ERROR = -4
Z_BUF_ERROR = -5
Z_BLOCK = 5
WINDOW_SIZE = 32768
# `data_type` after inflate(Z_BLOCK): unused bits in the last input byte (low 3 bits),
# 64 while in the last block, 128 just after an end-of-block code.
DATA_TYPE_BITS = 7
DATA_TYPE_LAST_BLOCK = 64
DATA_TYPE_BLOCK_END = 128


class ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


class ZlibUnavailable(RuntimeError):
    """The system zlib cannot be loaded (or is too old to index gzip layers)."""


@functools.cache
def libz() -> ctypes.CDLL:
    name = ctypes.util.find_library("z")
    if name is None:
        raise ZlibUnavailable("the system zlib (libz.so) is not installed")
    lib = ctypes.CDLL(name)
    stream_p = ctypes.POINTER(ZStream)
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = [stream_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.inflate.argtypes = [stream_p, ctypes.c_int]
    lib.inflateEnd.argtypes = [stream_p]
    lib.inflateReset.argtypes = [stream_p]
    lib.inflatePrime.argtypes = [stream_p, ctypes.c_int, ctypes.c_int]
    lib.inflateSetDictionary.argtypes = [stream_p, ctypes.c_char_p, ctypes.c_uint]
    lib.inflateGetDictionary.argtypes = [stream_p, ctypes.c_char_p,
                                         ctypes.POINTER(ctypes.c_uint)]
    for function in ("inflateInit2_", "inflate", "inflateEnd", "inflateReset", "inflatePrime",
                     "inflateSetDictionary", "inflateGetDictionary"):
        getattr(lib, function).restype = ctypes.c_int
    return lib


class RawInflater:
    """A raw-deflate (no zlib or gzip wrapper) inflate stream of the system zlib."""

    def __init__(self) -> None:
        self.lib = libz()
        self.stream = ZStream()
        version = self.lib.zlibVersion()
        ret = self.lib.inflateInit2_(ctypes.byref(self.stream), -15, version,
                                     ctypes.sizeof(ZStream))
        if ret != Z_OK:
            raise ZlibUnavailable(f"inflateInit2 failed ({ret})")
        self._closed = False

    def reset(self) -> None:
        self.lib.inflateReset(ctypes.byref(self.stream))

    def inflate(self, flush: int) -> int:
        return self.lib.inflate(ctypes.byref(self.stream), flush)

    def window(self) -> bytes:
        """The last (up to) 32 KiB of output: what inflating from here needs."""
        buffer = ctypes.create_string_buffer(WINDOW_SIZE)
        length = ctypes.c_uint(0)
        ret = self.lib.inflateGetDictionary(ctypes.byref(self.stream), buffer,
                                            ctypes.byref(length))
        if ret != Z_OK:
            raise ZlibUnavailable(f"inflateGetDictionary failed ({ret})")
        return buffer.raw[:length.value]

    def prime(self, bits: int, value: int) -> None:
        if bits and self.lib.inflatePrime(ctypes.byref(self.stream), bits, value) != Z_OK:
            raise ZlibUnavailable("inflatePrime failed")

    def set_window(self, window: bytes) -> None:
        if window and self.lib.inflateSetDictionary(ctypes.byref(self.stream), window,
                                                    len(window)) != Z_OK:
            raise ZlibUnavailable("inflateSetDictionary failed")

    @property
    def message(self) -> str:
        raw = self.stream.msg
        return raw.decode("utf-8", "replace") if raw else "invalid deflate data"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.lib.inflateEnd(ctypes.byref(self.stream))

    def __del__(self) -> None:
        self.close()
