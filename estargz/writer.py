"""Build an eStargz or zstd:chunked blob from an uncompressed tar stream.

Layout (as the reference writes it): a new member starts at the beginning of
the blob and at every payload chunk; tar headers that follow a chunk continue in
its member. Member boundaries depend only on the input and the options, so the
members are compressed in parallel and the output is the same for any number of
workers.
"""

import hashlib
import itertools
import os
import tarfile
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

from .codec import (
    DEFAULT_LEVELS,
    compress_file,
    compress_member,
    gzip_stream,
    gzip_streams_exactly,
    prime_allocator,
)
from .digests import sha256_digest
from .errors import TarError, TOCError
from .footer import Compression, Footer, gzip_footer, skippable_frame_header, zstd_footer
from .layer import Layer
from .tarindex import BLOCK, TarIndex, TarMember, index_tar
from .toc import (
    LANDMARK_CONTENTS,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    TOCEntry,
    TOCWriter,
    clean_name,
    iter_toc_entries,
)

DEFAULT_CHUNK_SIZE = 4 << 20
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
ZSTD_MANIFEST_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"
_TOC_PIECE = 1 << 20


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
    index = index_tar(tar_stream, options.tmpdir)
    try:
        ordering = order_entries(index, options.prioritized_files)
        return _Builder(index, out, options).run(ordering)
    finally:
        index.close()


def _priority_path(name: str) -> str:
    return clean_name(name.strip().lstrip("/"))


@dataclass(frozen=True)
class Ordering:
    landmark: str
    missing: list[str]  # prioritized names that the tar does not hold
    index: TarIndex

    def front(self) -> Iterator[TarMember]:
        """Prioritized files with what they need, to go before the landmark."""
        return self.index.members(front=True)

    def rest(self) -> Iterator[TarMember]:
        """Everything else in input order."""
        return self.index.members()


def order_entries(index: TarIndex, prioritized: Sequence[str]) -> Ordering:
    """Prioritized files first (each after its parents and hard-link target), then
    the landmark's name, then everything else in input order. A later entry of
    the same path replaces an earlier one, as extracting the tar would (the index
    holds only that one, at its place). The order is kept in the index."""

    def move(path: str) -> bool:
        if path and not index.has(path):
            return False
        # Depth first, without recursion (paths can be deep, hard links can form
        # a cycle): a path's parent, then its hard-link target, then the path.
        stack = [(path, False)]
        active = {path}
        while stack:
            current, ready = stack.pop()
            entry = index.unmoved(current)
            if ready:
                if entry is not None:
                    index.move_to_front(current)
                continue
            stack.append((current, True))
            needs = [current.rpartition("/")[0]] if current else []  # absent: implicit
            if entry is not None and entry.kind == "hardlink":
                needs.append(entry.link)
            for need in reversed(needs):
                if need not in active and (need == "" or index.unmoved(need) is not None):
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
    return Ordering(landmark, missing, index)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def _landmark(name: str) -> tuple[TOCEntry, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(LANDMARK_CONTENTS)
    info.mode = 0o644
    info.mtime = 0
    toc = TOCEntry(name=name, type="reg", size=info.size, mode=info.mode)
    return toc, info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


_MemberChunk = tuple[TOCEntry, int, TOCEntry | None]
_EMPTY_DIGEST = sha256_digest(b"")
# A member holding more than this after the chunk it starts with (a long run of
# directories, links or empty files) goes to disk, so neither it nor the TOC
# entries that wait for its chunk grow in memory.
_MEMBER_SPILL = 1 << 20


# Small members are handed to the compressing threads in batches: a hand-off per
# member of a few hundred bytes costs more in thread switches than compressing it.
_BATCH_BYTES = 1 << 20
_BATCH_MEMBERS = 256


def _compress_and_hash(
    compression: Compression, members: list[tuple[bytes, int]], level: int
) -> list[tuple[bytes, str]]:
    """Compress members and hash the chunk each starts with (both release the GIL)."""
    return [
        (
            compress_member(compression, payload, level),
            sha256_digest(payload[:chunk_length]) if chunk_length else "",
        )
        for payload, chunk_length in members
    ]


class _Builder:
    def __init__(self, index: TarIndex, out: BinaryIO, options: BuildOptions):
        self.index = index
        self.out = out
        self.options = options
        self.compression = options.compression
        self.level = options.effective_level
        self.workers = options.workers or os.cpu_count() or 1
        self.diff_hash = hashlib.sha256()
        self.blob_hash = hashlib.sha256()
        self.uncompressed = 0
        self.written = 0
        self.member = bytearray()
        # The member when it has been spilled to disk; it is then the last one.
        self.spilled: BinaryIO | None = None
        # The chunk this member starts with: its entry, its length, and the file
        # entry that takes its digest too when the file has one chunk.
        self.member_chunk: _MemberChunk | None = None
        # Members waiting to be handed over together, and their chunks.
        self.batch: list[tuple[bytes, int]] = []
        self.batch_chunks: list[_MemberChunk | None] = []
        self.batch_bytes = 0
        self.in_flight: deque[
            tuple[Future[list[tuple[bytes, str]]], list[_MemberChunk | None]]
        ] = deque()
        self.prefetch_marker: TOCEntry | None = None  # the landmark's TOC entry
        # TOC entries go out in order once complete: an entry with a chunk waits
        # until that chunk (numbered from 1 in blob order) has its digest and offset.
        self.toc_waiting: deque[tuple[TOCEntry, int]] = deque()
        self.chunks_started = 0
        self.chunks_settled = 0

    def run(self, ordering: Ordering) -> BuildResult:
        landmark = ordering.landmark
        prime_allocator()
        with tempfile.TemporaryFile(dir=self.options.tmpdir) as toc_file:
            self.toc_file = toc_file
            self.toc = TOCWriter(toc_file)
            try:
                with ThreadPoolExecutor(max_workers=self.workers) as pool:
                    self.pool = pool
                    if landmark == NO_PREFETCH_LANDMARK:
                        self._emit_landmark(landmark)
                    for member in ordering.front():
                        self._emit_member(member)
                    if landmark == PREFETCH_LANDMARK:
                        self._emit_landmark(landmark, marks_prefetch=True)
                    for member in ordering.rest():
                        self._emit_member(member)
                    self._flush_member()
                    self._drain(0)
                    self._write_toc_entries()
            finally:
                if self.spilled is not None:
                    self.spilled.close()
            return self._finish(ordering.missing)

    # -- entries -----------------------------------------------------------

    def _emit_member(self, member: TarMember) -> None:
        self._emit(member.toc_entry(), self.index.header(member), member)

    def _emit_landmark(self, name: str, marks_prefetch: bool = False) -> None:
        toc, header = _landmark(name)
        self._emit(toc, header, None, marks_prefetch)

    def _emit(self, toc: TOCEntry, header: bytes, member: TarMember | None,
              marks_prefetch: bool = False) -> None:
        """Add an entry; its payload is read from `member`, or is the landmark's."""
        # Between entries, every entry before has all of its fields but the chunk
        # digests and offsets of members still in flight.
        self._write_toc_entries()
        self._add(header)
        if toc.type != "reg" or toc.size == 0:
            if toc.type == "reg":
                toc.digest = _EMPTY_DIGEST
            self.toc_waiting.append((toc, 0))
            return
        size = toc.size
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
            if member is None:
                data = LANDMARK_CONTENTS
            else:
                data = self.index.read_payload(member, toc.name, written, length)
            if file_hash is not None:
                file_hash.update(data)
            if marks_prefetch:
                self.prefetch_marker = chunk_entry
            self.member_chunk = (chunk_entry, length, toc if file_hash is None else None)
            self.chunks_started += 1
            self.toc_waiting.append((chunk_entry, self.chunks_started))
            self._add(data)
            written += length
            chunk_entry = TOCEntry(name=toc.name, type="chunk")
        if file_hash is not None:
            toc.digest = "sha256:" + file_hash.hexdigest()
        self._add(_padding(size))

    def _add(self, data: bytes) -> None:
        self.diff_hash.update(data)
        self.uncompressed += len(data)
        if self.spilled is not None:
            self.spilled.write(data)
            return
        self.member += data
        chunk_length = self.member_chunk[1] if self.member_chunk else 0
        if len(self.member) - chunk_length > _MEMBER_SPILL:
            self._spill()

    def _write_toc_entries(self) -> None:
        waiting = self.toc_waiting
        while waiting and waiting[0][1] <= self.chunks_settled:
            self.toc.add(waiting.popleft()[0])

    # -- members -----------------------------------------------------------

    def _flush_member(self) -> None:
        if self.spilled is not None:
            self._write_spilled()
            return
        if not self.member:
            return
        payload = bytes(self.member)
        self.member = bytearray()
        chunk_length = self.member_chunk[1] if self.member_chunk else 0
        self.batch.append((payload, chunk_length))
        self.batch_chunks.append(self.member_chunk)
        self.batch_bytes += len(payload)
        self.member_chunk = None
        if self.batch_bytes >= _BATCH_BYTES or len(self.batch) >= _BATCH_MEMBERS:
            self._submit_batch()
            self._drain(2 * self.workers + 2)

    def _submit_batch(self) -> None:
        if not self.batch:
            return
        future = self.pool.submit(_compress_and_hash, self.compression, self.batch, self.level)
        self.in_flight.append((future, self.batch_chunks))
        self.batch, self.batch_chunks, self.batch_bytes = [], [], 0

    def _drain(self, keep: int) -> None:
        """Write out finished members until at most `keep` batches are in flight; with
        `keep` 0 the members waiting for a batch go too."""
        if keep == 0:
            self._submit_batch()
        while len(self.in_flight) > keep:
            future, chunks = self.in_flight.popleft()
            for (compressed, chunk_digest), chunk in zip(future.result(), chunks, strict=True):
                if chunk is not None:
                    self._settle(chunk, chunk_digest)
                self._write(compressed)

    def _settle(self, chunk: _MemberChunk, digest: str) -> None:
        """The chunk's member starts at the current end of the blob."""
        entry, _, whole_file = chunk
        entry.offset = self.written
        entry.chunk_digest = digest
        if whole_file is not None:
            whole_file.digest = digest
        self.chunks_settled += 1

    def _spill(self) -> None:
        """Move the current member to disk. Every member before it is written first,
        so its chunk's offset is known now, and its digest is taken now."""
        self._drain(0)
        if self.member_chunk is not None:
            self._settle(self.member_chunk, sha256_digest(self.member[: self.member_chunk[1]]))
            self.member_chunk = None
        spilled = tempfile.TemporaryFile(dir=self.options.tmpdir)  # noqa: SIM115 (closed after use)
        spilled.write(self.member)
        self.member = bytearray()
        self.spilled = spilled

    def _write_spilled(self) -> None:
        assert self.spilled is not None and not self.in_flight
        with self.spilled:
            for piece in compress_file(self.compression, self.spilled, self.level):
                self._write(piece)
        self.spilled = None

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.blob_hash.update(data)
        self.written += len(data)

    # -- TOC and footer ----------------------------------------------------

    def _check_toc(self, payload_end: int) -> None:
        """Refuse to finish a blob that readers would refuse. A tar can say what a
        layer cannot (a hard link to a later or missing entry, a file as a parent,
        an id out of range), and that is the tar's fault, so say so now."""
        footer = Footer(compression=self.compression, toc_offset=payload_end, toc_length=0,
                        payload_end=payload_end, footer_size=0)
        self.toc_file.seek(0)
        try:
            Layer.build(iter_toc_entries(self.toc_file), footer, "").close()
        except TOCError as exc:
            raise TarError(f"the tar cannot be a layer: {exc}") from None

    def _toc_member_pieces(self, toc_size: int) -> Iterator[bytes]:
        """The uncompressed tar member of the TOC (gzip), added to the tar stream."""
        info = tarfile.TarInfo(TOC_TAR_NAME)
        info.size = toc_size
        info.mode = 0o644
        info.mtime = 0
        self.toc_file.seek(0)
        pieces = itertools.chain(
            [info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")],
            iter(lambda: self.toc_file.read(_TOC_PIECE), b""),
            [_padding(toc_size) + b"\0" * (2 * BLOCK)],
        )
        for piece in pieces:
            self.diff_hash.update(piece)
            self.uncompressed += len(piece)
            yield piece

    def _write_zstd_toc(self) -> tuple[int, str]:
        """The TOC's frame in a skippable frame; returns the frame's size and digest.
        The skippable frame's header says the size, so the frame is compressed into
        a temporary file first and copied after it."""
        with tempfile.TemporaryFile(dir=self.options.tmpdir) as frame:
            digest = hashlib.sha256()
            for piece in compress_file(Compression.ZSTD, self.toc_file, self.level):
                frame.write(piece)
                digest.update(piece)
            size = frame.tell()
            self._write(skippable_frame_header(size))
            frame.seek(0)
            while piece := frame.read(_TOC_PIECE):
                self._write(piece)
        return size, "sha256:" + digest.hexdigest()

    def _finish(self, missing: list[str]) -> BuildResult:
        marker = self.prefetch_marker
        prefetch_size = marker.offset if marker is not None else 0
        assert not self.toc_waiting
        toc_digest = self.toc.close()
        toc_size = self.toc.size
        toc_offset = self.written
        self._check_toc(toc_offset)
        annotations = {TOC_DIGEST_ANNOTATION: toc_digest}
        if self.compression is Compression.GZIP:
            pieces = self._toc_member_pieces(toc_size)
            if gzip_streams_exactly(self.level):
                for piece in gzip_stream(pieces, self.level):
                    self._write(piece)
            else:
                with tempfile.TemporaryFile(dir=self.options.tmpdir) as member:
                    member.writelines(pieces)
                    for piece in compress_file(self.compression, member, self.level):
                        self._write(piece)
            self._write(gzip_footer(toc_offset))
        else:
            frame_size, frame_digest = self._write_zstd_toc()
            position = toc_offset + 8
            self._write(zstd_footer(position, frame_size, toc_size))
            annotations[ZSTD_MANIFEST_CHECKSUM_ANNOTATION] = frame_digest
            annotations[ZSTD_MANIFEST_POSITION_ANNOTATION] = (
                f"{position}:{frame_size}:{toc_size}:1"
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
            entry_count=self.toc.count,
            annotations=annotations,
            missing_prioritized=missing,
        )
