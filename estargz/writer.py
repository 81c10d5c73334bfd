"""Build an eStargz or zstd:chunked blob from an uncompressed tar stream.

Layout (as the reference writes it): a new member starts at the beginning of
the blob and at every payload chunk; tar headers that follow a chunk continue in
its member. Member boundaries depend only on the input and the options, so the
members are compressed in parallel and the output is the same for any number of
workers.
"""

import hashlib
import io
import os
import tarfile
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

from .codec import DEFAULT_LEVELS, compress_member
from .digests import sha256_digest
from .errors import TarError, TOCError
from .footer import Compression, Footer, gzip_footer, skippable_frame, zstd_footer
from .layer import Layer
from .tarindex import BLOCK, SpooledTar, TarEntry, index_tar, is_reserved, xattrs_of
from .toc import (
    LANDMARK_CONTENTS,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC,
    TOC_TAR_NAME,
    TOCEntry,
    clean_name,
    format_modtime,
    iter_toc_entries,
)

DEFAULT_CHUNK_SIZE = 4 << 20
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
ZSTD_MANIFEST_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"


@dataclass(frozen=True)
class BuildOptions:
    compression: Compression = Compression.GZIP
    chunk_size: int = DEFAULT_CHUNK_SIZE
    level: int | None = None  # None: 6 for gzip, 3 for zstd
    prioritized_files: Sequence[str] = ()
    workers: int | None = None  # None: one per core
    tmpdir: str | None = None  # where a non-seekable input is spooled

    def __post_init__(self) -> None:
        if self.chunk_size < BLOCK:
            raise ValueError(f"chunk size must be at least {BLOCK} bytes")

    @property
    def effective_level(self) -> int:
        return DEFAULT_LEVELS[self.compression] if self.level is None else self.level


@dataclass(frozen=True)
class BuildResult:
    compression: Compression
    blob_digest: str
    blob_size: int
    toc_digest: str
    toc_offset: int
    diff_id: str
    uncompressed_size: int
    prefetch_size: int
    entry_count: int
    annotations: dict[str, str]
    missing_prioritized: list[str] = field(default_factory=list)


def build(
    tar_stream: BinaryIO | Iterable[bytes], out: BinaryIO, options: BuildOptions | None = None
) -> BuildResult:
    """Convert the tar read from `tar_stream` and write the blob to `out`."""
    options = options or BuildOptions()
    spooled = index_tar(tar_stream, options.tmpdir)
    try:
        ordering = order_entries(spooled.entries, options.prioritized_files)
        return _Builder(spooled, out, options).run(ordering)
    finally:
        spooled.close()


def _priority_path(name: str) -> str:
    return clean_name(name.strip().lstrip("/"))


@dataclass(frozen=True)
class Ordering:
    front: list[TarEntry]  # prioritized files with what they need, before the landmark
    landmark: str
    rest: list[TarEntry]
    missing: list[str]  # prioritized names that the tar does not hold


def order_entries(entries: list[TarEntry], prioritized: Sequence[str]) -> Ordering:
    """Prioritized files first (each after its parents and hard-link target), then
    the landmark's name, then everything else in input order. A later entry of
    the same path replaces an earlier one, as extracting the tar would."""
    rest: dict[str, TarEntry] = {}
    for entry in entries:
        if is_reserved(entry):
            continue
        rest.pop(entry.path, None)
        rest[entry.path] = entry
    front: dict[str, TarEntry] = {}

    def move(path: str) -> bool:
        if path and path not in rest and path not in front:
            return False
        # Depth first, without recursion (paths can be deep, hard links can form
        # a cycle): a path's parent, then its hard-link target, then the path.
        stack = [(path, False)]
        active = {path}
        while stack:
            current, ready = stack.pop()
            if ready:
                if current in rest:
                    front[current] = rest.pop(current)
                continue
            stack.append((current, True))
            needs = [current.rpartition("/")[0]] if current else []  # absent: implicit
            entry = rest.get(current)
            if entry is not None and entry.kind == "hardlink":
                needs.append(clean_name(entry.info.linkname))
            for need in reversed(needs):
                if need not in active and (need == "" or need in rest):
                    active.add(need)
                    stack.append((need, False))
        return True

    missing = []
    for name in prioritized:
        try:
            path = _priority_path(name)
        except TOCError:
            path = ""
        if not path or not move(path):
            missing.append(name)
    landmark = PREFETCH_LANDMARK if prioritized else NO_PREFETCH_LANDMARK
    return Ordering(list(front.values()), landmark, list(rest.values()), missing)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def _toc_entry(entry: TarEntry) -> TOCEntry:
    info = entry.info
    toc = TOCEntry(
        name=info.name,
        type=entry.kind,
        modtime=format_modtime(info.mtime),
        mode=info.mode,
        uid=info.uid,
        gid=info.gid,
        user_name=info.uname,
        group_name=info.gname,
        xattrs=xattrs_of(info),
    )
    if entry.kind == "reg":
        toc.size = info.size
    elif entry.kind in ("symlink", "hardlink"):
        toc.link_name = info.linkname
    elif entry.kind in ("char", "block"):
        toc.dev_major, toc.dev_minor = info.devmajor, info.devminor
    return toc


def _landmark_entry(name: str) -> TarEntry:
    info = tarfile.TarInfo(name)
    info.size = len(LANDMARK_CONTENTS)
    info.mode = 0o644
    info.mtime = 0
    info.offset_data = 0
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    return TarEntry(info=info, kind="reg", path=name, header=header)


_MemberChunk = tuple[TOCEntry, int, TOCEntry | None]


def _compress_and_hash(
    compression: Compression, payload: bytes, level: int, chunk_length: int
) -> tuple[bytes, str]:
    """Compress a member and hash the chunk it starts with (both release the GIL)."""
    digest = sha256_digest(payload[:chunk_length]) if chunk_length else ""
    return compress_member(compression, payload, level), digest


class _Builder:
    def __init__(self, spooled: SpooledTar, out: BinaryIO, options: BuildOptions):
        self.spooled = spooled
        self.out = out
        self.options = options
        self.compression = options.compression
        self.level = options.effective_level
        self.workers = options.workers or os.cpu_count() or 1
        self.toc_entries: list[TOCEntry] = []
        self.diff_hash = hashlib.sha256()
        self.blob_hash = hashlib.sha256()
        self.uncompressed = 0
        self.written = 0
        self.member = bytearray()
        # The chunk this member starts with: its entry, its length, and the file
        # entry that takes its digest too when the file has one chunk.
        self.member_chunk: _MemberChunk | None = None
        self.in_flight: deque[tuple[Future[tuple[bytes, str]], _MemberChunk | None]] = deque()
        self.prefetch_marker: TOCEntry | None = None  # the landmark's TOC entry

    def run(self, ordering: Ordering) -> BuildResult:
        landmark = ordering.landmark
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            self.pool = pool
            if landmark == NO_PREFETCH_LANDMARK:
                self._emit(_landmark_entry(landmark), landmark_payload=True)
            for entry in ordering.front:
                self._emit(entry)
            if landmark == PREFETCH_LANDMARK:
                self._emit(_landmark_entry(landmark), landmark_payload=True, marks_prefetch=True)
            for entry in ordering.rest:
                self._emit(entry)
            self._flush_member()
            self._drain(0)
        return self._finish(ordering.missing)

    # -- entries -----------------------------------------------------------

    def _emit(
        self, entry: TarEntry, landmark_payload: bool = False, marks_prefetch: bool = False
    ) -> None:
        toc = _toc_entry(entry)
        self._add(entry.header)
        if entry.kind != "reg" or entry.info.size == 0:
            if entry.kind == "reg":
                toc.digest = sha256_digest(b"")
            self.toc_entries.append(toc)
            return
        size = entry.info.size
        # A file of one chunk has the chunk's digest, computed by the compressing
        # thread; only files of several chunks need a hash of their own here.
        file_hash = hashlib.sha256() if size > self.options.chunk_size else None
        written = 0
        chunk_entry = toc
        while written < size:
            self._flush_member()
            length = min(self.options.chunk_size, size - written)
            if length == self.options.chunk_size:
                chunk_entry.chunk_size = length
            chunk_entry.chunk_offset = written
            if landmark_payload:
                data = LANDMARK_CONTENTS
            else:
                data = self.spooled.read_payload(entry, written, length)
            if file_hash is not None:
                file_hash.update(data)
            if marks_prefetch:
                self.prefetch_marker = chunk_entry
            self.member_chunk = (chunk_entry, length, toc if file_hash is None else None)
            self.toc_entries.append(chunk_entry)
            self._add(data)
            written += length
            chunk_entry = TOCEntry(name=toc.name, type="chunk")
        if file_hash is not None:
            toc.digest = "sha256:" + file_hash.hexdigest()
        self._add(_padding(size))

    def _add(self, data: bytes) -> None:
        self.member += data
        self.diff_hash.update(data)
        self.uncompressed += len(data)

    # -- members -----------------------------------------------------------

    def _flush_member(self) -> None:
        if not self.member:
            return
        payload = bytes(self.member)
        self.member = bytearray()
        chunk_length = self.member_chunk[1] if self.member_chunk else 0
        future = self.pool.submit(
            _compress_and_hash, self.compression, payload, self.level, chunk_length
        )
        self.in_flight.append((future, self.member_chunk))
        self.member_chunk = None
        self._drain(2 * self.workers + 2)

    def _drain(self, keep: int) -> None:
        while len(self.in_flight) > keep:
            future, chunk = self.in_flight.popleft()
            compressed, chunk_digest = future.result()
            if chunk is not None:
                entry, _, whole_file = chunk
                entry.offset = self.written
                entry.chunk_digest = chunk_digest
                if whole_file is not None:
                    whole_file.digest = chunk_digest
            self._write(compressed)

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.blob_hash.update(data)
        self.written += len(data)

    # -- TOC and footer ----------------------------------------------------

    def _check_toc(self, toc_json: bytes, payload_end: int) -> None:
        """Refuse to finish a blob that readers would refuse. A tar can say what a
        layer cannot (a hard link to a later or missing entry, a file as a parent,
        an id out of range), and that is the tar's fault, so say so now."""
        footer = Footer(compression=self.compression, toc_offset=payload_end, toc_length=0,
                        payload_end=payload_end, footer_size=0)
        try:
            Layer.build(iter_toc_entries(io.BytesIO(toc_json)), footer, "").close()
        except TOCError as exc:
            raise TarError(f"the tar cannot be a layer: {exc}") from None

    def _finish(self, missing: list[str]) -> BuildResult:
        marker = self.prefetch_marker
        prefetch_size = marker.offset if marker is not None else 0
        toc_json = TOC(entries=self.toc_entries).to_json_bytes()
        toc_digest = sha256_digest(toc_json)
        toc_offset = self.written
        self._check_toc(toc_json, toc_offset)
        annotations = {TOC_DIGEST_ANNOTATION: toc_digest}
        if self.compression is Compression.GZIP:
            info = tarfile.TarInfo(TOC_TAR_NAME)
            info.size = len(toc_json)
            info.mode = 0o644
            info.mtime = 0
            member = (
                info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
                + toc_json
                + _padding(len(toc_json))
                + b"\0" * (2 * BLOCK)
            )
            self.diff_hash.update(member)
            self.uncompressed += len(member)
            self._write(compress_member(self.compression, member, self.level))
            self._write(gzip_footer(toc_offset))
        else:
            compressed = compress_member(self.compression, toc_json, self.level)
            self._write(skippable_frame(compressed))
            position = toc_offset + 8
            self._write(zstd_footer(position, len(compressed), len(toc_json)))
            annotations[ZSTD_MANIFEST_CHECKSUM_ANNOTATION] = sha256_digest(compressed)
            annotations[ZSTD_MANIFEST_POSITION_ANNOTATION] = (
                f"{position}:{len(compressed)}:{len(toc_json)}:1"
            )
        annotations[UNCOMPRESSED_SIZE_ANNOTATION] = str(self.uncompressed)
        return BuildResult(
            compression=self.compression,
            blob_digest="sha256:" + self.blob_hash.hexdigest(),
            blob_size=self.written,
            toc_digest=toc_digest,
            toc_offset=toc_offset,
            diff_id="sha256:" + self.diff_hash.hexdigest(),
            uncompressed_size=self.uncompressed,
            prefetch_size=prefetch_size,
            entry_count=len(self.toc_entries),
            annotations=annotations,
            missing_prioritized=missing,
        )
