"""Turn a downloaded source layer into an uncompressed tar and read its paths."""

import hashlib
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import zstandard

from estargz.tarindex import is_reserved, scan_tar
from oci import mediatypes as mt

_PIECE = 1 << 20


class LayerFormatError(ValueError):
    """A source layer that cannot be decompressed or is not the tar it claims to be."""


def _gunzip(src: BinaryIO, dst: BinaryIO, digest: "hashlib._Hash") -> int:
    size = 0
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def emit(out: bytes) -> None:
        nonlocal size
        dst.write(out)
        digest.update(out)
        size += len(out)

    while data := src.read(_PIECE):
        while data:
            if inflater.eof:
                if data.strip(b"\0") == b"":
                    break  # zero padding after the last member is harmless
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                # Bounded output: a piece of a sparse file's layer inflates a
                # thousandfold. What the bound held back comes out on later calls.
                out = inflater.decompress(data, _PIECE)
                emit(out)
                while not inflater.eof and not inflater.unconsumed_tail \
                        and len(out) == _PIECE:
                    out = inflater.decompress(b"", _PIECE)
                    emit(out)
            except zlib.error as exc:
                raise LayerFormatError(f"corrupt gzip data: {exc}") from None
            data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
    if not inflater.eof:
        raise LayerFormatError("gzip stream is truncated")
    return size


def _unzstd(src: BinaryIO, dst: BinaryIO, digest: "hashlib._Hash") -> int:
    size = 0
    reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
    try:
        while piece := reader.read(_PIECE):
            dst.write(piece)
            digest.update(piece)
            size += len(piece)
    except zstandard.ZstdError as exc:
        raise LayerFormatError(f"corrupt zstd data: {exc}") from None
    return size


def _copy(src: BinaryIO, dst: BinaryIO, digest: "hashlib._Hash") -> int:
    size = 0
    while piece := src.read(_PIECE):
        dst.write(piece)
        digest.update(piece)
        size += len(piece)
    return size


def decompress_layer(src_path: str, media_type: str, tar_path: str) -> tuple[str, int]:
    """Write the layer's tar to `tar_path`; returns (diff_id, uncompressed size)."""
    digest = hashlib.sha256()
    if media_type in mt.GZIP_LAYERS:
        unpack = _gunzip
    elif media_type in mt.ZSTD_LAYERS:
        unpack = _unzstd
    elif media_type in mt.UNCOMPRESSED_LAYERS:
        unpack = _copy
    else:
        raise LayerFormatError(f"unsupported layer media type {media_type}")
    with open(src_path, "rb") as src, open(tar_path, "wb") as dst:
        size = unpack(src, dst, digest)
    return "sha256:" + digest.hexdigest(), size


def iter_paths(tar_path: str) -> Iterator[str]:
    """Normalized paths of the tar's entries, in tar order (landmarks and TOCs left out),
    as the tar is read."""
    with open(tar_path, "rb") as f:
        for member in scan_tar(f):
            if member.path and not is_reserved(member.path):
                yield member.path
