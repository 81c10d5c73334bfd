"""A seekable index for unmodified gzip layers, and verified random access through it.

Pure format code, like `estargz`: it reads the layer and the index through the
file objects and fetch functions it is handed. `build_index` / `scan_layer` read
a gzip layer once and write its index (docs/gzip-index.md); `GzipIndex` opens an
index, and `LayerReader` (or `decode_span`) turns fetched byte ranges of the
layer into uncompressed bytes that were checked against the index's digests.
"""

from .builder import (
    IndexResult,
    ScannedLayer,
    build_index,
    rescan_for_hot_files,
    scan_layer,
)
from .entries import FileEntry
from .errors import CorruptLayerError, IndexFormatError, SpanDigestMismatch
from .format import (
    ARTIFACT_TYPE,
    DEFAULT_SPACING,
    INDEX_MEDIA_TYPE,
    LAYER_ANNOTATION,
    MAX_SPACING,
    MIN_SPACING,
    SPACING_ANNOTATION,
)
from .reader import Fetch, GzipIndex, LayerReader, Span, decode_span, file_fetcher

__all__ = [
    "ARTIFACT_TYPE",
    "DEFAULT_SPACING",
    "INDEX_MEDIA_TYPE",
    "LAYER_ANNOTATION",
    "MAX_SPACING",
    "MIN_SPACING",
    "SPACING_ANNOTATION",
    "CorruptLayerError",
    "Fetch",
    "FileEntry",
    "GzipIndex",
    "IndexFormatError",
    "IndexResult",
    "LayerReader",
    "ScannedLayer",
    "Span",
    "SpanDigestMismatch",
    "build_index",
    "decode_span",
    "file_fetcher",
    "rescan_for_hot_files",
    "scan_layer",
]
