"""Full check of a blob: every byte decompressed and compared with the TOC.

A lazy reader trusts the TOC and checks chunks as it reads them; this check also
catches what that cannot see: corrupt tar headers, members that do not start
where the TOC says, CRC errors, and a stream that is not the tar the TOC claims.
"""

import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from .codec import decompress_all
from .digests import sha256_digest
from .errors import FormatError, VerificationError
from .footer import Compression
from .layer import Layer
from .reader import BlobReader, BlobSource
from .tarindex import BLOCK, TAR_KINDS, TARFILE_SLIPS, tarfile_problem, xattrs_of
from .toc import DEFAULT_MAX_TOC_SIZE, TOC_TAR_NAME, TOCEntry, clean_name, format_modtime

# A member region larger than this is refused rather than held in memory.
MAX_REGION_SIZE = 256 << 20


@dataclass(frozen=True)
class VerifyReport:
    compression: Compression
    blob_size: int
    toc_digest: str
    diff_id: str
    uncompressed_size: int
    entries: int
    regular_files: int
    chunks: int
    members: int
    prefetch_size: int


class _DecompressedStream:
    """The blob's decompressed stream, region by region, with its sha256, recording
    at which decompressed position each member region starts."""

    def __init__(self, source: BlobSource, compression: Compression, bounds: list[int]):
        self.source = source
        self.compression = compression
        self.bounds = bounds
        self.starts: dict[int, int] = {}  # compressed offset -> decompressed position
        self.hash = hashlib.sha256()
        self.position = 0
        self._regions = self._iter_regions()
        self._buffer = b""

    def _iter_regions(self) -> Iterator[bytes]:
        for start, end in zip(self.bounds, self.bounds[1:], strict=False):
            if end - start > MAX_REGION_SIZE:
                raise VerificationError(f"member at {start} spans {end - start} bytes")
            try:
                data = decompress_all(
                    self.compression, self.source.read_at(start, end - start), MAX_REGION_SIZE
                )
            except FormatError as exc:
                raise VerificationError(f"member at blob offset {start}: {exc}") from None
            self.starts[start] = self.position + len(self._buffer)
            yield data

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            piece = next(self._regions, None)
            if piece is None:
                break
            self._buffer += piece
        if size < 0:
            size = len(self._buffer)
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        self.hash.update(out)
        self.position += len(out)
        return out

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _compare(member: tarfile.TarInfo, entry: TOCEntry, carried: tuple[str, str]) -> None:
    """`carried`: the last user and group names the TOC gave for the entry's uid and
    gid. The reference omits a name that is unchanged for its id, so an entry without
    one may stand for that name as well as for none."""
    where = f"tar entry {member.name!r}"
    kind = TAR_KINDS.get(member.type, "unsupported")
    checks: list[tuple[str, object, object]] = [
        ("name", clean_name(member.name), clean_name(entry.name)),
        ("type", kind, entry.type),
        ("mode", member.mode, entry.mode),
        ("uid", member.uid, entry.uid),
        ("gid", member.gid, entry.gid),
        ("user name", member.uname, _owner_name(member.uname, entry.user_name, carried[0])),
        ("group name", member.gname, _owner_name(member.gname, entry.group_name, carried[1])),
        ("modtime", format_modtime(member.mtime), entry.modtime),
        ("xattrs", xattrs_of(member), entry.xattrs),
    ]
    if kind == "reg":
        checks.append(("size", member.size, entry.size))
    if kind in ("symlink", "hardlink"):
        checks.append(("link name", member.linkname, entry.link_name))
    if kind in ("char", "block"):
        checks.append(("device", (member.devmajor, member.devminor),
                       (entry.dev_major, entry.dev_minor)))
    for what, in_tar, in_toc in checks:
        if in_tar != in_toc:
            raise VerificationError(
                f"{where}: {what} is {in_tar!r} in the tar, {in_toc!r} in the TOC"
            )


def _owner_name(in_tar: str, in_toc: str, carried: str) -> str:
    """The name the TOC stands for, given the tar's: its own, or else "" or `carried`."""
    if in_toc or in_tar not in ("", carried):
        return in_toc
    return in_tar


class _Checker:
    def __init__(self, reader: BlobReader):
        self.layer: Layer = reader.layer
        footer = self.layer.footer
        self.compression = footer.compression
        self.entries = entries = list(reader.toc_entries())
        chunk_starts = {e.offset for e in entries if e.has_payload}
        bounds = sorted({0, *chunk_starts, footer.payload_end})
        if self.compression is Compression.GZIP:
            # The TOC member is part of the gzip stream (the tar's last entry).
            bounds.append(footer.toc_offset + footer.toc_length)
        self.stream = _DecompressedStream(reader.source, self.compression, bounds)
        self.members = len(bounds) - 1
        self.placements: list[tuple[str, int, int, int]] = []  # name, blob off, inner, pos
        self.files = 0
        self.chunks = 0
        self.user_names: dict[int, str] = {}  # last name the TOC gave each uid
        self.group_names: dict[int, str] = {}

    def run(self) -> None:
        entries = self.entries
        index = 0
        try:
            with tarfile.open(
                fileobj=self.stream, mode="r|", encoding="utf-8", errors="surrogateescape"
            ) as archive:
                for member in archive:
                    if index >= len(entries) + (self.compression is Compression.GZIP):
                        raise VerificationError(f"tar entry {member.name!r} is not in the TOC")
                    if index == len(entries) and self.compression is Compression.GZIP:
                        self._check_toc_member(archive, member)
                        index += 1
                    else:
                        index = self._check_entry(archive, member, index)
        except (tarfile.TarError, *TARFILE_SLIPS) as exc:
            raise VerificationError(
                f"decompressed stream is not a valid tar: {tarfile_problem(exc)}"
            ) from None
        expected = len(entries) + (1 if self.compression is Compression.GZIP else 0)
        if index < expected:
            missing = entries[index].name if index < len(entries) else TOC_TAR_NAME
            raise VerificationError(f"tar stream ends before entry {missing!r}")
        self.stream.drain()
        for name, blob_offset, inner, position in self.placements:
            if self.stream.starts.get(blob_offset, -1) + inner != position:
                raise VerificationError(
                    f"data of {name!r} does not start at the member at blob offset {blob_offset}"
                )

    def _check_entry(self, archive: tarfile.TarFile, member: tarfile.TarInfo, index: int) -> int:
        entries = self.entries
        entry = entries[index]
        if entry.type == "chunk":
            raise VerificationError(f"TOC chunk entry {entry.name!r} has no regular file")
        carried = (self.user_names.get(entry.uid, ""), self.group_names.get(entry.gid, ""))
        _compare(member, entry, carried)
        if entry.user_name:
            self.user_names[entry.uid] = entry.user_name
        if entry.group_name:
            self.group_names[entry.gid] = entry.group_name
        index += 1
        if entry.type != "reg":
            return index
        self.files += 1
        pieces = [entry]
        while index < len(entries) and entries[index].type == "chunk":
            pieces.append(entries[index])
            index += 1
        file_hash = hashlib.sha256()
        data_file = archive.extractfile(member)
        assert data_file is not None
        for piece in pieces if entry.size else []:
            size = piece.chunk_size or entry.size - piece.chunk_offset
            position = member.offset_data + piece.chunk_offset
            self.placements.append((entry.name, piece.offset, piece.inner_offset, position))
            data = data_file.read(size)
            if len(data) != size:
                raise VerificationError(f"data of {entry.name!r} is truncated")
            if sha256_digest(data) != piece.chunk_digest:
                raise VerificationError(
                    f"chunk of {entry.name!r} at {piece.chunk_offset} fails its chunkDigest"
                )
            file_hash.update(data)
            self.chunks += 1
        if entry.digest and "sha256:" + file_hash.hexdigest() != entry.digest:
            raise VerificationError(f"content of {entry.name!r} fails its digest")
        # No digest covers the padding after the data (and zstd frames carry no
        # checksum), so read it here, where tarfile would skip it unseen.
        if entry.size and archive.fileobj.read(-entry.size % BLOCK).strip(b"\0"):
            raise VerificationError(f"the padding after the data of {entry.name!r} is not zero")
        return index

    def _check_toc_member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        if member.name != TOC_TAR_NAME:
            raise VerificationError(f"tar entry {member.name!r} is not in the TOC")
        data_file = archive.extractfile(member)
        data = data_file.read() if data_file else b""
        if sha256_digest(data) != self.layer.toc_digest:
            raise VerificationError("the stream's TOC entry differs from the TOC in the footer")


def verify_blob(
    source: BlobSource, toc_digest: str | None = None, max_toc_size: int = DEFAULT_MAX_TOC_SIZE
) -> VerifyReport:
    """Check the whole blob; raises a `FormatError` subclass naming the first problem."""
    reader = BlobReader.open(source, toc_digest, max_toc_size)
    with reader.layer as layer:
        checker = _Checker(reader)
        checker.run()
        return VerifyReport(
            compression=layer.footer.compression,
            blob_size=source.size,
            toc_digest=layer.toc_digest,
            diff_id="sha256:" + checker.stream.hash.hexdigest(),
            uncompressed_size=checker.stream.position,
            entries=len(checker.entries),
            regular_files=checker.files,
            chunks=checker.chunks,
            members=checker.members,
            prefetch_size=layer.prefetch_size,
        )
