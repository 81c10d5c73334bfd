"""Interoperability with the reference implementation, both ways.

The reference is stargz-snapshotter's Go `estargz` package (and its `zstdchunked`
subpackage), from Debian's golang-github-containerd-stargz-snapshotter-dev.
`tests/interop/estargz-checker` is a small Go program of ours over it, built once
per session, offline, in GOPATH mode:

- blobs we write must pass the reference reader's checks (TOC digest, every
  chunk through its verifier, the whole blob a tar that agrees with the TOC) and
  give the diff_id we report, with the landmark where the options put it;
- blobs the reference builds must open in our reader with the TOC digest it
  reports, and give back the input tar's contents and metadata.

These tests never skip: without Go and the reference sources they fail and say
what to install (`make deps` installs both).
"""

import io
import json
import math
import os
import random
import shutil
import subprocess
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import estargz
from estargz import codec, writer
from estargz.verify import verify_blob

from .test_writer_memory import many_files_tar

CHECKER_SOURCE = Path(__file__).parent / "interop" / "estargz-checker"
REFERENCE_GOPATH = "/usr/share/gocode"
REFERENCE_PACKAGE = "github.com/containerd/stargz-snapshotter/estargz"
INSTALL_HINT = (
    "run `make deps` (tools/install-system-deps.sh installs the Debian packages "
    "golang-go and golang-github-containerd-stargz-snapshotter-dev)"
)

CHUNK = 8192  # small, so that many files span several chunks
MTIME = 1_700_000_000
COMPRESSIONS = [estargz.Compression.GZIP, estargz.Compression.ZSTD]
LONG_DIR = "synthetic/" + "d" * 70
LONG_FILE = f"{LONG_DIR}/{'f' * 90}.txt"  # > 100 characters: a PAX path record
LONG_TARGET = "../" * 20 + "t" * 60  # a symlink target > 100 characters
# Files to put first; a hard link brings its target along, a path may be absolute.
PRIORITIZED = [
    "pylib/json/decoder.py",
    "synthetic/hard-big",
    "synthetic/empty",
    LONG_FILE,
    "/pylib/email/message.py",
]


# -- the Go checker ---------------------------------------------------------


@dataclass(frozen=True)
class Checker:
    binary: Path

    def run(self, *args: str | os.PathLike[str]) -> dict:
        proc = self.run_raw(*args)
        if proc.returncode != 0:
            pytest.fail(
                f"estargz-checker {' '.join(map(str, args))} failed "
                f"(exit {proc.returncode}):\n{proc.stderr}",
                pytrace=False,
            )
        return json.loads(proc.stdout)

    def run_raw(self, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def verify(self, blob: Path, toc_digest: str, prefetch: list[str] | None) -> dict:
        """`prefetch`: the prioritized files, or [] to require the no-prefetch landmark."""
        args: list[str | os.PathLike[str]] = ["verify", blob, "-toc-digest", toc_digest]
        if prefetch:
            args += ["-expect-prefetch", ",".join(prefetch)]
        elif prefetch is not None:
            args.append("-expect-no-prefetch")
        return self.run(*args)

    def build(
        self,
        tar_path: Path,
        out: Path,
        compression: estargz.Compression,
        prioritized: list[str],
        chunk_size: int = CHUNK,
    ) -> dict:
        args: list[str | os.PathLike[str]] = ["build", tar_path, out]
        args += ["-chunk-size", str(chunk_size)]
        if compression is estargz.Compression.ZSTD:
            args.append("-zstd")
        if prioritized:
            args += ["-prioritize", ",".join(prioritized)]
        return self.run(*args)


def go_build_command(go: str, out: Path, cache: Path) -> tuple[list[str], dict[str, str]]:
    """The offline GOPATH-mode build of the checker against Debian's Go sources."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GO", "CGO_"))}
    env.update(
        GO111MODULE="off",  # GOPATH mode: no go.mod, imports resolve in GOPATH
        GOPATH=REFERENCE_GOPATH,
        GOPROXY="off",  # never reach for the network
        GOFLAGS="",
        GOENV="off",  # ignore any user-level `go env -w` settings
        GOCACHE=str(cache),
        CGO_ENABLED="0",
    )
    return [go, "build", "-o", str(out), "."], env


@pytest.fixture(scope="session")
def checker(tmp_path_factory: pytest.TempPathFactory) -> Checker:
    go = shutil.which("go") or ("/usr/bin/go" if os.path.exists("/usr/bin/go") else None)
    if go is None:
        pytest.fail(f"the Go toolchain is missing: {INSTALL_HINT}", pytrace=False)
    reference = Path(REFERENCE_GOPATH, "src", REFERENCE_PACKAGE)
    if not (reference / "estargz.go").is_file() or not (reference / "zstdchunked").is_dir():
        pytest.fail(
            f"the reference estargz sources are missing from {reference}: {INSTALL_HINT}",
            pytrace=False,
        )
    work = tmp_path_factory.mktemp("estargz-checker")
    binary = work / "estargz-checker"
    cmd, env = go_build_command(go, binary, work / "gocache")
    proc = subprocess.run(
        cmd, cwd=CHECKER_SOURCE, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0:
        pytest.fail(
            f"building the Go checker failed ({' '.join(cmd)} in {CHECKER_SOURCE}):\n"
            f"{proc.stdout}{proc.stderr}",
            pytrace=False,
        )
    return Checker(binary)


# -- the input tar ------------------------------------------------------------


def _member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
    info.mtime = MTIME
    info.uid, info.gid, info.uname, info.gname = 0, 0, "root", "root"
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _add(tar: tarfile.TarFile, info: tarfile.TarInfo, data: bytes = b"") -> None:
    if info.isreg():
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _add_real_tree(tar: tarfile.TarFile) -> None:
    """A slice of the Python standard library, with its real metadata."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tar.add(stdlib, arcname="pylib", recursive=False)
    for sub in ("json", "email", "http"):
        tar.add(stdlib / sub, arcname=f"pylib/{sub}", recursive=True)


def _add_synthetic(tar: tarfile.TarFile, first: bool) -> None:
    rng = random.Random(20240601)
    owner = {"uid": 1000, "gid": 1000, "uname": "alice", "gname": "staff"}
    if first:
        _add(tar, _member("synthetic", tarfile.DIRTYPE, mode=0o750, **owner))
        _add(tar, _member("synthetic/dup.txt"), b"the first copy, replaced later\n")
        return
    _add(tar, _member("synthetic/empty", mode=0o600, **owner))
    _add(tar, _member("synthetic/big.bin", mode=0o755, **owner), rng.randbytes(5 * CHUNK + 123))
    _add(tar, _member("synthetic/exact-chunk.bin"), rng.randbytes(CHUNK))
    _add(tar, _member("synthetic/text.txt", mtime=MTIME + 0.5), b"hello\n" * 5000)
    _add(tar, _member("synthetic/link-to-big", tarfile.SYMTYPE, linkname="big.bin", mode=0o777))
    _add(tar, _member("synthetic/long-link", tarfile.SYMTYPE, linkname=LONG_TARGET, mode=0o777))
    _add(tar, _member("synthetic/hard-big", tarfile.LNKTYPE, linkname="synthetic/big.bin"))
    _add(tar, _member("synthetic/fifo", tarfile.FIFOTYPE, mode=0o600))
    _add(tar, _member("synthetic/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3))
    _add(tar, _member("synthetic/loop0", tarfile.BLKTYPE, mode=0o660, devmajor=7, devminor=0))
    xattrs = {
        "SCHILY.xattr.user.comment": "héllo wörld",
        "SCHILY.xattr.user.empty-ish": "x",
        "SCHILY.xattr.trusted.overlay.opaque": "y",
    }
    _add(tar, _member("synthetic/with-xattrs", pax_headers=xattrs), b"has xattrs\n")
    _add(tar, _member(LONG_DIR, tarfile.DIRTYPE))
    _add(
        tar,
        _member(LONG_FILE, uid=3_000_000, gid=3_000_001, uname="bob", gname="bobs"),
        rng.randbytes(3 * CHUNK),
    )
    _add(tar, _member("synthetic/epoch", mtime=0), b"mtime is the epoch\n")
    _add(tar, _member("synthetic/setuid", mode=0o4755), b"#!/bin/sh\n")
    # No entries for these parents: readers make them implicitly.
    _add(tar, _member("implicit/parent/file.txt"), b"my parents are implicit\n")
    _add(tar, _member("synthetic/dup.txt"), b"the second copy wins\n")


def make_tar(path: Path, fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt, encoding="utf-8") as tar:
        _add_synthetic(tar, first=True)
        _add_real_tree(tar)
        _add_synthetic(tar, first=False)
    return path


@pytest.fixture(scope="session")
def realistic_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tar(tmp_path_factory.mktemp("tars") / "realistic.tar")


@dataclass
class Expected:
    info: tarfile.TarInfo
    data: bytes = b""


def expected_tree(tar_path: Path) -> dict[str, Expected]:
    """What extracting the tar gives: by cleaned path, later entries winning."""
    out: dict[str, Expected] = {}
    with tarfile.open(tar_path, "r:", encoding="utf-8") as tar:
        for info in tar:
            path = info.name.strip("/")
            out.pop(path, None)
            data = b""
            if info.isreg():
                member = tar.extractfile(info)
                assert member is not None
                data = member.read()
            out[path] = Expected(info, data)
    return out


def round_mtime(mtime: float) -> int:
    return math.floor(mtime + 0.5)  # the TOC keeps whole seconds, rounded


# -- our blobs, checked by the reference ---------------------------------------


def build_ours(
    tar_path: Path, out: Path, compression: estargz.Compression, prioritized: list[str]
) -> estargz.BuildResult:
    options = estargz.BuildOptions(
        compression=compression, chunk_size=CHUNK, prioritized_files=prioritized
    )
    with tar_path.open("rb") as src, out.open("wb") as dst:
        return estargz.build(src, dst, options)


def open_ours(blob: Path, toc_digest: str) -> estargz.BlobReader:
    return estargz.BlobReader.open(estargz.FileSource.open(str(blob)), toc_digest)


def _close(reader: estargz.BlobReader) -> None:
    reader.source.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("prioritized", [PRIORITIZED, []], ids=["prefetch", "no-prefetch"])
@pytest.mark.parametrize("compression", COMPRESSIONS, ids=str)
def test_our_blob_passes_reference_verify(
    checker: Checker,
    realistic_tar: Path,
    tmp_path: Path,
    compression: estargz.Compression,
    prioritized: list[str],
) -> None:
    blob = tmp_path / "ours.blob"
    result = build_ours(realistic_tar, blob, compression, prioritized)
    assert result.missing_prioritized == []

    report = checker.verify(blob, result.toc_digest, prioritized)

    assert report["tocDigest"] == result.toc_digest
    assert report["compression"] == ("zstd" if compression is estargz.Compression.ZSTD else "gzip")
    assert report["diffID"] == result.diff_id
    reader = open_ours(blob, result.toc_digest)
    try:
        toc_entries = list(reader.toc_entries())
        assert report["entries"] == sum(e.type != "chunk" for e in toc_entries)
        assert report["files"] == sum(e.type == "reg" for e in toc_entries)
        assert report["chunks"] == sum(e.has_payload for e in toc_entries)
        if prioritized:
            assert report["landmark"] == estargz.PREFETCH_LANDMARK
            assert report["prefetchLandmarkOffset"] > 0
            assert report["prefetchLandmarkOffset"] == result.prefetch_size
            assert reader.layer.prefetch_end == result.prefetch_size
        else:
            assert report["landmark"] == estargz.NO_PREFETCH_LANDMARK
            assert reader.layer.has_no_prefetch_landmark
            assert result.prefetch_size == 0
    finally:
        _close(reader)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT], ids=["gnu", "ustar"])
@pytest.mark.parametrize("compression", COMPRESSIONS, ids=str)
def test_other_tar_formats_pass_reference_verify(
    checker: Checker, tmp_path: Path, compression: estargz.Compression, fmt: int
) -> None:
    """GNU long-name records and USTAR prefix-split names, copied verbatim."""
    tar_path = tmp_path / "in.tar"
    deep = "/".join(["level"] * 15)  # 89 characters: USTAR splits it into prefix and name
    with tarfile.open(tar_path, "w", format=fmt) as tar:
        _add(tar, _member("top", tarfile.DIRTYPE))
        _add(tar, _member(f"top/{deep}/a-file-with-a-longish-name.txt"), b"deep\n" * 3000)
        _add(tar, _member("top/sym", tarfile.SYMTYPE, linkname="x" * 90))
        if fmt == tarfile.GNU_FORMAT:
            _add(tar, _member("top/" + "g" * 150), b"gnu long name\n")
            _add(tar, _member("top/gnu-long-link", tarfile.SYMTYPE, linkname="l" * 150))
    prioritized = [f"top/{deep}/a-file-with-a-longish-name.txt"]
    blob = tmp_path / "ours.blob"
    result = build_ours(tar_path, blob, compression, prioritized)
    report = checker.verify(blob, result.toc_digest, prioritized)
    assert report["diffID"] == result.diff_id
    assert report["prefetchLandmarkOffset"] == result.prefetch_size > 0


def test_streamed_zstd_frames_pass_reference_verify(
    checker: Checker, realistic_tar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames compressed as a stream (a TOC or a member too large for one call) are
    frames the reference reads. Here every frame compressed from a file is one: the
    TOC, and each member that holds headers after its chunk."""
    monkeypatch.setattr(codec, "_ZSTD_ONE_CALL_MAX", 0)
    monkeypatch.setattr(writer, "_MEMBER_SPILL", 0)
    blob = tmp_path / "ours.blob"
    result = build_ours(realistic_tar, blob, estargz.Compression.ZSTD, PRIORITIZED)
    report = checker.verify(blob, result.toc_digest, PRIORITIZED)
    assert report["diffID"] == result.diff_id
    with estargz.FileSource.open(str(blob)) as source:
        assert verify_blob(source, result.toc_digest).diff_id == result.diff_id


def test_zstd_blob_of_many_files_passes_reference_verify(checker: Checker, tmp_path: Path) -> None:
    """A TOC of 100,000 files is too large to compress in one call: streamed."""
    tar_path = tmp_path / "many.tar"
    many_files_tar(tar_path, 100_000)
    blob = tmp_path / "ours.blob"
    prioritized = ["d0042/f0042042"]
    result = build_ours(tar_path, blob, estargz.Compression.ZSTD, prioritized)
    toc_size = int(result.annotations["io.containers.zstd-chunked.manifest-position"]
                   .split(":")[2])
    assert toc_size > codec._ZSTD_ONE_CALL_MAX
    report = checker.verify(blob, result.toc_digest, prioritized)
    assert report["diffID"] == result.diff_id
    assert report["entries"] == result.entry_count


def test_checker_rejects_what_it_should(
    checker: Checker, realistic_tar: Path, tmp_path: Path
) -> None:
    """The checker is not vacuous: a wrong digest, a misplaced prioritized file and a
    corrupt chunk each fail it."""
    blob = tmp_path / "ours.blob"
    result = build_ours(realistic_tar, blob, estargz.Compression.GZIP, ["pylib/json/decoder.py"])
    checker.verify(blob, result.toc_digest, ["pylib/json/decoder.py"])

    wrong = "sha256:" + "0" * 64
    proc = checker.run_raw("verify", blob, "-toc-digest", wrong)
    assert proc.returncode == 1 and "VerifyTOC" in proc.stderr

    proc = checker.run_raw(
        "verify", blob, "-toc-digest", result.toc_digest, "-expect-prefetch", "synthetic/big.bin"
    )
    assert proc.returncode == 1 and "after the landmark" in proc.stderr

    proc = checker.run_raw("verify", blob, "-toc-digest", result.toc_digest, "-expect-no-prefetch")
    assert proc.returncode == 1 and estargz.NO_PREFETCH_LANDMARK in proc.stderr

    reader = open_ours(blob, result.toc_digest)
    try:
        node = reader.lookup("synthetic/big.bin")
        assert node is not None and len(node.chunks) > 1
        chunk = node.chunks[2]
    finally:
        _close(reader)
    corrupt = tmp_path / "corrupt.blob"
    data = bytearray(blob.read_bytes())
    data[(chunk.blob_offset + chunk.blob_end) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    proc = checker.run_raw("verify", corrupt, "-toc-digest", result.toc_digest)
    assert proc.returncode == 1 and "synthetic/big.bin" in proc.stderr

    proc = checker.run_raw("verify", blob)
    assert proc.returncode == 2 and "-toc-digest" in proc.stderr


# -- reference blobs, read by us ------------------------------------------------


def _check_node(
    reader: estargz.BlobReader, path: str, want: Expected, tree: dict[str, Expected]
) -> None:
    info = want.info
    node = reader.lookup(path)
    assert node is not None, f"{path!r} is missing from our view of the reference blob"
    if info.islnk():
        target = reader.lookup(info.linkname)
        assert node == target, f"hard link {path!r} is not its target's node"
        info, want = tree[info.linkname.strip("/")].info, tree[info.linkname.strip("/")]
    kinds = {
        tarfile.REGTYPE: "reg",
        tarfile.DIRTYPE: "dir",
        tarfile.SYMTYPE: "symlink",
        tarfile.FIFOTYPE: "fifo",
        tarfile.CHRTYPE: "char",
        tarfile.BLKTYPE: "block",
    }
    assert node.kind == kinds[info.type], path
    got = (node.mode, node.uid, node.gid, node.mtime)
    assert got == (info.mode, info.uid, info.gid, round_mtime(info.mtime)), path
    assert node.xattrs == {
        k.removeprefix("SCHILY.xattr."): v.encode()
        for k, v in info.pax_headers.items()
        if k.startswith("SCHILY.xattr.")
    }, path
    if node.kind == "reg":
        assert node.size == info.size, path
        assert reader.read_file(node) == want.data, path
        if node.size > CHUNK:
            assert len(node.chunks) == math.ceil(node.size / CHUNK), path
    elif node.kind == "symlink":
        assert node.link_target == info.linkname, path
    elif node.kind in ("char", "block"):
        assert (node.dev_major, node.dev_minor) == (info.devmajor, info.devminor), path


@pytest.mark.parametrize("prioritized", [PRIORITIZED, []], ids=["prefetch", "no-prefetch"])
@pytest.mark.parametrize("compression", COMPRESSIONS, ids=str)
def test_reference_blob_read_by_us(
    checker: Checker,
    realistic_tar: Path,
    tmp_path: Path,
    compression: estargz.Compression,
    prioritized: list[str],
) -> None:
    blob = tmp_path / "reference.blob"
    built = checker.build(realistic_tar, blob, compression, prioritized)
    assert built["size"] == blob.stat().st_size
    # The checker agrees with the reference writer about its own blob.
    report = checker.verify(blob, built["tocDigest"], prioritized)
    assert report["diffID"] == built["diffID"]
    # Our full verifier accepts it and computes the same diff_id.
    with estargz.FileSource.open(str(blob)) as source:
        verified = verify_blob(source, built["tocDigest"])
    assert verified.diff_id == built["diffID"]
    assert verified.regular_files == report["files"]

    tree = expected_tree(realistic_tar)
    reader = open_ours(blob, built["tocDigest"])
    try:
        layer = reader.layer
        assert layer.toc_digest == built["tocDigest"]
        assert reader.compression is compression
        if compression is estargz.Compression.ZSTD:
            position = built["annotations"]["io.containers.zstd-chunked.manifest-position"]
            footer = layer.footer
            assert position == (
                f"{footer.toc_offset}:{footer.toc_length}:{footer.toc_uncompressed_size}:1"
            )

        for path, want in tree.items():
            _check_node(reader, path, want, tree)
        assert reader.lookup("implicit/parent").kind == "dir"

        landmarks = {estargz.PREFETCH_LANDMARK, estargz.NO_PREFETCH_LANDMARK}
        ours = {p for p, n in layer.walk() if p and p not in landmarks and not n.implicit}
        assert ours == set(tree), "our view holds other paths than the input tar"

        if prioritized:
            assert not layer.has_no_prefetch_landmark
            end = layer.prefetch_end
            assert end is not None and end > 0
            assert reader.prefetch_region() == (0, end)
            assert report["prefetchLandmarkOffset"] == end
            for name in prioritized:
                node = reader.lookup(name.lstrip("/"))
                assert node is not None, name
                for chunk in node.chunks:
                    assert chunk.blob_offset < end and chunk.blob_end <= end, name
            # Something that was not prioritized lies after the landmark.
            late = reader.lookup("synthetic/exact-chunk.bin")
            assert late is not None and late.chunks[0].blob_offset > end
        else:
            assert layer.has_no_prefetch_landmark
            assert layer.prefetch_end == 0
            assert reader.prefetch_region() == (0, 0)
    finally:
        _close(reader)


@pytest.mark.parametrize("compression", COMPRESSIONS, ids=str)
def test_reference_owner_names_are_carried_to_later_entries(
    checker: Checker, realistic_tar: Path, tmp_path: Path, compression: estargz.Compression
) -> None:
    """The reference writes userName/groupName only on the first entry of each
    uid/gid ("may only be present for the first entry with the same UID"); a reader
    carries the name on to the later entries with the same id."""
    blob = tmp_path / "reference.blob"
    built = checker.build(realistic_tar, blob, compression, [])
    tree = expected_tree(realistic_tar)
    reader = open_ours(blob, built["tocDigest"])
    try:
        landmarks = (estargz.PREFETCH_LANDMARK, estargz.NO_PREFETCH_LANDMARK)
        raw = [
            e
            for e in reader.toc_entries()
            if e.type != "chunk" and e.uid == 0 and e.name not in landmarks
        ]
        assert raw[0].user_name == "root" and any(not e.user_name for e in raw[1:])
        for path, want in tree.items():
            if want.info.islnk():
                continue
            node = reader.lookup(path)
            assert node is not None, path
            assert (node.user_name, node.group_name) == (want.info.uname, want.info.gname), path
    finally:
        _close(reader)
