"""The table of contents: entries, JSON encoding, and structural validation.

Field names and their order follow the reference implementation's `TOCEntry`,
with its omit-when-empty rules, so TOCs we write look like theirs.
"""

import base64
import codecs
import functools
import hashlib
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

from .digests import is_sha256_digest
from .errors import TOCError

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"

ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})
# A TOC bigger than this is refused before or while it is decompressed. TOCs are
# parsed as a stream into an on-disk index, so this bounds disk and time, not memory:
# 10^6 files make a TOC of about 300 MB.
DEFAULT_MAX_TOC_SIZE = 1 << 30
# One entry's JSON (a file with many xattrs can be large) may be at most this long.
MAX_ENTRY_TEXT = 64 << 20
DEFAULT_MAX_ENTRIES = 10_000_000
_MAX_INT = (1 << 63) - 1
# Components of a path (a name's slashes, counted before it is cleaned): deeper
# names are refused before they are split.
MAX_PATH_DEPTH = 1 << 14
# Extended attributes as Linux bounds them (XATTR_NAME_MAX, XATTR_SIZE_MAX and
# XATTR_LIST_MAX): an entry beyond them could not be unpacked onto any Linux
# filesystem, and its FUSE attributes could not be listed.
MAX_XATTR_NAME_BYTES = 255
MAX_XATTR_VALUE_BYTES = 64 << 10
MAX_XATTR_LIST_BYTES = 64 << 10


# Names in error messages are cut to this many characters: a name may be megabytes
# long, and a message travels in log lines and over the FUSE manager's socket.
_SHOWN_NAME = 256


def shown(name: str) -> str:
    """`name` as an error message quotes it."""
    return repr(name if len(name) <= _SHOWN_NAME else name[:_SHOWN_NAME] + "...")


def entry_where(index: int, name: str) -> str:
    """How an error message names a TOC entry."""
    return f"TOC entry #{index} ({shown(name)})"


class EntryWhere:
    """`entry_where(index, name)`, spelled out only when a message is: checks carry
    one for every entry of a TOC, and nearly all of them pass."""

    __slots__ = ("index", "name")

    def __init__(self, index: int, name: str):
        self.index = index
        self.name = name

    def __str__(self) -> str:
        return entry_where(self.index, self.name)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def clean_name(name: str) -> str:
    """Canonical relative path of a TOC or tar name (`./a//b/` -> `a/b`; root -> "").

    Absolute names and `..` components are refused: a layer must never name a
    path outside its own root."""
    if name.startswith("/"):
        raise TOCError(f"entry name {shown(name)} is absolute")
    if "\0" in name:  # the kernel would cut it there: another name than the TOC's
        raise TOCError(f"entry name {shown(name)} contains a NUL character")
    if name.count("/") >= MAX_PATH_DEPTH:
        raise TOCError(f"entry name {shown(name)} is more than {MAX_PATH_DEPTH} "
                       "components deep")
    if not name.startswith("./") and "//" not in name and "/./" not in name \
            and "/.." not in name and not name.startswith(".."):
        # Already canonical but for a directory's trailing slash: the common case.
        clean = name[:-1] if name.endswith("/") else name
        if clean != "." and not clean.endswith("/."):
            return clean
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise TOCError(f"entry name {shown(name)} contains a '..' component")
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


@functools.lru_cache(maxsize=4096)  # a layer's files share few distinct times
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
        raise TOCError(f"{where}: {what} {shown(text)} is not valid UTF-8") from None


# JSON member -> (TOCEntry attribute, whether it is an integer), for the members
# that are plain values.
_FIELDS = {**{key: (attr, True) for key, attr in _INT_FIELDS.items()},
           **{key: (attr, False) for key, attr in _STR_FIELDS.items()}}


def _entry_from_json(index: int, raw: object) -> TOCEntry:
    # This runs for every entry of a TOC: exact-class checks (JSON gives exact types),
    # one lookup per member, and error messages built only on failure.
    if raw.__class__ is not dict:
        raise TOCError(f"TOC entry #{index} is not an object")
    name, kind = raw.get("name"), raw.get("type")  # type: ignore[attr-defined]
    if name.__class__ is not str or not name:
        raise TOCError(f"TOC entry #{index} has no name")
    if not name.isascii():
        _check_text(f"TOC entry #{index}", "name", name)
    if kind.__class__ is not str or kind not in ENTRY_TYPES:
        raise TOCError(f"{entry_where(index, name)} has unknown type {kind!r}")
    fields: dict[str, Any] = {}
    xattrs: object = None
    for key, value in raw.items():  # type: ignore[attr-defined]
        known = _FIELDS.get(key)
        if known is None:
            if key == "xattrs":
                xattrs = value
            continue
        attr, integer = known
        if integer:
            if value.__class__ is not int or not 0 <= value <= _MAX_INT:
                raise TOCError(f"{entry_where(index, name)}: {key} must be a non-negative "
                               f"integer, not {value!r}")
        elif value.__class__ is not str:
            raise TOCError(f"{entry_where(index, name)}: {key} must be a string")
        elif not value.isascii():
            _check_text(entry_where(index, name), key, value)
        fields[attr] = value
    entry = TOCEntry(name=name, type=kind, **fields)
    if entry.modtime:
        parse_modtime(entry.modtime)
    digest, chunk_digest = entry.digest, entry.chunk_digest
    if digest and not is_sha256_digest(digest):
        raise TOCError(f"{entry_where(index, name)}: digest {digest!r} is not a sha256 digest")
    if chunk_digest and chunk_digest != digest and not is_sha256_digest(chunk_digest):
        raise TOCError(f"{entry_where(index, name)}: chunkDigest {chunk_digest!r} is not a "
                       "sha256 digest")
    if xattrs:
        _add_xattrs(entry, entry_where(index, name), xattrs)
    if not chunk_digest and entry.has_payload:
        raise TOCError(f"{entry_where(index, name)} holds data but has no chunkDigest")
    if kind in ("symlink", "hardlink") and not entry.link_name:
        raise TOCError(f"{entry_where(index, name)} is a {kind} without linkName")
    if "\0" in entry.link_name:
        raise TOCError(f"{entry_where(index, name)}: linkName contains a NUL character")
    return entry


def _add_xattrs(entry: TOCEntry, where: str, xattrs: object) -> None:
    if not isinstance(xattrs, dict):
        raise TOCError(f"{where}: xattrs must be an object")
    listed = 0
    for key, value in xattrs.items():
        if not isinstance(value, str):
            raise TOCError(f"{where}: xattr {key!r} is not base64 text")
        _check_text(where, "xattr name", key)
        try:
            entry.xattrs[key] = base64.b64decode(value, validate=True)
        except ValueError:  # binascii.Error, or text that is not even ASCII
            raise TOCError(f"{where}: xattr {key!r} is not valid base64") from None
        listed = check_xattr(where, key, entry.xattrs[key], listed)


def check_xattr(where: str, name: str, value: bytes, listed: int) -> int:
    """Refuse an extended attribute Linux cannot hold; `listed` is the size of the
    entry's name list so far, and the size with this name is returned."""
    size = len(name.encode("utf-8", "surrogateescape"))
    if not 0 < size <= MAX_XATTR_NAME_BYTES or "\0" in name:
        raise TOCError(f"{where}: xattr name {name[:64]!r} is empty, longer than "
                       f"{MAX_XATTR_NAME_BYTES} bytes or holds a NUL character")
    if len(value) > MAX_XATTR_VALUE_BYTES:
        raise TOCError(f"{where}: xattr {name!r} holds {len(value)} bytes, more than "
                       f"{MAX_XATTR_VALUE_BYTES}")
    listed += size + 1
    if listed > MAX_XATTR_LIST_BYTES:
        raise TOCError(f"{where}: xattr names take more than {MAX_XATTR_LIST_BYTES} bytes "
                       "(too many extended attributes)")
    return listed


@dataclass
class TOC:
    entries: list[TOCEntry]
    version: int = 1

    def to_json_bytes(self) -> bytes:
        doc = {"version": self.version, "entries": [e.to_json() for e in self.entries]}
        return json.dumps(doc, indent="\t", ensure_ascii=False).encode("utf-8")


# What json.dumps encodes strings with when ensure_ascii is off.
_json_string = json.encoder.encode_basestring


def entry_json(entry: TOCEntry) -> str:
    """The entry as `TOC.to_json_bytes` writes it in its list (json.dumps with a tab
    indent), without the separator before it. Its values are only strings, integers
    and the xattrs' object of strings, so it is written here directly: json.dumps
    with an indent runs in pure Python and would be the slowest step of a TOC."""
    fields = []
    for key, value in entry.to_json().items():
        if isinstance(value, str):
            text = _json_string(value)
        elif isinstance(value, dict):
            text = "{\n\t\t\t\t" + ",\n\t\t\t\t".join(
                f"{_json_string(k)}: {_json_string(v)}" for k, v in value.items()
            ) + "\n\t\t\t}"
        else:
            text = int.__repr__(value)  # type: ignore[arg-type]
        fields.append(f'"{key}": {text}')
    return "\t\t{\n\t\t\t" + ",\n\t\t\t".join(fields) + "\n\t\t}"


class TOCWriter:
    """Writes a TOC's JSON to a binary file an entry at a time, byte for byte what
    `TOC.to_json_bytes` gives for the same entries, and hashes it on the way: a TOC
    of any size is never held whole."""

    _FLUSH_EVERY = 256  # entries

    def __init__(self, file: BinaryIO, version: int = 1):
        self._file = file
        self._hash = hashlib.sha256()
        self._pending = [f'{{\n\t"version": {int.__repr__(version)},\n\t"entries": [']
        self.size = 0
        self.count = 0

    def add(self, entry: TOCEntry) -> None:
        self._pending.append((",\n" if self.count else "\n") + entry_json(entry))
        self.count += 1
        if len(self._pending) >= self._FLUSH_EVERY:
            self._flush()

    def close(self) -> str:
        """Ends the JSON; returns its digest."""
        self._pending.append("\n\t]\n}" if self.count else "]\n}")
        self._flush()
        self._file.flush()
        return "sha256:" + self._hash.hexdigest()

    def _flush(self) -> None:
        data = "".join(self._pending).encode("utf-8")
        self._pending.clear()
        self._hash.update(data)
        self._file.write(data)
        self.size += len(data)


def parse_toc(data: bytes, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> TOC:
    """Parse and structurally validate TOC JSON held in memory; semantic checks live
    in `layer`. Large TOCs are read with `iter_toc_entries` instead."""
    return TOC(entries=list(iter_toc_entries(io.BytesIO(data), max_entries=max_entries)))


def iter_toc_entries(stream: BinaryIO, *, max_entries: int = DEFAULT_MAX_ENTRIES
                     ) -> Iterator[TOCEntry]:
    """The validated entries of the TOC JSON read from `stream`, one at a time: memory
    stays bounded by the largest entry, whatever the TOC's size. A TOC whose version
    turns out to be wrong (it may follow the entries) raises after them."""
    cursor = _JSONCursor(stream)
    if not cursor.take("{"):
        cursor.value()  # raises if the text is not JSON at all
        raise TOCError("TOC JSON is not an object")
    version: object = None
    seen: set[str] = set()
    count = 0
    while not cursor.take("}"):
        if seen:
            cursor.expect(",", "TOC JSON: expected ',' between members")
        key = cursor.value()
        if not isinstance(key, str):
            raise TOCError("TOC is not valid JSON: object keys must be strings")
        if key in seen:
            raise TOCError(f"TOC JSON has the member {key!r} twice")
        seen.add(key)
        cursor.expect(":", "TOC JSON: expected ':' after a member name")
        if key != "entries":
            value = cursor.value()
            if key == "version":
                version = value
            continue
        cursor.expect("[", "TOC has no entries list")
        for raw in cursor.array_values():
            if count >= max_entries:
                raise TOCError(f"TOC has more than {max_entries} entries")
            yield _entry_from_json(count, raw)
            count += 1
    cursor.expect_end()
    if "entries" not in seen:
        raise TOCError("TOC has no entries list")
    if version != 1 or isinstance(version, bool):
        raise TOCError(f"unsupported TOC version {version!r}")


_WHITESPACE = re.compile(r"[ \t\n\r]*")


class _JSONCursor:
    """Walks JSON text decoded from a byte stream, decoding one value at a time with
    the standard decoder and reading more only when a value is cut off."""

    _READ = 1 << 20

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._json = json.JSONDecoder()
        self._text = ""
        self._pos = 0
        self._eof = False

    def _fill(self) -> bool:
        """Read more text; False at the end of the stream."""
        if self._eof:
            return False
        data = self._stream.read(self._READ)
        try:
            more = self._decoder.decode(data, final=not data)
        except UnicodeDecodeError:
            raise TOCError("TOC is not valid JSON: it is not UTF-8") from None
        self._eof = not data
        if self._pos > len(self._text) // 2:  # drop what has been consumed
            self._text, self._pos = self._text[self._pos:], 0
        self._text += more
        return True

    def _skip_whitespace(self) -> str:
        """The next character that is not white space, "" at the end."""
        while True:
            pos = _WHITESPACE.match(self._text, self._pos).end()  # type: ignore[union-attr]
            self._pos = pos
            if pos < len(self._text):
                return self._text[pos]
            if not self._fill():
                return ""

    def take(self, char: str) -> bool:
        if self._skip_whitespace() == char:
            self._pos += 1
            return True
        return False

    def expect(self, char: str, problem: str) -> None:
        if not self.take(char):
            raise TOCError(problem if self._skip_whitespace()
                           else "TOC is not valid JSON: it ends early")

    def expect_end(self) -> None:
        if self._skip_whitespace():
            raise TOCError("TOC is not valid JSON: extra data after the object")

    def value(self) -> object:
        if not self._skip_whitespace():
            raise TOCError("TOC is not valid JSON: it ends early")
        while True:
            try:
                value, end = self._json.raw_decode(self._text, self._pos)
            except json.JSONDecodeError as exc:
                if self._grow():
                    continue
                raise TOCError(f"TOC is not valid JSON: {exc.msg}") from None
            except RecursionError:
                raise TOCError("TOC is not valid JSON: nested too deeply") from None
            # A number (or anything) that ends where the text ends may go on.
            if end == len(self._text) and self._grow():
                continue
            if end - self._pos > MAX_ENTRY_TEXT:
                raise TOCError(f"a TOC value is longer than {MAX_ENTRY_TEXT} characters")
            self._pos = end
            return value

    def array_values(self) -> Iterator[object]:
        """The values of the array whose "[" was just taken, one at a time. Values
        that lie whole in the text read so far are decoded here, in one call each
        (a TOC's entries, one after another); the general steps handle the rest."""
        decode = self._json.raw_decode
        skip = _WHITESPACE.match
        first = True
        while True:
            text = self._text
            pos = skip(text, self._pos).end()  # type: ignore[union-attr]
            if not first and pos < len(text) and text[pos] == ",":
                pos = skip(text, pos + 1).end()  # type: ignore[union-attr]
                if pos < len(text) and text[pos] != "]":
                    try:
                        value, end = decode(text, pos)
                    except (json.JSONDecodeError, RecursionError):
                        pass  # cut off by the end of the text read so far, or bad
                    else:
                        if end < len(text) and end - pos <= MAX_ENTRY_TEXT:
                            self._pos = end
                            yield value
                            continue
            if self.take("]"):
                return
            if not first:
                self.expect(",", "TOC JSON: expected ',' between entries")
            first = False
            yield self.value()

    def _grow(self) -> bool:
        if len(self._text) - self._pos > MAX_ENTRY_TEXT:
            raise TOCError(f"a TOC value is longer than {MAX_ENTRY_TEXT} characters")
        return self._fill()
