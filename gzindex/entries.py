"""The file table: one entry per tar member, with the POSIX metadata of the eStargz
TOC (`estargz.toc.TOCEntry`) and where a regular file's bytes start in the
uncompressed tar. Entries are in tar order; a later entry of a path replaces an
earlier one, as extracting the tar would, and whiteouts (`.wh.*`) are entries like
any other, for the snapshotter to apply.

Each entry is a JSON array on a line of its own:
`[name, type, size, offset, mode, uid, gid, modtime, uname, gname, linkName,
devMajor, devMinor, {xattr: base64}]`. Names are cleaned (`a/b`, "" for the
root); a hard link's linkName is the cleaned path of its target.
"""

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from estargz.errors import TOCError
from estargz.tarindex import TarMember
from estargz.toc import ENTRY_TYPES, clean_name, parse_modtime

from .errors import IndexFormatError

_TYPES = ENTRY_TYPES - {"chunk"}
_FIELDS = 14
MAX_LINE = 64 << 20
_MAX_INT = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class FileEntry:
    name: str
    type: str
    size: int = 0
    offset: int = 0  # of the data in the uncompressed tar; regular files only
    mode: int = 0
    uid: int = 0
    gid: int = 0
    modtime: str = ""  # RFC3339, as in the TOC
    user_name: str = ""
    group_name: str = ""
    link_name: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.offset + self.size

    @classmethod
    def from_member(cls, member: TarMember) -> "FileEntry":
        toc = member.toc_entry()
        link = member.link if member.kind == "hardlink" else toc.link_name
        return cls(name=member.path, type=member.kind, size=toc.size,
                   offset=member.offset_data if member.kind == "reg" else 0, mode=toc.mode,
                   uid=toc.uid, gid=toc.gid, modtime=toc.modtime, user_name=toc.user_name,
                   group_name=toc.group_name, link_name=link, dev_major=toc.dev_major,
                   dev_minor=toc.dev_minor, xattrs=toc.xattrs)

    def to_line(self) -> bytes:
        xattrs = {k: base64.b64encode(v).decode() for k, v in sorted(self.xattrs.items())}
        row = [self.name, self.type, self.size, self.offset, self.mode, self.uid, self.gid,
               self.modtime, self.user_name, self.group_name, self.link_name, self.dev_major,
               self.dev_minor, xattrs]
        return json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _fail(number: int, problem: str) -> IndexFormatError:
    return IndexFormatError(f"index file table entry #{number}: {problem}")


def entry_from_line(number: int, line: bytes, uncompressed_size: int) -> FileEntry:
    try:
        row = json.loads(line)
    except ValueError:
        raise _fail(number, "is not JSON") from None
    if not isinstance(row, list) or len(row) != _FIELDS:
        raise _fail(number, f"is not an array of {_FIELDS} fields")
    (name, kind, size, offset, mode, uid, gid, modtime, uname, gname, link, major, minor,
     xattrs) = row
    for value in (name, kind, modtime, uname, gname, link):
        if not isinstance(value, str):
            raise _fail(number, "a text field is not a string")
    for value in (size, offset, mode, uid, gid, major, minor):
        if value.__class__ is not int or not 0 <= value <= _MAX_INT:
            raise _fail(number, "a number field is not a non-negative integer")
    if kind not in _TYPES:
        raise _fail(number, f"unknown type {kind!r}")
    try:
        if clean_name(name) != name:
            raise _fail(number, f"name {name!r} is not a clean path")
        if modtime:
            parse_modtime(modtime)
    except TOCError as exc:
        raise _fail(number, str(exc)) from None
    if kind == "reg" and offset + size > uncompressed_size:
        raise _fail(number, f"{name!r} lies beyond the end of the layer")
    if kind != "reg" and (size or offset):
        raise _fail(number, f"{name!r} is a {kind} with a size or offset")
    if kind in ("symlink", "hardlink") and not link:
        raise _fail(number, f"{name!r} is a {kind} without a link name")
    if not isinstance(xattrs, dict) or not all(isinstance(v, str) for v in xattrs.values()):
        raise _fail(number, "xattrs are not an object of base64 strings")
    try:
        decoded = {k: base64.b64decode(v, validate=True) for k, v in xattrs.items()}
    except ValueError:
        raise _fail(number, "an xattr is not valid base64") from None
    return FileEntry(name=name, type=kind, size=size, offset=offset, mode=mode, uid=uid, gid=gid,
                     modtime=modtime, user_name=uname, group_name=gname, link_name=link,
                     dev_major=major, dev_minor=minor, xattrs=decoded)


def iter_lines(stream: BinaryIO) -> Iterator[bytes]:
    """Lines of a decompressed stream, each bounded by MAX_LINE."""
    rest = b""
    while True:
        piece = stream.read(1 << 20)
        if not piece:
            break
        rest += piece
        lines = rest.split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE:
            raise IndexFormatError("index file table has a line longer than allowed")
        yield from lines
    if rest:
        raise IndexFormatError("index file table does not end with a newline")
