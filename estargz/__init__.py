"""eStargz and zstd:chunked: seekable, chunk-verified container layer blobs.

Pure format code: it reads and writes bytes through the file objects and
sources it is handed and keeps no I/O policy of its own.

The names below load their module on first use, so a process that only reads
layers (the FUSE manager) does not carry the writer, and one that only catches
`FormatError` carries next to nothing.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import (
        DigestMismatch,
        FooterError,
        FormatError,
        TarError,
        TOCError,
        VerificationError,
    )
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

_MODULE_OF = {
    **dict.fromkeys(("DigestMismatch", "FooterError", "FormatError", "TarError", "TOCError",
                     "VerificationError"), "errors"),
    **dict.fromkeys(("Compression", "Footer", "parse_footer"), "footer"),
    **dict.fromkeys(("Chunk", "Layer", "Node", "Span"), "layer"),
    **dict.fromkeys(("BlobReader", "BlobSource", "FileSource", "decode_chunk", "load_toc"),
                    "reader"),
    **dict.fromkeys(("NO_PREFETCH_LANDMARK", "PREFETCH_LANDMARK", "TOC", "TOCEntry",
                     "iter_toc_entries", "parse_toc"), "toc"),
    **dict.fromkeys(("TOC_DIGEST_ANNOTATION", "UNCOMPRESSED_SIZE_ANNOTATION", "BuildOptions",
                     "BuildResult", "build"), "writer"),
}

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


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
