"""Index an uncompressed tar stream so its entries can be re-emitted in any order.

The input is spooled to a temporary file when it is not already a seekable file,
so memory holds only headers, never file contents. Each entry keeps its raw
header blocks (PAX and GNU long-name records included), which the writer copies
verbatim: the converted layer's tar stream says exactly what the input said.
"""

import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from .errors import TarError, TOCError
from .toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, clean_name

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


@dataclass
class TarEntry:
    info: tarfile.TarInfo
    kind: str
    path: str  # cleaned
    header: bytes  # raw header blocks, extension records included


class SpooledTar:
    """A seekable view of the input tar plus its entries in input order."""

    def __init__(self, file: BinaryIO, entries: list[TarEntry], owned: bool):
        self.file = file
        self.entries = entries
        self._owned = owned

    def read_payload(self, entry: TarEntry, offset: int, length: int) -> bytes:
        self.file.seek(entry.info.offset_data + offset)
        data = self.file.read(length)
        if len(data) != length:
            raise TarError(f"tar is truncated inside the data of {entry.info.name!r}")
        return data

    def close(self) -> None:
        if self._owned:
            self.file.close()


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


def index_tar(source: BinaryIO | Iterable[bytes], tmpdir: str | None = None) -> SpooledTar:
    file, owned = spool(source, tmpdir)
    try:
        entries = _read_entries(file)
    except BaseException:
        if owned:
            file.close()
        raise
    return SpooledTar(file, entries, owned)


def _read_entries(file: BinaryIO) -> list[TarEntry]:
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    if size == 0:
        return []
    try:
        archive = tarfile.open(  # noqa: SIM115 (the caller owns the file)
            fileobj=file, mode="r:", encoding="utf-8", errors="surrogateescape"
        )
    except tarfile.TarError as exc:
        raise TarError(f"not a tar stream: {exc}") from None
    except TARFILE_SLIPS as exc:
        raise TarError(f"malformed tar: {tarfile_problem(exc)}") from None
    entries: list[TarEntry] = []
    try:
        while True:
            info = archive.next()
            if info is None:
                break
            entries.append(_entry(file, info, size))
            if archive.pax_headers:
                raise TarError("PAX global headers are not supported in layers")
    except (tarfile.TarError, *TARFILE_SLIPS) as exc:
        raise TarError(f"malformed tar: {tarfile_problem(exc)}") from None
    _check_end(file, archive.offset, size)
    return entries


def tarfile_problem(exc: Exception) -> str:
    """What a tarfile exception says, in words that help."""
    if isinstance(exc, RecursionError):
        return "too many extension headers in a row"
    return str(exc) or type(exc).__name__


def _entry(file: BinaryIO, info: tarfile.TarInfo, size: int) -> TarEntry:
    name = info.name
    kind = TAR_KINDS.get(info.type)
    if info.issparse():
        raise TarError(f"tar entry {name!r} is a sparse file, which a layer cannot hold")
    if kind is None:
        raise TarError(f"tar entry {name!r} has unsupported type {info.type!r}")
    # Everything that goes into the TOC as text must be UTF-8 (the input's other
    # bytes arrive here as surrogate escapes).
    texts = {"name": name, "link name": info.linkname, "user name": info.uname,
             "group name": info.gname}
    texts.update((f"xattr {key!r}", key) for key in xattrs_of(info))
    for what, text in texts.items():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise TarError(f"tar entry {name!r}: {what} is not valid UTF-8") from None
    try:
        path = clean_name(name)
        if kind == "hardlink":
            clean_name(info.linkname)
    except TOCError as exc:
        raise TarError(str(exc)) from None
    if kind == "reg" and info.offset_data + info.size > size:
        raise TarError(f"tar is truncated inside the data of {name!r}")
    pos = file.tell()
    file.seek(info.offset)
    header = file.read(info.offset_data - info.offset)
    file.seek(pos)
    return TarEntry(info=info, kind=kind, path=path, header=header)


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


def is_reserved(entry: TarEntry) -> bool:
    """Landmarks and TOCs of an input that was converted before are re-created."""
    return entry.path in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME)
