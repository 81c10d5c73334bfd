"""The index blob: a versioned header, then four sections.

    magic   8 bytes  b"\\x89LPGZIX\\n"
    length  4 bytes  little-endian size of the header JSON
    header  JSON     version, the layer it indexes, and where each section lies
    spans   SPAN.size bytes per span, in uncompressed order
    files   zstd frame: one JSON array per line, one line per tar member
    hot     zstd frame: a JSON list of paths to prefetch, in priority order
    windows zstd frames, one per span that resumes inside a member

A span is the uncompressed bytes between two checkpoints; its record says where
its compressed bytes lie, how many bits of its first byte to skip, where its
window is, and the sha256 of its uncompressed bytes. The header carries the
sha256 of the spans, files and hot sections; the windows need none, because a
wrong window inflates to bytes that fail their span's digest. docs/gzip-index.md
describes all of it for other implementations.
"""

import itertools
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from estargz.digests import is_sha256_digest

from .errors import IndexFormatError

MAGIC = b"\x89LPGZIX\n"
FORMAT_VERSION = 1
INDEX_MEDIA_TYPE = "application/vnd.lazypull.gzip-index.v1"
ARTIFACT_TYPE = "application/vnd.lazypull.gzip-index.artifact.v1"
# On each index blob of an artifact: the digest of the layer it indexes.
LAYER_ANNOTATION = "dev.lazypull.gzip-index.layer"
SPACING_ANNOTATION = "dev.lazypull.gzip-index.spacing"

_PREAMBLE = struct.Struct("<8sI")
MAX_HEADER_SIZE = 1 << 20
# uncompressed start, compressed start, compressed end, uncompressed length,
# window length (compressed, 0 for none), bits to skip, window offset, sha256
SPAN = struct.Struct("<QQQIIB3xQ32s")
MAX_WINDOW = 32768
MIN_SPACING = 8 << 10
MAX_SPACING = 1 << 30
DEFAULT_SPACING = 4 << 20
# Checkpoints sit at block boundaries, so a span can pass the spacing by up to one
# deflate block (zlib's inflate to at most 4 MiB; other encoders' to more). A reader
# decodes whole spans: this bounds its memory.
MAX_SPAN_OVERSHOOT = 64 << 20
SECTIONS = ("spans", "files", "hot", "windows")
_MAX_INT = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Section:
    offset: int
    length: int
    count: int = 0
    digest: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"offset": self.offset, "length": self.length}
        if self.digest:
            out.update(count=self.count, digest=self.digest)
        return out


@dataclass(frozen=True)
class Header:
    layer_digest: str
    layer_size: int
    diff_id: str
    uncompressed_size: int
    spacing: int
    sections: dict[str, Section] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        doc = {
            "version": self.version,
            "layer": {"digest": self.layer_digest, "size": self.layer_size,
                      "diffID": self.diff_id, "uncompressedSize": self.uncompressed_size},
            "spacing": self.spacing,
            **{name: self.sections[name].to_json() for name in SECTIONS},
        }
        text = json.dumps(doc, separators=(",", ":")).encode()
        return _PREAMBLE.pack(MAGIC, len(text)) + text

    @property
    def end(self) -> int:
        """Where the index blob ends: after its last section."""
        return max(s.offset + s.length for s in self.sections.values())


def preamble_size() -> int:
    return _PREAMBLE.size


def header_length(preamble: bytes) -> int:
    """The header JSON's length, from the first bytes of an index blob."""
    if len(preamble) < _PREAMBLE.size:
        raise IndexFormatError("index is truncated: shorter than its preamble")
    magic, length = _PREAMBLE.unpack_from(preamble)
    if magic != MAGIC:
        raise IndexFormatError("not a lazypull gzip index (bad magic)")
    if length > MAX_HEADER_SIZE:
        raise IndexFormatError(f"index header of {length} bytes is larger than allowed")
    return length


def _int(doc: dict[str, Any], key: str, where: str) -> int:
    value = doc.get(key)
    if value.__class__ is not int or not 0 <= value <= _MAX_INT:
        raise IndexFormatError(f"index header: {where}{key} must be a non-negative integer")
    return value


def _digest(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not is_sha256_digest(value):
        raise IndexFormatError(f"index header: {where}{key} is not a sha256 digest")
    return value  # type: ignore[return-value]


def parse_header(text: bytes, blob_size: int) -> Header:
    """Parse and check the header JSON against the size of the whole index blob."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise IndexFormatError("index header is not JSON") from None
    if not isinstance(doc, dict):
        raise IndexFormatError("index header is not a JSON object")
    if doc.get("version") != FORMAT_VERSION or isinstance(doc.get("version"), bool):
        raise IndexFormatError(f"unsupported gzip index version {doc.get('version')!r} "
                               f"(this lazypull reads version {FORMAT_VERSION})")
    layer = doc.get("layer")
    if not isinstance(layer, dict):
        raise IndexFormatError("index header has no layer object")
    sections: dict[str, Section] = {}
    start = _PREAMBLE.size + len(text)
    for name in SECTIONS:
        raw = doc.get(name)
        if not isinstance(raw, dict):
            raise IndexFormatError(f"index header has no {name} section")
        where = f"{name}."
        section = Section(_int(raw, "offset", where), _int(raw, "length", where),
                          _int(raw, "count", where) if name != "windows" else 0,
                          _digest(raw, "digest", where) if name != "windows" else "")
        if section.offset < start or section.offset + section.length > blob_size:
            raise IndexFormatError(f"index {name} section lies outside the index "
                                   f"(is the index truncated?)")
        sections[name] = section
    ordered = sorted(sections.values(), key=lambda s: s.offset)
    for before, after in itertools.pairwise(ordered):
        if before.offset + before.length > after.offset:
            raise IndexFormatError("index sections overlap")
    header = Header(
        layer_digest=_digest(layer, "digest", "layer."),
        layer_size=_int(layer, "size", "layer."),
        diff_id=_digest(layer, "diffID", "layer."),
        uncompressed_size=_int(layer, "uncompressedSize", "layer."),
        spacing=_int(doc, "spacing", ""),
        sections=sections,
    )
    spans = sections["spans"]
    if spans.length != spans.count * SPAN.size:
        raise IndexFormatError(f"index spans section holds {spans.length} bytes, not "
                               f"{spans.count} records of {SPAN.size}")
    if not MIN_SPACING <= header.spacing <= MAX_SPACING:
        raise IndexFormatError(f"index spacing {header.spacing} is out of range")
    if header.end != blob_size:
        raise IndexFormatError(f"index blob has {blob_size} bytes, its sections end at "
                               f"{header.end}")
    return header
