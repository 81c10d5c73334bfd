"""Source layers are decompressed in bounded pieces, whatever they inflate to."""

import hashlib
import io
import tracemalloc
import zlib

import pytest

from converter.source_layer import LayerFormatError, _gunzip


class Sink(io.RawIOBase):
    """Counts and hashes what is written, keeps nothing."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.hash.update(data)
        self.size += len(data)
        return len(data)


def gzip_of_zeros(size: int, block: int = 1 << 20) -> bytes:
    deflater = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(block)
    return b"".join([deflater.compress(zeros) for _ in range(size // block)]
                    + [deflater.flush()])


def test_a_sparse_layer_inflates_in_bounded_pieces() -> None:
    size = 1 << 30
    compressed = gzip_of_zeros(size)  # about 1 MB: a thousandfold
    sink, digest = Sink(), hashlib.sha256()
    tracemalloc.start()
    try:
        assert _gunzip(io.BytesIO(compressed), sink, digest) == size  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # one piece in, one piece out; not the gigabyte
    zeros = hashlib.sha256()
    for _ in range(size >> 20):
        zeros.update(bytes(1 << 20))
    assert digest.hexdigest() == sink.hash.hexdigest() == zeros.hexdigest()


def test_members_padding_and_truncation() -> None:
    data = bytes(range(256)) * 20_000
    two = zlib.compress(data[:1000], wbits=31) + zlib.compress(data[1000:], wbits=31)
    sink = Sink()
    assert _gunzip(io.BytesIO(two + bytes(700)), sink, hashlib.sha256()) == len(data)  # type: ignore[arg-type]
    assert sink.hash.hexdigest() == hashlib.sha256(data).hexdigest()
    with pytest.raises(LayerFormatError, match="truncated"):
        _gunzip(io.BytesIO(two[:-20]), Sink(), hashlib.sha256())  # type: ignore[arg-type]
    with pytest.raises(LayerFormatError, match="corrupt"):
        _gunzip(io.BytesIO(two[:10] + b"\xff" * 50 + two[60:]), Sink(), hashlib.sha256())  # type: ignore[arg-type]
