"""The table of contents: entries, JSON encoding, and structural validation.

Field names and their order follow the reference implementation's `TOCEntry`,
with its omit-when-empty rules, so TOCs we write look like theirs.
"""

import base64
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .digests import is_sha256_digest
from .errors import TOCError

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"

ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})
# A TOC bigger than this is refused before it is decompressed or parsed.
DEFAULT_MAX_TOC_SIZE = 64 << 20
_MAX_INT = (1 << 63) - 1


def clean_name(name: str) -> str:
    """Canonical relative path of a TOC or tar name (`./a//b/` -> `a/b`; root -> "").

    Absolute names and `..` components are refused: a layer must never name a
    path outside its own root."""
    if name.startswith("/"):
        raise TOCError(f"entry name {name!r} is absolute")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise TOCError(f"entry name {name!r} contains a '..' component")
    return "/".join(parts)


def format_modtime(mtime: float) -> str:
    """RFC3339 in UTC rounded to the second; "" for the epoch, as the reference omits it."""
    if not math.isfinite(mtime):  # a PAX mtime may say "inf" or "nan"
        return ""
    seconds = math.floor(mtime + 0.5)
    if seconds == 0:
        return ""
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return ""


def parse_modtime(text: str) -> int:
    if not text:
        return 0
    try:
        return int(datetime.fromisoformat(text).timestamp())
    except ValueError:
        raise TOCError(f"modtime {text!r} is not RFC3339") from None


@dataclass
class TOCEntry:
    name: str
    type: str
    size: int = 0
    modtime: str = ""
    link_name: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    user_name: str = ""
    group_name: str = ""
    offset: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""
    inner_offset: int = 0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "type": self.type}
        optional: list[tuple[str, object]] = [
            ("size", self.size),
            ("modtime", self.modtime),
            ("linkName", self.link_name),
            ("mode", self.mode),
            ("uid", self.uid),
            ("gid", self.gid),
            ("userName", self.user_name),
            ("groupName", self.group_name),
            ("offset", self.offset),
            ("devMajor", self.dev_major),
            ("devMinor", self.dev_minor),
            (
                "xattrs",
                {k: base64.b64encode(v).decode() for k, v in sorted(self.xattrs.items())},
            ),
            ("digest", self.digest),
            ("chunkOffset", self.chunk_offset),
            ("chunkSize", self.chunk_size),
            ("chunkDigest", self.chunk_digest),
            ("innerOffset", self.inner_offset),
        ]
        out.update((key, value) for key, value in optional if value)
        return out

    @property
    def has_payload(self) -> bool:
        """True for entries whose bytes live in a compressed chunk of the blob."""
        return self.type == "chunk" or (self.type == "reg" and self.size > 0)


_INT_FIELDS = {
    "size": "size",
    "mode": "mode",
    "uid": "uid",
    "gid": "gid",
    "offset": "offset",
    "devMajor": "dev_major",
    "devMinor": "dev_minor",
    "chunkOffset": "chunk_offset",
    "chunkSize": "chunk_size",
    "innerOffset": "inner_offset",
}
_STR_FIELDS = {
    "modtime": "modtime",
    "linkName": "link_name",
    "userName": "user_name",
    "groupName": "group_name",
    "digest": "digest",
    "chunkDigest": "chunk_digest",
}


def _check_text(where: str, what: str, text: str) -> None:
    """JSON escapes can spell lone surrogates, which no path or name may hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TOCError(f"{where}: {what} {text!r} is not valid UTF-8") from None


def _entry_from_json(index: int, raw: object) -> TOCEntry:
    where = f"TOC entry #{index}"
    if not isinstance(raw, dict):
        raise TOCError(f"{where} is not an object")
    name, kind = raw.get("name"), raw.get("type")
    if not isinstance(name, str) or not name:
        raise TOCError(f"{where} has no name")
    where = f"TOC entry #{index} ({name!r})"
    _check_text(where, "name", name)
    if not isinstance(kind, str) or kind not in ENTRY_TYPES:
        raise TOCError(f"{where} has unknown type {kind!r}")
    entry = TOCEntry(name=name, type=kind)
    for key, attr in _INT_FIELDS.items():
        value = raw.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
            raise TOCError(f"{where}: {key} must be a non-negative integer, not {value!r}")
        setattr(entry, attr, value)
    for key, attr in _STR_FIELDS.items():
        value = raw.get(key, "")
        if not isinstance(value, str):
            raise TOCError(f"{where}: {key} must be a string")
        _check_text(where, key, value)
        setattr(entry, attr, value)
    parse_modtime(entry.modtime)
    for key in ("digest", "chunkDigest"):
        value = raw.get(key, "")
        if value and not is_sha256_digest(value):
            raise TOCError(f"{where}: {key} {value!r} is not a sha256 digest")
    xattrs = raw.get("xattrs") or {}
    if not isinstance(xattrs, dict):
        raise TOCError(f"{where}: xattrs must be an object")
    for key, value in xattrs.items():
        if not isinstance(value, str):
            raise TOCError(f"{where}: xattr {key!r} is not base64 text")
        _check_text(where, "xattr name", key)
        try:
            entry.xattrs[key] = base64.b64decode(value, validate=True)
        except ValueError:  # binascii.Error, or text that is not even ASCII
            raise TOCError(f"{where}: xattr {key!r} is not valid base64") from None
    if entry.has_payload and not entry.chunk_digest:
        raise TOCError(f"{where} holds data but has no chunkDigest")
    if kind in ("symlink", "hardlink") and not entry.link_name:
        raise TOCError(f"{where} is a {kind} without linkName")
    return entry


@dataclass
class TOC:
    entries: list[TOCEntry]
    version: int = 1

    def to_json_bytes(self) -> bytes:
        doc = {"version": self.version, "entries": [e.to_json() for e in self.entries]}
        return json.dumps(doc, indent="\t", ensure_ascii=False).encode("utf-8")


def parse_toc(data: bytes, *, max_entries: int = 10_000_000) -> TOC:
    """Parse and structurally validate TOC JSON; semantic checks live in `layer`."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise TOCError(f"TOC is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise TOCError("TOC JSON is not an object")
    version = doc.get("version")
    if version != 1:
        raise TOCError(f"unsupported TOC version {version!r}")
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, list):
        raise TOCError("TOC has no entries list")
    if len(raw_entries) > max_entries:
        raise TOCError(f"TOC has {len(raw_entries)} entries, more than {max_entries}")
    return TOC(entries=[_entry_from_json(i, raw) for i, raw in enumerate(raw_entries)])
