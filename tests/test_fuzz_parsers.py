"""Fuzzing every parser of untrusted input, on a fixed budget.

One property per parser: arbitrary and structure-aware inputs either parse into
something that holds the parser's promises or raise the parser's own error type;
never another exception, never a hang (hypothesis's deadline), never unbounded
output. Inputs that once broke a parser stay as explicit @example cases.

The budget: each property runs FUZZ_EXAMPLES examples (the whole module takes well
under a minute on two cores); set LAZYPULL_FUZZ_EXAMPLES to run longer locally.
"""

import base64
import contextlib
import hashlib
import io
import json
import os
import tarfile
import tempfile
import zlib
from datetime import timedelta
from pathlib import Path

import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from converter.source_layer import LayerFormatError, _gunzip, _unzstd
from estargz import Compression, Footer, FooterError, Layer, TarError, TOCError, parse_toc
from estargz.footer import MAX_FOOTER_SIZE, gzip_footer, parse_footer, zstd_footer
from estargz.tarindex import scan_tar
from oci.hosts import HostsConfig, HostsConfigError
from oci.manifest import Index, Manifest, ManifestError, parse_manifest
from snapshotter.filters import FilterError, parse_filters, snapshot_fields
from snapshotter.fusemanager.protocol import (
    INVALID,
    ManagerError,
    answer_of,
    decode,
    encode,
    request_of,
)

FUZZ_EXAMPLES = int(os.environ.get("LAZYPULL_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=timedelta(seconds=5),  # generous: two shared cores; a hang takes far longer
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


JSON_LEAVES = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
               | st.floats(allow_nan=False) | st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=10)
NESTING = st.integers(1, 50_000).map(lambda n: b"[" * n + b"]" * n)


# -- TOC entries, into a layer's tree ------------------------------------------------------

SEGMENTS = st.sampled_from(["a", "b", "..", ".", "", "etc", "a\0b", "é", "x" * 300,
                            ".wh.a", ".wh..wh..opq"])
PATHS = st.one_of(
    st.lists(SEGMENTS, min_size=1, max_size=5).map("/".join),
    st.lists(SEGMENTS, min_size=1, max_size=5).map(lambda p: "/" + "/".join(p)),
    st.sampled_from([300, 3_000, 20_000]).map(lambda n: "/".join(["d"] * n)),
    st.text(max_size=10),
)
TOC_ENTRY = st.fixed_dictionaries(
    {"name": PATHS,
     "type": st.sampled_from(["dir", "reg", "symlink", "hardlink", "fifo", "char", "chunk"])},
    optional={
        "linkName": st.one_of(PATHS, st.sampled_from(["/etc", "..", "../../x"])),
        "size": st.integers(0, 10_000),
        "offset": st.integers(0, 5_000),
        "chunkOffset": st.integers(0, 10_000),
        "chunkSize": st.integers(0, 10_000),
        "chunkDigest": st.binary(max_size=2).map(sha),
        "mode": st.integers(0, 0o7777),
        "xattrs": st.dictionaries(st.text(max_size=300),
                                  st.binary(max_size=70_000).map(
                                      lambda b: base64.b64encode(b).decode()), max_size=3),
    })
TOC_DOCS = st.one_of(
    st.fixed_dictionaries({"version": st.just(1), "entries": st.lists(TOC_ENTRY, max_size=12)}),
    JSON_VALUES,
)


def footer_at(payload_end: int) -> Footer:
    return Footer(compression=Compression.GZIP, toc_offset=payload_end, toc_length=1 << 20,
                  payload_end=payload_end, footer_size=51)


@FUZZ
@given(doc=TOC_DOCS, payload_end=st.integers(1, 10_000))
@example(doc={"version": 1, "entries": [{"name": "/".join(["d"] * 50_000), "type": "fifo"}]},
         payload_end=1)
@example(doc={"version": 1, "entries": [{"name": "a", "type": "symlink", "linkName": "/etc"},
                                        {"name": "a/passwd", "type": "fifo"}]}, payload_end=1)
@example(doc={"version": 1, "entries": [{"name": "x\0y", "type": "dir"}]}, payload_end=1)
def test_toc_entries_build_a_tree_inside_the_layer_or_are_refused(doc: object,
                                                                  payload_end: int) -> None:
    try:
        toc = parse_toc(json.dumps(doc).encode())
        layer = Layer(toc, footer_at(payload_end), sha(b"toc"))
    except TOCError:
        return
    directories = set()
    with layer:
        for path, node in layer.walk():
            parts = path.split("/") if path else []
            assert not path.startswith("/") and ".." not in parts and "." not in parts
            assert "\0" not in path and len(parts) <= 1 << 14
            if parts:  # under a directory of the layer, never under a symlink
                assert path.rpartition("/")[0] in directories
            if node.kind == "dir":
                assert node.path == path
                directories.add(path)
            assert sum(len(k.encode()) + 1 for k in node.xattrs) <= 64 << 10
            for chunk in node.chunks:
                assert 0 <= chunk.blob_offset < payload_end and chunk.size > 0


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), NESTING))
def test_toc_bytes_parse_or_raise_toc_error(data: bytes) -> None:
    with contextlib.suppress(TOCError):
        parse_toc(data)


# -- footers -------------------------------------------------------------------------------

FOOTERS = st.one_of(
    st.integers(0, 2**64 - 1).map(gzip_footer),
    st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
              st.integers(0, 2**64 - 1)).map(lambda t: zstd_footer(*t)),
    st.binary(min_size=40, max_size=MAX_FOOTER_SIZE),
)


@FUZZ
@given(footer=FOOTERS, flips=st.lists(st.tuples(st.integers(0, 50), st.integers(1, 255)),
                                      max_size=2), extra=st.integers(0, 2**40))
@example(footer=gzip_footer(2**63), flips=[], extra=100)
def test_footers_parse_inside_the_blob_or_raise_footer_error(footer: bytes,
                                                             flips: list[tuple[int, int]],
                                                             extra: int) -> None:
    tail = bytearray(footer)
    for at, mask in flips:
        tail[at % len(tail)] ^= mask
    blob_size = len(tail) + extra
    try:
        found = parse_footer(bytes(tail), blob_size)
    except FooterError:
        return
    assert 0 <= found.payload_end <= found.toc_offset
    assert found.toc_offset + found.toc_length <= blob_size - found.footer_size


# -- tar headers -----------------------------------------------------------------------------

TAR_TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                             tarfile.FIFOTYPE, tarfile.CHRTYPE, b"S", b"x", b"g", b"L", b"7"])
PAX = st.dictionaries(st.sampled_from(["path", "linkpath", "size", "mtime", "uid",
                                       "SCHILY.xattr.user.a", "SCHILY.xattr.",
                                       "GNU.sparse.map", "GNU.sparse.size", "comment"]),
                      st.text(max_size=20), max_size=3)


@st.composite
def tars(draw: st.DrawFn) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for _ in range(draw(st.integers(1, 4))):
            ti = tarfile.TarInfo(draw(PATHS.filter(lambda p: "\0" not in p)) or "x")
            ti.type = draw(TAR_TYPES)
            ti.linkname = draw(st.sampled_from(["", "a", "../a", "/etc/passwd", "x/../../y"]))
            ti.pax_headers = draw(PAX)
            data = draw(st.binary(max_size=600)) if ti.type == tarfile.REGTYPE else b""
            ti.size = len(data)
            try:
                tar.addfile(ti, io.BytesIO(data))
            except (ValueError, UnicodeError):  # tarfile will not write it: leave it out
                continue
    raw = bytearray(out.getvalue())
    for at, value in draw(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                                   max_size=3)):
        raw[at % len(raw)] = value
    return bytes(raw[:draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw)


@FUZZ
@given(tar=st.one_of(tars(), st.binary(max_size=2048)))
def test_tar_headers_scan_into_clean_members_or_raise_tar_error(tar: bytes) -> None:
    try:
        members = list(scan_tar(io.BytesIO(tar)))
    except TarError:
        return
    for member in members:
        parts = member.path.split("/") if member.path else []
        assert ".." not in parts and not member.path.startswith("/") and "\0" not in member.path
        assert member.offset < member.offset_data <= len(tar)
        assert member.offset_data + member.size <= len(tar)


# -- manifests and indexes -------------------------------------------------------------------

DIGESTS = st.one_of(st.binary(max_size=3).map(sha), st.sampled_from(
    ["sha256:" + "0" * 63, "sha256:" + "A" * 64, "md5:00", "sha512:" + "0" * 128, ""]), JSON_LEAVES)
MEDIA = st.one_of(st.sampled_from([
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v1+json", "application/json", "text/html",
]), JSON_VALUES)
DESCRIPTOR = st.one_of(JSON_VALUES, st.fixed_dictionaries(
    {"mediaType": MEDIA, "digest": DIGESTS, "size": st.one_of(st.integers(-1, 2**64), JSON_LEAVES)},
    optional={"annotations": st.one_of(st.dictionaries(st.text(max_size=5),
                                                       st.text(max_size=5), max_size=2),
                                       JSON_VALUES),
              "platform": JSON_VALUES, "urls": JSON_VALUES}))
MANIFEST_DOCS = st.fixed_dictionaries(
    {"schemaVersion": st.one_of(st.just(2), JSON_LEAVES)},
    optional={"mediaType": MEDIA, "config": DESCRIPTOR, "annotations": JSON_VALUES,
              "layers": st.one_of(st.lists(DESCRIPTOR, max_size=3), JSON_VALUES),
              "manifests": st.one_of(st.lists(DESCRIPTOR, max_size=3), JSON_VALUES)})


@FUZZ
@given(doc=st.one_of(MANIFEST_DOCS, JSON_VALUES), declared=st.one_of(st.none(), MEDIA.filter(
    lambda m: isinstance(m, str))), raw=st.one_of(st.none(), st.binary(max_size=200), NESTING))
@example(doc={"schemaVersion": 2, "mediaType": ["x"]}, declared=None, raw=None)
@example(doc={}, declared=None, raw=b"[" * 100_000)
@example(doc={"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
              "config": {"mediaType": "c", "digest": sha(b""), "size": 0, "urls": 5},
              "layers": []}, declared=None, raw=None)
@example(doc={"schemaVersion": 2, "layers": [], "annotations": "ab"}, declared=None, raw=None)
def test_manifests_parse_into_valid_descriptors_or_raise_manifest_error(
        doc: object, declared: str | None, raw: bytes | None) -> None:
    data = raw if raw is not None else json.dumps(doc).encode()
    try:
        parsed = parse_manifest(data, declared)
    except ManifestError:
        return
    descriptors = (parsed.manifests if isinstance(parsed, Index)
                   else [parsed.config, *parsed.layers])
    for descriptor in descriptors:
        assert isinstance(descriptor.digest, str) and descriptor.digest.startswith("sha")
        assert isinstance(descriptor.size, int) and descriptor.size >= 0
        assert all(isinstance(u, str) for u in descriptor.urls)
    again = parse_manifest(parsed.to_bytes(), parsed.media_type)
    assert type(again) is type(parsed) and again.to_bytes() == parsed.to_bytes()
    assert isinstance(parsed, Manifest | Index)


# -- containerd filters ------------------------------------------------------------------------

FILTER_PIECES = st.sampled_from(["name", "labels", "kind", "parent", ".", ",", "==", "!=", "~=",
                                 '"', "/", "|", "\\", "\\x4", "\\u00e9", "(a*)*", "[", "]",
                                 "a", " ", "\0", "\ud800", "é", "[[:alpha:]]", "{9999999999}"])
FILTERS = st.one_of(st.text(max_size=40),
                    st.lists(FILTER_PIECES, max_size=14).map("".join))


@FUZZ
@given(texts=st.lists(FILTERS, max_size=3), name=st.text(max_size=8),
       labels=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2))
def test_filters_parse_and_match_or_raise_filter_error(texts: list[str], name: str,
                                                       labels: dict[str, str]) -> None:
    try:
        matcher = parse_filters(texts)
    except FilterError as exc:
        assert len(str(exc)) < 500  # long input is shortened in the message
        return
    assert isinstance(matcher.match(snapshot_fields(name, "", "committed", labels)), bool)


# -- hosts.toml ----------------------------------------------------------------------------------

TOML_VALUES = st.one_of(st.text(max_size=20), st.integers(), st.booleans(),
                        st.lists(st.one_of(st.text(max_size=10), st.integers()), max_size=3),
                        st.lists(st.lists(st.text(max_size=8), max_size=3), max_size=2),
                        st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
HOST_URLS = st.one_of(st.sampled_from(["https://m.io", "http://[::1", "m.io:99999999", "",
                                       "http://a b", "https://m.io/v2/../..", "x\0y"]),
                      st.text(max_size=20))
HOST_TABLE = st.one_of(TOML_VALUES, st.dictionaries(
    st.sampled_from(["capabilities", "ca", "client", "skip_verify", "header", "override_path",
                     "server"]), TOML_VALUES, max_size=4))
HOSTS_DOCS = st.one_of(
    st.dictionaries(st.sampled_from(["server", "ca", "client", "skip_verify", "header"]),
                    TOML_VALUES, max_size=3),
    st.fixed_dictionaries({"host": st.one_of(st.dictionaries(HOST_URLS, HOST_TABLE, max_size=3),
                                             TOML_VALUES)},
                          optional={"server": st.one_of(HOST_URLS, TOML_VALUES)}),
)


def toml_text(value: object) -> str:
    """A TOML value: JSON spells strings, numbers, booleans and arrays as TOML does."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_text(v) for v in value) + "]"
    return json.dumps(value)


@FUZZ
@given(doc=HOSTS_DOCS, garbage=st.one_of(st.none(), st.text(max_size=80)))
@example(doc={"host": {"https://m.io": 5}}, garbage=None)
@example(doc={"host": {"http://[::1": {}}}, garbage=None)
@example(doc={"header": {"x": {"y": "z"}}}, garbage=None)
def test_hosts_toml_gives_http_endpoints_or_hosts_config_error(doc: dict,
                                                               garbage: str | None) -> None:
    text = garbage if garbage is not None else \
        "\n".join(f"{json.dumps(k)} = {toml_text(v)}" for k, v in doc.items())
    with tempfile.TemporaryDirectory() as hosts_dir:
        (Path(hosts_dir) / "r.io").mkdir()
        (Path(hosts_dir) / "r.io" / "hosts.toml").write_text(text, errors="surrogatepass")
        try:
            endpoints = HostsConfig(hosts_dir).endpoints("r.io")
        except HostsConfigError:
            return
    assert endpoints
    for endpoint in endpoints:
        assert endpoint.scheme in ("http", "https") and endpoint.host
        assert not any(c.isspace() or not c.isprintable() for c in endpoint.host)


# -- the FUSE manager's line protocol -----------------------------------------------------------

MESSAGES = st.one_of(JSON_VALUES, st.fixed_dictionaries({}, optional={
    "id": JSON_VALUES, "op": JSON_VALUES, "args": JSON_VALUES, "result": JSON_VALUES,
    "error": st.one_of(JSON_VALUES, st.fixed_dictionaries(
        {}, optional={"kind": JSON_VALUES, "message": JSON_VALUES}))}))


@FUZZ
@given(message=MESSAGES, raw=st.one_of(st.none(), st.binary(max_size=100), NESTING))
@example(message={}, raw=b"[" * 100_000 + b"\n")
@example(message={"id": [1], "error": "boom"}, raw=None)
def test_protocol_lines_parse_or_raise_manager_error(message: object, raw: bytes | None) -> None:
    line = raw if raw is not None else json.dumps(message).encode() + b"\n"
    try:
        decoded = decode(line)
    except ManagerError as exc:
        assert exc.kind == INVALID
        return
    for parse in (request_of, answer_of):
        try:
            parsed = parse(decoded)
        except ManagerError as exc:
            assert exc.kind == INVALID
            continue
        encode({"id": parsed.id})  # whatever id came can be sent back


# -- source layers -------------------------------------------------------------------------------


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.size += len(data)
        return len(data)


COMPRESSED = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: zlib.compress(b, wbits=31)),
    st.binary(max_size=300).map(lambda b: zstandard.ZstdCompressor().compress(b)),
)


@FUZZ
@given(data=COMPRESSED, cut=st.integers(0, 400), flip=st.integers(0, 400))
def test_source_layers_decompress_or_raise_layer_format_error(data: bytes, cut: int,
                                                             flip: int) -> None:
    damaged = bytearray(data[:cut] if cut < len(data) else data)
    if damaged and flip < len(damaged):
        damaged[flip] ^= 0x40
    for unpack in (_gunzip, _unzstd):
        sink = _Sink()
        try:
            size = unpack(io.BytesIO(bytes(damaged)), sink, hashlib.sha256())  # type: ignore[arg-type]
        except LayerFormatError:
            continue
        assert size == sink.size

