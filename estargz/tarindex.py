"""Index an uncompressed tar stream so its entries can be re-emitted in any order.

The input is spooled to a temporary file when it is not already a seekable file.
The index is on disk too, so memory holds neither file contents nor headers,
whatever the number of members. The writer reads each member's raw header blocks
(PAX and GNU long-name records included) again when it emits the member and
copies them verbatim: the converted layer's tar stream says exactly what the input
said. What the member's TOC entry needs is taken from its header once, when the
tar is indexed.
"""

import collections
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .errors import TarError, TOCError
from .toc import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    TOCEntry,
    check_xattr,
    clean_name,
    format_modtime,
    shown,
)

BLOCK = 512
_XATTR_PAX_PREFIX = "SCHILY.xattr."
# Tar type flags a layer may hold, and the TOC type each becomes.
TAR_KINDS = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
# tarfile lets these escape from some malformed headers (GNU sparse maps, PAX
# records, long chains of extension headers) instead of raising a TarError.
TARFILE_SLIPS = (ValueError, IndexError, OverflowError, RecursionError)
# The index's page cache: lookups by path while ordering are few, the rest is
# appended or read in order.
_PAGE_CACHE_KIB = 4096
# What a stream is read in: tarfile skips file data by reading it, a piece at a time.
_STREAM_READ = 1 << 20


@dataclass(frozen=True, slots=True)
class TarMember:
    """Where one tar member lies in the input and what its TOC entry says."""

    path: str  # cleaned
    kind: str
    link: str  # the cleaned target of a hard link, "" for other kinds
    offset: int  # of its first header block (PAX and GNU records included)
    offset_data: int
    size: int  # of its data (0 unless a regular file)
    fields: str  # the rest of its TOC entry, see `_toc_fields`

    def toc_entry(self) -> TOCEntry:
        """The member's TOC entry, without digests and offsets."""
        (name, modtime, mode, uid, gid, user_name, group_name, link_name, dev_major,
         dev_minor, xattrs) = json.loads(self.fields)
        toc = TOCEntry(name=name, type=self.kind, modtime=modtime, mode=mode, uid=uid,
                       gid=gid, user_name=user_name, group_name=group_name,
                       xattrs={k: v.encode("latin-1") for k, v in xattrs.items()})
        if self.kind == "reg":
            toc.size = self.size
        elif self.kind in ("symlink", "hardlink"):
            toc.link_name = link_name
        elif self.kind in ("char", "block"):
            toc.dev_major, toc.dev_minor = dev_major, dev_minor
        return toc


def _toc_fields(info: tarfile.TarInfo) -> str:
    """What the TOC entry takes from the header, as JSON: ids from PAX records can be
    beyond SQLite's integers (the TOC check refuses them later, as it should)."""
    xattrs = {k: v.decode("latin-1") for k, v in xattrs_of(info).items()}
    return json.dumps([info.name, format_modtime(info.mtime), info.mode, info.uid, info.gid,
                       info.uname, info.gname, info.linkname, info.devmajor, info.devminor,
                       xattrs])


def _seekable(source: object) -> bool:
    try:
        return bool(source.seekable()) and source.tell() == 0  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


def spool(source: BinaryIO | Iterable[bytes], tmpdir: str | None = None) -> tuple[BinaryIO, bool]:
    """Return a seekable file with the tar's bytes and whether we own it."""
    if hasattr(source, "read") and _seekable(source):
        return source, False  # type: ignore[return-value]
    tmp = tempfile.TemporaryFile(dir=tmpdir)  # noqa: SIM115 (returned to the caller)
    if hasattr(source, "read"):
        shutil.copyfileobj(source, tmp, 1 << 20)  # type: ignore[arg-type]
    else:
        for piece in source:  # type: ignore[union-attr]
            tmp.write(piece)
    tmp.seek(0)
    return tmp, True


_SCHEMA = """
CREATE TABLE members (
    seq INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
    link TEXT NOT NULL, offset INTEGER NOT NULL, offset_data INTEGER NOT NULL,
    size INTEGER NOT NULL, fields TEXT NOT NULL, front INTEGER)
"""
_COLUMNS = "path, kind, link, offset, offset_data, size, fields"
_INSERT_BATCH = 4096


class TarIndex:
    """A seekable view of the input tar and an on-disk index of its members: the
    last member of each path (as extracting the tar would leave it) at the place of
    that last member, landmarks and TOCs of an earlier conversion left out.

    The index is a temporary SQLite file, unlinked at once: a tar of a million
    files costs some disk and a page cache of a few MiB, not a Python object per
    member."""

    def __init__(self, file: BinaryIO, owned: bool, tmpdir: str | None = None):
        self.file = file
        self._owned = owned
        self._db = _open_db(tmpdir)
        self._front = 0  # members moved to the front so far

    def _fill(self) -> None:
        batch: list[tuple[object, ...]] = []
        insert = f"INSERT OR REPLACE INTO members (seq, {_COLUMNS}) VALUES (?{', ?' * 7})"
        for seq, member in enumerate(scan_tar(self.file)):
            if is_reserved(member.path):
                continue
            batch.append((seq, member.path, member.kind, member.link, member.offset,
                          member.offset_data, member.size, member.fields))
            if len(batch) >= _INSERT_BATCH:
                self._db.executemany(insert, batch)
                batch.clear()
        self._db.executemany(insert, batch)

    def has(self, path: str) -> bool:
        row = self._db.execute("SELECT 1 FROM members WHERE path = ?", (path,)).fetchone()
        return row is not None

    def unmoved(self, path: str) -> TarMember | None:
        """The member of `path` unless it was moved to the front."""
        row = self._db.execute(f"SELECT {_COLUMNS} FROM members WHERE path = ? AND front IS NULL",
                               (path,)).fetchone()
        return None if row is None else TarMember(*row)

    def move_to_front(self, path: str) -> None:
        """Put a member after those moved before it, ahead of all the others."""
        self._front += 1
        self._db.execute("UPDATE members SET front = ? WHERE path = ?", (self._front, path))

    def members(self, front: bool = False) -> Iterator[TarMember]:
        """The members moved to the front, in the order they were moved, or the others
        in input order; read as they are used."""
        if front and not self._front:
            return
        query = (f"SELECT {_COLUMNS} FROM members WHERE front IS NOT NULL ORDER BY front"
                 if front else
                 f"SELECT {_COLUMNS} FROM members WHERE front IS NULL ORDER BY seq")
        for row in self._db.execute(query):
            yield TarMember(*row)

    def header(self, member: TarMember) -> bytes:
        """The member's raw header blocks, extension records included."""
        self.file.seek(member.offset)
        return self.file.read(member.offset_data - member.offset)

    def read_payload(self, member: TarMember, name: str, offset: int, length: int) -> bytes:
        self.file.seek(member.offset_data + offset)
        data = self.file.read(length)
        if len(data) != length:
            raise TarError(f"tar is truncated inside the data of {shown(name)}")
        return data

    def close(self) -> None:
        self._db.close()
        if self._owned:
            self.file.close()


def _open_db(tmpdir: str | None) -> sqlite3.Connection:
    fd, path = tempfile.mkstemp(prefix="lazypull-tar-", suffix=".db", dir=tmpdir)
    os.close(fd)
    try:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA user_version = 0")  # opens the file, so it outlives its name
    finally:
        os.unlink(path)
    db.execute(f"PRAGMA cache_size = -{_PAGE_CACHE_KIB}")
    # Nothing is kept after a crash, so nothing needs a journal or a sync.
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    db.execute(_SCHEMA)
    db.execute("BEGIN")
    return db


def index_tar(source: BinaryIO | Iterable[bytes], tmpdir: str | None = None) -> TarIndex:
    file, owned = spool(source, tmpdir)
    index = None
    try:
        index = TarIndex(file, owned, tmpdir)
        index._fill()
    except BaseException:
        if index is not None:
            index.close()
        elif owned:
            file.close()
        raise
    return index


def _open_archive(file: BinaryIO) -> tarfile.TarFile:
    file.seek(0)
    try:
        return tarfile.open(fileobj=file, mode="r:", encoding="utf-8", errors="surrogateescape")
    except tarfile.TarError as exc:
        raise TarError(f"not a tar stream: {exc}") from None
    except TARFILE_SLIPS as exc:
        raise TarError(f"malformed tar: {tarfile_problem(exc)}") from None


def scan_tar(file: BinaryIO) -> Iterator[TarMember]:
    """The members of the tar in `file` in input order, each checked as a layer needs
    it; raises `TarError` at the first that is not fit for a layer."""
    size = file.seek(0, os.SEEK_END)
    if size == 0:
        return
    archive = _open_archive(file)
    try:
        while True:
            info = archive.next()
            if info is None:
                break
            archive.members.clear()  # tarfile would keep every member it has read
            yield _member(info, size)
            if archive.pax_headers:
                raise TarError("PAX global headers are not supported in layers")
    except (tarfile.TarError, *TARFILE_SLIPS) as exc:
        raise TarError(f"malformed tar: {tarfile_problem(exc)}") from None
    _check_end(file, archive.offset, size)


class _TailKeeper:
    """A read-only stream that keeps the last pieces read from it, so the block where
    tarfile stopped can still be looked at after tarfile has read past it."""

    def __init__(self, stream: BinaryIO, keep: int):
        self._stream = stream
        self._keep = keep
        self._pieces: collections.deque[tuple[int, bytes]] = collections.deque()
        self._kept = 0
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if data:
            self._pieces.append((self._position, data))
            self._position += len(data)
            self._kept += len(data)
            while self._kept - len(self._pieces[0][1]) >= self._keep:
                self._kept -= len(self._pieces.popleft()[1])
        return data

    @property
    def empty(self) -> bool:
        return self._position == 0

    def block_at(self, offset: int) -> bytes | None:
        """The bytes from `offset` (up to a block) if still kept, else None."""
        if not self._pieces or offset < self._pieces[0][0]:
            return None
        out = b""
        for start, data in self._pieces:
            if start + len(data) > offset:
                out += data[max(0, offset - start):]
                if len(out) >= BLOCK:
                    break
        return out[:BLOCK]


def scan_tar_stream(stream: BinaryIO) -> Iterator[TarMember]:
    """`scan_tar` over a stream read once from its start (an inflating pipe, say):
    the same members and checks, without seeking."""
    kept = _TailKeeper(stream, _STREAM_READ + 2 * BLOCK)
    try:
        archive = tarfile.open(  # noqa: SIM115 (read member by member below)
            fileobj=kept, mode="r|", encoding="utf-8", errors="surrogateescape",
            bufsize=_STREAM_READ)
    except tarfile.ReadError as exc:
        if kept.empty:
            return  # an empty stream is an empty layer, as `scan_tar` has it
        raise TarError(f"not a tar stream: {exc}") from None
    except (tarfile.TarError, *TARFILE_SLIPS) as exc:
        raise TarError(f"malformed tar: {tarfile_problem(exc)}") from None
    unbounded = 1 << 63  # truncation shows as a missing end block below
    try:
        while True:
            info = archive.next()
            if info is None:
                break
            archive.members.clear()
            yield _member(info, unbounded)
            if archive.pax_headers:
                raise TarError("PAX global headers are not supported in layers")
    except (tarfile.TarError, *TARFILE_SLIPS) as exc:
        raise TarError(f"malformed tar: {tarfile_problem(exc)}") from None
    block = kept.block_at(archive.offset)
    if block is None or 0 < len(block) < BLOCK:
        raise TarError(f"tar is truncated at byte {archive.offset}")
    if block and block != b"\0" * BLOCK:
        raise TarError(f"malformed tar header at byte {archive.offset}")


def tarfile_problem(exc: Exception) -> str:
    """What a tarfile exception says, in words that help."""
    if isinstance(exc, RecursionError):
        return "too many extension headers in a row"
    return str(exc) or type(exc).__name__


def _member(info: tarfile.TarInfo, size: int) -> TarMember:
    name = info.name
    kind = TAR_KINDS.get(info.type)
    if info.issparse():
        raise TarError(f"tar entry {shown(name)} is a sparse file, which a layer cannot hold")
    if kind is None:
        raise TarError(f"tar entry {shown(name)} has unsupported type {info.type!r}")
    # Everything that goes into the TOC as text must be UTF-8 (the input's other
    # bytes arrive here as surrogate escapes).
    texts = {"name": name, "link name": info.linkname, "user name": info.uname,
             "group name": info.gname}
    texts.update((f"xattr {key!r}", key) for key in xattrs_of(info))
    for what, text in texts.items():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise TarError(f"tar entry {shown(name)}: {what} is not valid UTF-8") from None
    try:
        path = clean_name(name)
        link = clean_name(info.linkname) if kind == "hardlink" else ""
        if "\0" in info.linkname:
            raise TOCError(f"tar entry {shown(name)}: link name contains a NUL character")
        listed = 0
        for key, value in xattrs_of(info).items():
            listed = check_xattr(f"tar entry {shown(name)}", key, value, listed)
    except TOCError as exc:
        raise TarError(str(exc)) from None
    if kind == "reg" and info.offset_data + info.size > size:
        raise TarError(f"tar is truncated inside the data of {shown(name)}")
    return TarMember(path=path, kind=kind, link=link, offset=info.offset,
                     offset_data=info.offset_data, size=info.size if kind == "reg" else 0,
                     fields=_toc_fields(info))


def _check_end(file: BinaryIO, offset: int, size: int) -> None:
    """tarfile stops quietly at a damaged header; tell that apart from a real end."""
    file.seek(offset)
    block = file.read(BLOCK)
    if not block or block == b"\0" * BLOCK:
        return
    if len(block) < BLOCK:
        raise TarError(f"tar is truncated at byte {offset} of {size}")
    raise TarError(f"malformed tar header at byte {offset}")


def xattrs_of(info: tarfile.TarInfo) -> dict[str, bytes]:
    """Extended attributes carried as PAX `SCHILY.xattr.*` records, as raw bytes."""
    return {
        key[len(_XATTR_PAX_PREFIX) :]: value.encode("utf-8", "surrogateescape")
        for key, value in info.pax_headers.items()
        if key.startswith(_XATTR_PAX_PREFIX)
    }


def is_reserved(path: str) -> bool:
    """Landmarks and TOCs of an input that was converted before are re-created."""
    return path in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME)
