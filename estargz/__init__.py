"""eStargz and zstd:chunked: seekable, chunk-verified container layer blobs.

Pure format code: it reads and writes bytes through the file objects and
sources it is handed and keeps no I/O policy of its own.
"""

from .errors import DigestMismatch, FooterError, FormatError, TarError, TOCError, VerificationError
from .footer import Compression, Footer, parse_footer
from .layer import Chunk, Layer, Node, Span
from .reader import BlobReader, BlobSource, FileSource, decode_chunk, load_toc
from .toc import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC,
    TOCEntry,
    iter_toc_entries,
    parse_toc,
)
from .writer import (
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    BuildOptions,
    BuildResult,
    build,
)

__all__ = [
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "TOC",
    "TOC_DIGEST_ANNOTATION",
    "UNCOMPRESSED_SIZE_ANNOTATION",
    "BlobReader",
    "BlobSource",
    "BuildOptions",
    "BuildResult",
    "Chunk",
    "Compression",
    "DigestMismatch",
    "FileSource",
    "Footer",
    "FooterError",
    "FormatError",
    "Layer",
    "Node",
    "Span",
    "TOCEntry",
    "TOCError",
    "TarError",
    "VerificationError",
    "build",
    "decode_chunk",
    "iter_toc_entries",
    "load_toc",
    "parse_footer",
    "parse_toc",
]
