"""Property-based tests: random trees convert and read back exactly, and random
damage to blobs, TOCs and tars gives a typed error or the exact original bytes.

Examples are kept small and few enough that the module runs in seconds; the
damage properties run under a wall-clock alarm, so a hang fails instead of
stalling the suite.
"""

import base64
import gzip
import hashlib
import io
import json
import math
import random
import signal
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta

import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from estargz import (
    BlobReader,
    BuildOptions,
    BuildResult,
    Compression,
    FileSource,
    Footer,
    FormatError,
    Layer,
    TarError,
    TOCError,
    build,
    load_toc,
    parse_toc,
)
from estargz.codec import gzip_member, zstd_frame
from estargz.tarindex import xattrs_of
from estargz.toc import ENTRY_TYPES, format_modtime
from estargz.verify import verify_blob

from .test_bad_input import toc_json_of, with_toc

FORMATS = [Compression.GZIP, Compression.ZSTD]
SKIPPABLE = range(0x184D2A50, 0x184D2A60)
BUILD_SETTINGS = settings(
    max_examples=40,
    deadline=None,  # each example converts four times with thread pools; timing varies
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DAMAGE_SETTINGS = settings(
    max_examples=300,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow],
)


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail with `Hang` instead of stalling when the body takes too long."""

    def expire(signum: int, frame: object) -> None:
        raise Hang(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def source(blob: bytes) -> FileSource:
    return FileSource(io.BytesIO(blob))


def convert(tar: bytes, compression: Compression, **options: object) -> tuple[bytes, BuildResult]:
    out = io.BytesIO()
    result = build(io.BytesIO(tar), out, BuildOptions(compression=compression, **options))
    return out.getvalue(), result


def decompressed(compression: Compression, blob: bytes) -> bytes:
    """The blob's uncompressed stream, decoded without the library under test."""
    if compression is Compression.GZIP:
        return gzip.decompress(blob)
    out = bytearray()
    rest = blob
    while rest:
        if int.from_bytes(rest[:4], "little") in SKIPPABLE:
            rest = rest[8 + int.from_bytes(rest[4:8], "little"):]
            continue
        frame = zstandard.ZstdDecompressor().decompressobj()
        out += frame.decompress(rest)
        assert frame.eof
        rest = frame.unused_data
    return bytes(out)


# -- random trees ----------------------------------------------------------------

NAME_CHARS = st.characters(codec="utf-8", exclude_characters="/\0")
SHORT_NAMES = st.text(NAME_CHARS, min_size=1, max_size=10)
LONG_NAMES = st.text(st.sampled_from("abcdéü日-_. "), min_size=100, max_size=140)


@dataclass
class Item:
    path: str
    kind: str  # dir, reg, symlink, hardlink, fifo, char, block
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 0
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, str] = field(default_factory=dict)


@dataclass
class Tree:
    items: list[Item]

    def get(self, path: str) -> Item:
        return next(i for i in self.items if i.path == path)

    def inode(self, path: str) -> Item:
        """The item a path stands for once hard links are followed."""
        item = self.get(path)
        while item.kind == "hardlink":
            item = self.get(item.link)
        return item

    def tar(self) -> bytes:
        kinds = {"dir": tarfile.DIRTYPE, "reg": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE,
                 "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
                 "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE}
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for item in self.items:
                ti = tarfile.TarInfo(item.path)
                ti.type = kinds[item.kind]
                ti.mode, ti.uid, ti.gid, ti.mtime = item.mode, item.uid, item.gid, item.mtime
                ti.linkname = item.link
                ti.devmajor, ti.devminor = item.dev
                ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in item.xattrs.items()}
                ti.size = len(item.data)
                tar.addfile(ti, io.BytesIO(item.data) if item.data else None)
        return buf.getvalue()


def payload(size: int, seed: int, style: str) -> bytes:
    if style == "random":
        return random.Random(seed).randbytes(size)
    if style == "text":
        return (b"line %d of a text file\n" * (size // 20 + 1))[:size]
    return bytes(size)


@st.composite
def trees(draw: st.DrawFn, max_items: int = 10, max_size: int = 3 * 4096 + 7) -> Tree:
    items: list[Item] = []
    dirs = [""]
    linkable: list[str] = []
    for i in range(draw(st.integers(1, max_items))):
        kind = draw(st.sampled_from(["dir", "dir", "reg", "reg", "reg", "symlink", "hardlink",
                                     "fifo", "char", "block"]))
        if kind == "hardlink" and not linkable:
            kind = "reg"
        parent = draw(st.sampled_from(dirs))
        if draw(st.integers(0, 9)) == 0:  # under a directory that has no entry of its own
            parent = f"{parent}/implicit{i}".lstrip("/")
            dirs.append(parent)
        name = f"{i:03d}" + draw(st.one_of(SHORT_NAMES, SHORT_NAMES, LONG_NAMES))
        item = Item(
            path=f"{parent}/{name}".lstrip("/"),
            kind=kind,
            mode=draw(st.integers(0, 0o7777)),
            uid=draw(st.one_of(st.integers(0, 70_000), st.integers(0, 2**31 - 1))),
            gid=draw(st.integers(0, 2**31 - 1)),
            mtime=draw(st.one_of(st.integers(0, 2**33),
                                 st.floats(0, 2**33, allow_nan=False, allow_infinity=False))),
            xattrs=draw(st.dictionaries(
                st.text("abcxyz.", min_size=1, max_size=8).map(lambda k: "user." + k),
                st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12),
                max_size=2)),
        )
        if kind == "dir":
            dirs.append(item.path)
        elif kind == "reg":
            size = draw(st.one_of(st.just(0), st.integers(1, 100), st.integers(100, max_size)))
            item.data = payload(size, draw(st.integers(0, 2**32)),
                                draw(st.sampled_from(["random", "text", "zeros"])))
        elif kind == "symlink":
            item.link = draw(st.text(st.characters(codec="utf-8", exclude_characters="\0"),
                                     min_size=1, max_size=30))
        elif kind == "hardlink":
            item.link = draw(st.sampled_from(linkable))
        elif kind in ("char", "block"):
            item.dev = (draw(st.integers(0, 4095)), draw(st.integers(0, 4095)))
        if kind != "dir":
            linkable.append(item.path)
        items.append(item)
    return Tree(items)


def check_reader(reader: BlobReader, tree: Tree, data: st.DataObject) -> None:
    for item in tree.items:
        node = reader.lookup(item.path)
        assert node is not None, item.path
        inode = tree.inode(item.path)
        if item.kind == "hardlink":
            assert node == reader.lookup(inode.path)
        assert node.kind == inode.kind
        assert (node.mode, node.uid, node.gid) == (inode.mode, inode.uid, inode.gid)
        assert node.mtime == math.floor(inode.mtime + 0.5)
        assert node.xattrs == {k: v.encode() for k, v in inode.xattrs.items()}
        if node.kind == "reg":
            assert node.size == len(inode.data)
            assert reader.read_file(node) == inode.data
        elif node.kind == "symlink":
            assert node.link_target == inode.link
        elif node.kind in ("char", "block"):
            assert (node.dev_major, node.dev_minor) == inode.dev
    files = [i for i in tree.items if i.kind == "reg" and i.data]
    for _ in range(data.draw(st.integers(0, 4)) if files else 0):
        item = data.draw(st.sampled_from(files))
        offset = data.draw(st.integers(0, len(item.data) + 10))
        length = data.draw(st.integers(0, len(item.data) + 10))
        node = reader.lookup(item.path)
        assert reader.read_file(node, offset, length) == item.data[offset:offset + length]


def priority_path(name: str) -> str:
    """How a prioritized name reads: surrounding blanks and a leading / or ./ go."""
    return name.strip().lstrip("/").removeprefix("./")


def check_prefetch(reader: BlobReader, result: BuildResult, tree: Tree,
                   prioritized: list[str]) -> None:
    paths = {i.path for i in tree.items}
    wanted = [p for p in prioritized if priority_path(p) in paths]
    assert result.missing_prioritized == [p for p in prioritized if p not in wanted]
    layer = reader.layer
    assert layer.prefetch_size == result.prefetch_size
    if not prioritized:
        assert layer.has_no_prefetch_landmark and layer.prefetch_size == 0
        return
    end = layer.prefetch_end
    assert end is not None and end > 0 and not layer.has_no_prefetch_landmark
    front = set()
    for path in wanted:
        inode = tree.inode(priority_path(path))
        if inode.kind == "reg":
            front.add(inode.path)
            assert all(c.blob_end <= end for c in reader.lookup(inode.path).chunks), path
    for item in tree.items:
        if item.kind == "reg" and item.path not in front:
            assert all(c.blob_offset >= end for c in reader.lookup(item.path).chunks)


@BUILD_SETTINGS
@given(tree=trees(), data=st.data())
def test_random_trees_convert_and_read_back(tree: Tree, data: st.DataObject) -> None:
    tar = tree.tar()
    chunk_size = data.draw(st.sampled_from([512, 1000, 1024, 2048, 4096]), label="chunk_size")
    names = [i.path for i in tree.items] + ["missing/file"]
    prioritized = data.draw(st.lists(
        st.sampled_from(names).flatmap(lambda p: st.sampled_from([p, "/" + p, "./" + p])),
        max_size=4, unique_by=priority_path), label="prioritized")
    for compression in FORMATS:
        options = {"chunk_size": chunk_size, "prioritized_files": prioritized}
        blob, result = convert(tar, compression, workers=1, **options)
        assert convert(tar, compression, workers=4, **options) == (blob, result)
        assert result.blob_digest == digest(blob) and result.blob_size == len(blob)
        stream = decompressed(compression, blob)
        assert digest(stream) == result.diff_id
        assert len(stream) == result.uncompressed_size
        report = verify_blob(source(blob), result.toc_digest)
        assert report.diff_id == result.diff_id
        assert report.regular_files == 1 + sum(i.kind == "reg" for i in tree.items)
        reader = BlobReader.open(source(blob), result.toc_digest)
        check_reader(reader, tree, data)
        check_prefetch(reader, result, tree, prioritized)


# -- random damage to a valid blob --------------------------------------------------

DAMAGE = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(1, 255)),
    st.tuples(st.just("flip-tail"), st.integers(1, 300), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 2**31)),
    st.tuples(st.just("insert"), st.integers(0, 2**31), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 2**31), st.integers(1, 64)),
    st.tuples(st.just("overwrite"), st.integers(0, 2**31), st.binary(min_size=1, max_size=16)),
), min_size=1, max_size=3)


def damage(blob: bytes, ops: list[tuple]) -> bytes:
    out = bytearray(blob)
    for op, where, *arg in ops:
        if not out:
            break
        at = len(out) - 1 - (where % len(out)) if op == "flip-tail" else where % len(out)
        if op in ("flip", "flip-tail"):
            out[at] ^= arg[0]
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = arg[0]
        elif op == "delete":
            del out[at:at + arg[0]]
        else:
            out[at:at + len(arg[0])] = arg[0]
    return bytes(out)


@dataclass(frozen=True)
class Sample:
    blob: bytes
    result: BuildResult
    files: dict[str, bytes]
    stream: bytes


def _sample_tree() -> Tree:
    rnd = random.Random(1)
    return Tree([
        Item("etc", "dir", mode=0o755),
        Item("etc/hostname", "reg", data=b"workspace\n", uid=1000, mtime=1_700_000_000),
        Item("bin", "dir", mode=0o755),
        Item("bin/tool", "reg", data=rnd.randbytes(2500), mode=0o755),
        Item("bin/text", "reg", data=payload(3000, 0, "text"), xattrs={"user.k": "vä"}),
        Item("bin/link", "hardlink", link="bin/tool"),
        Item("bin/sym", "symlink", link="tool"),
        Item("empty", "reg"),
        Item("fifo", "fifo"),
        Item("d/" + "long" * 30, "reg", data=b"long name\n", mtime=1_234_567_890.6),
    ])


_SAMPLES: dict[Compression, Sample] = {}


def sample(compression: Compression) -> Sample:
    if compression not in _SAMPLES:
        tree = _sample_tree()
        blob, result = convert(tree.tar(), compression, chunk_size=1024,
                               prioritized_files=["etc/hostname"])
        files = {i.path: tree.inode(i.path).data for i in tree.items
                 if tree.inode(i.path).kind == "reg"}
        _SAMPLES[compression] = Sample(blob, result, files, decompressed(compression, blob))
    return _SAMPLES[compression]


def tar_semantics(stream: bytes) -> list[tuple]:
    """What a tar says, as finely as a TOC can say it: mtimes to the second, and
    of the PAX records only those that a TOC holds."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tar:
        for ti in tar:
            f = tar.extractfile(ti) if ti.isreg() else None
            out.append((ti.name, ti.type, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname,
                        format_modtime(ti.mtime), ti.size, ti.linkname, ti.devmajor,
                        ti.devminor, xattrs_of(ti), f.read() if f else b""))
    return out


def check_damaged(compression: Compression, blob: bytes, toc_digest: str | None) -> None:
    """Opening, reading every file and verifying give a FormatError or the truth."""
    base = sample(compression)
    try:
        reader = BlobReader.open(source(blob), toc_digest)
    except FormatError:
        reader = None
    if reader is not None:
        for path, want in base.files.items():
            node = reader.lookup(path)
            if toc_digest is None:
                # Nothing vouches for the TOC: reading must merely end in bytes or a
                # FormatError (each chunk is still checked against the TOC's digest).
                if node is not None and node.kind == "reg":
                    with suppress(FormatError):
                        reader.read_file(node)
                continue
            assert node is not None, path
            try:
                got = reader.read_file(node)
            except FormatError:
                continue
            assert got == want, path
    try:
        report = verify_blob(source(blob), toc_digest)
    except FormatError:
        return
    assert reader is not None
    if toc_digest is None:
        return
    assert report.toc_digest == toc_digest
    if compression is Compression.GZIP:
        assert report.diff_id == base.result.diff_id  # every member has a CRC
    elif report.diff_id != base.result.diff_id:
        # zstd frames carry no checksum, and the TOC cannot see every byte of the
        # stream (PAX records it does not hold, sub-second mtimes): the stream may
        # differ, but only there, and the report's diff_id says how it is.
        stream = decompressed(compression, blob[:reader.layer.footer.payload_end])
        assert digest(stream) == report.diff_id
        assert tar_semantics(stream) == tar_semantics(base.stream)


@DAMAGE_SETTINGS
@given(compression=st.sampled_from(FORMATS), ops=DAMAGE)
def test_damaged_blob_never_serves_wrong_bytes(compression: Compression, ops: list) -> None:
    base = sample(compression)
    blob = damage(base.blob, ops)
    with time_limit(20):
        check_damaged(compression, blob, base.result.toc_digest)


@settings(DAMAGE_SETTINGS, max_examples=150)
@given(compression=st.sampled_from(FORMATS), ops=DAMAGE)
def test_damaged_blob_without_a_toc_digest(compression: Compression, ops: list) -> None:
    blob = damage(sample(compression).blob, ops)
    with time_limit(20):
        check_damaged(compression, blob, None)


@settings(DAMAGE_SETTINGS, max_examples=150)
@given(compression=st.sampled_from(FORMATS), data=st.data())
def test_damage_aimed_at_one_chunk(compression: Compression, data: st.DataObject) -> None:
    base = sample(compression)
    reader = BlobReader.open(source(base.blob), base.result.toc_digest)
    chunk = data.draw(st.sampled_from(list(reader.layer.payload_chunks())))
    at = data.draw(st.integers(chunk.blob_offset, chunk.blob_end - 1))
    blob = bytearray(base.blob)
    blob[at] ^= data.draw(st.integers(1, 255))
    with time_limit(20):
        check_damaged(compression, bytes(blob), base.result.toc_digest)


# -- adversarial TOCs that their digest vouches for -------------------------------------

TOC_FIELDS = ["name", "type", "size", "offset", "chunkOffset", "chunkSize", "innerOffset",
              "linkName", "mode", "digest", "chunkDigest", "modtime"]
TOC_VALUES = st.one_of(
    st.integers(0, 6000), st.integers(-1, 2**64),
    st.sampled_from(["etc", "etc/hostname", "bin", "bin/tool", "bin/text", "bin/link",
                     "empty", "fifo", "reg", "chunk", "hardlink", "symlink", "dir", "", "/x",
                     "../x", "a/b/c"]),
    st.binary(max_size=3).map(digest),
)
TOC_EDITS = st.lists(st.one_of(
    st.tuples(st.just("set"), st.integers(0, 99), st.sampled_from(TOC_FIELDS), TOC_VALUES),
    st.tuples(st.just("drop"), st.integers(0, 99), st.sampled_from(TOC_FIELDS)),
    st.tuples(st.just("delete"), st.integers(0, 99)),
    st.tuples(st.just("duplicate"), st.integers(0, 99)),
    st.tuples(st.just("swap"), st.integers(0, 99), st.integers(0, 99)),
), min_size=1, max_size=3)


def edit_toc(entries: list[dict], edits: list[tuple]) -> None:
    for op, at, *args in edits:
        if not entries:
            return
        at %= len(entries)
        if op == "set":
            entries[at][args[0]] = args[1]
        elif op == "drop":
            entries[at].pop(args[0], None)
        elif op == "delete":
            del entries[at]
        elif op == "duplicate":
            entries.insert(at, dict(entries[at]))
        else:
            other = args[0] % len(entries)
            entries[at], entries[other] = entries[other], entries[at]


@settings(DAMAGE_SETTINGS, max_examples=250)
@given(compression=st.sampled_from(FORMATS), edits=TOC_EDITS)
def test_vouched_for_but_inconsistent_toc(compression: Compression, edits: list) -> None:
    """A TOC can be authentic and still lie about the blob: reads and the full check
    must then fail with a FormatError, and whatever the full check accepts, the
    reader serves in full."""
    base = sample(compression)
    doc = json.loads(toc_json_of(base.blob))
    edit_toc(doc["entries"], edits)
    toc_json = json.dumps(doc).encode()
    blob = with_toc(base.blob, toc_json)
    with time_limit(20):
        try:
            reader = BlobReader.open(source(blob), digest(toc_json))
        except FormatError:
            return
        served: dict[str, bytes | None] = {}
        for path, node in reader.layer.walk():
            if node.kind == "reg":
                try:
                    data = reader.read_file(node)
                except FormatError:
                    served[path] = None
                    continue
                assert len(data) == node.size
                served[path] = data
        try:
            verify_blob(source(blob), digest(toc_json))
        except FormatError:
            return
    for path, data in served.items():
        node = reader.lookup(path)
        assert data is not None, path
        assert not node.digest or digest(data) == node.digest, path


# -- random damage to an input tar --------------------------------------------------


@settings(DAMAGE_SETTINGS, max_examples=150, deadline=None)
@given(tree=trees(max_items=6, max_size=3000), ops=DAMAGE,
       compression=st.sampled_from(FORMATS))
def test_damaged_tar_is_refused_or_converted_faithfully(tree: Tree, ops: list,
                                                        compression: Compression) -> None:
    tar = damage(tree.tar(), ops)
    with time_limit(20):
        try:
            blob, result = convert(tar, compression, chunk_size=1024, workers=1)
        except TarError:
            return
        # What the writer writes, its own reader and verifier accept in full.
        report = verify_blob(source(blob), result.toc_digest)
        assert report.diff_id == result.diff_id
        reader = BlobReader.open(source(blob), result.toc_digest)
        for _, node in reader.layer.walk():
            if node.kind == "reg":
                assert digest(reader.read_file(node)) == node.digest


# -- arbitrary TOC JSON ----------------------------------------------------------------

TEXT = st.text(st.one_of(st.characters(), st.characters(min_codepoint=0xD800,
                                                          max_codepoint=0xDFFF)), max_size=8)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=12,
)
INTS = st.one_of(st.integers(0, 4096), st.integers(-3, 2**64), JSON)
SHA = st.binary(min_size=1, max_size=4).map(digest)
NAMES = st.one_of(st.sampled_from(["a", "a/b", "./a/", "/a", "../a", "a/../b", "", ".", "a//b",
                                   "b", "a/b/c"]), TEXT, JSON)
ENTRY = st.fixed_dictionaries({}, optional={
    "name": NAMES,
    "type": st.one_of(st.sampled_from(sorted(ENTRY_TYPES)), JSON),
    "size": INTS, "offset": INTS, "chunkOffset": INTS, "chunkSize": INTS, "innerOffset": INTS,
    "mode": INTS, "uid": INTS, "gid": INTS, "devMajor": INTS, "devMinor": INTS,
    "modtime": st.one_of(st.sampled_from(["2024-01-02T03:04:05Z", "1970-01-01T00:00:00Z",
                                          "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"]),
                         JSON),
    "linkName": NAMES, "userName": TEXT, "groupName": TEXT,
    "digest": st.one_of(SHA, JSON), "chunkDigest": st.one_of(SHA, JSON),
    "xattrs": st.one_of(st.dictionaries(TEXT, st.one_of(
        st.binary(max_size=6).map(lambda b: base64.b64encode(b).decode()), JSON), max_size=2),
        JSON),
})
TOC_DOCS = st.one_of(
    JSON,
    st.fixed_dictionaries({"version": st.one_of(st.just(1), JSON),
                           "entries": st.one_of(st.lists(ENTRY, max_size=8), JSON)}),
)
TOC_SETTINGS = settings(max_examples=250, deadline=timedelta(seconds=2),
                        suppress_health_check=[HealthCheck.too_slow])


def footer(compression: Compression, payload_end: int, uncompressed: int | None = None) -> Footer:
    return Footer(compression=compression, toc_offset=payload_end + 8, toc_length=1 << 20,
                  payload_end=payload_end, footer_size=51, toc_uncompressed_size=uncompressed)


@TOC_SETTINGS
@given(doc=TOC_DOCS, payload_end=st.integers(0, 2**40))
@example(doc={"version": 1, "entries": [{"name": "a", "type": []}]}, payload_end=0)
@example(doc={"version": 1, "entries": [{"name": "\udc80", "type": "dir"}]}, payload_end=0)
@example(doc={"version": 1, "entries": [{"name": "a", "type": "dir", "xattrs": {"k": "é"}}]},
         payload_end=0)
@example(doc={"version": 1, "entries": [{"name": "d/" * 2000 + "f", "type": "fifo"}]},
         payload_end=0)
def test_parse_toc_on_arbitrary_json(doc: object, payload_end: int) -> None:
    raw = json.dumps(doc).encode()
    try:
        toc = parse_toc(raw)
    except TOCError:
        return
    again = parse_toc(toc.to_json_bytes())
    assert again == toc
    try:
        layer = Layer(toc, footer(Compression.GZIP, payload_end), digest(raw))
    except TOCError:
        return
    for _, node in layer.walk():
        assert all(c.blob_offset < payload_end and c.size > 0 for c in node.chunks)
        assert sum(c.size for c in node.chunks) == (node.size if node.chunks else 0)


@TOC_SETTINGS
@given(data=st.binary(max_size=200))
def test_parse_toc_on_arbitrary_bytes(data: bytes) -> None:
    with suppress(TOCError):
        parse_toc(data)


@TOC_SETTINGS
@given(doc=TOC_DOCS, compression=st.sampled_from(FORMATS), junk=st.binary(max_size=64),
       as_tar=st.booleans())
def test_load_toc_on_arbitrary_json_and_bytes(doc: object, compression: Compression,
                                              junk: bytes, as_tar: bool) -> None:
    raw = json.dumps(doc).encode()
    if compression is Compression.GZIP:
        ti = tarfile.TarInfo("stargz.index.json" if as_tar else "other")
        ti.size = len(raw)
        member = gzip_member(ti.tobuf(tarfile.USTAR_FORMAT) + raw + b"\0" * 1024, 6)
    else:
        member = zstd_frame(raw, 3)
    for toc_bytes, toc_digest in [(member, digest(raw)), (member, None), (junk, None),
                                  (member[:len(member) // 2], None), (junk + member, None)]:
        try:
            layer = load_toc(footer(compression, 1 << 30), toc_bytes, toc_digest)
        except FormatError:
            continue
        assert layer.toc_digest == digest(raw)
