"""Hostile images end to end: a registry, the snapshotter service with its FUSE
manager, and a private containerd that uses the service for `lazypull pull`.

Each image holds one hostile eStargz layer, written by hand so that its tar stream
and its TOC (which its TOC digest annotation vouches for) both carry the attack. The
layer must be refused for lazy serving with a log line that says why, the image
must then be pulled the ordinary way (containerd unpacks the tar itself) or fail
with a clear error, the service must go on answering, and nothing may appear
outside the snapshot directories.
"""

import asyncio
import gzip
import hashlib
import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from estargz import TOC_DIGEST_ANNOTATION, BlobReader, BuildOptions, FileSource, build
from estargz.codec import gzip_member
from estargz.footer import gzip_footer
from oci import mediatypes as mt
from oci.manifest import Descriptor
from oci.reference import Reference
from oci.registry import RegistryClient

from .fixtures.containerd import start_containerd, stop_containerd
from .fixtures.fault_proxy import WireFault
from .test_snapshotter_containerd import proxy_config

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_TOC_BYTES = 8 << 20  # the node's cap in these tests: a 64 MiB TOC is over it
MARKER = f"ESCAPED-{secrets.token_hex(4)}"  # names no file outside a snapshot may have
TOC_NAME = "stargz.index.json"
_KINDS = {tarfile.REGTYPE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
          tarfile.LNKTYPE: "hardlink"}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
           link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_700_000_000
    return info, data


@dataclass(frozen=True)
class Layer:
    blob: bytes
    toc_digest: str
    diff_id: str


def handmade_layer(members: list[tuple[tarfile.TarInfo, bytes]],
                   toc_size: int | None = None) -> Layer:
    """An eStargz blob whose tar stream and TOC both say what `members` say, as the
    writer would put them, but without the writer's checks. `toc_size`: pad the TOC
    JSON with blanks to this many bytes (a TOC that decompresses to a lot)."""
    payload, entries, pending = bytearray(), [], b""
    for info, data in members:
        pending += info.tobuf(tarfile.PAX_FORMAT)
        entry: dict[str, object] = {"name": info.name, "type": _KINDS[info.type],
                                    "mode": info.mode}
        if info.linkname:
            entry["linkName"] = info.linkname
        if data:
            payload += gzip_member(pending, 6)
            entry.update(size=len(data), offset=len(payload), digest=sha(data),
                         chunkDigest=sha(data))
            pending = data + b"\0" * (-len(data) % 512)
        entries.append(entry)
    if pending:
        payload += gzip_member(pending, 6)
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    toc += b" " * max(0, (toc_size or 0) - len(toc))
    header = tarfile.TarInfo(TOC_NAME)
    header.size, header.mode = len(toc), 0o644
    toc_member = header.tobuf(tarfile.USTAR_FORMAT) + toc + b"\0" * (-len(toc) % 512 + 1024)
    blob = bytes(payload) + gzip_member(toc_member, 9) + gzip_footer(len(payload))
    return Layer(blob, sha(toc), sha(gzip.decompress(blob)))


def written_layer(members: list[tuple[tarfile.TarInfo, bytes]]) -> Layer:
    """The same, written by the project's writer (so only valid layers)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    result = build(io.BytesIO(raw.getvalue()), out, BuildOptions())
    return Layer(out.getvalue(), result.toc_digest, result.diff_id)


def push(registry_host: str, repository: str, layer: Layer, tmp: Path) -> str:
    """Push a one-layer image (tag v1); returns its reference without a scheme."""
    reference = Reference.parse(f"{registry_host}/{repository}:v1")
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}).encode()
    blobs = [(Descriptor(mt.OCI_CONFIG, sha(config), len(config)), config),
             (Descriptor(mt.OCI_LAYER_GZIP, sha(layer.blob), len(layer.blob),
                         annotations={TOC_DIGEST_ANNOTATION: layer.toc_digest}), layer.blob)]
    manifest = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                           "config": blobs[0][0].to_json(),
                           "layers": [blobs[1][0].to_json()]}).encode()

    async def go() -> None:
        async with RegistryClient(trust_env=False) as client:
            for descriptor, data in blobs:
                path = tmp / descriptor.digest.replace(":", "-")
                path.write_bytes(data)
                await client.push_blob(reference, descriptor, str(path))
            await client.put_manifest(reference, manifest, mt.OCI_MANIFEST, "v1")

    asyncio.run(go())
    return f"{registry_host}/{repository}:v1"


@pytest.fixture
def node(snapshotter_factory, registry, fault_proxy_factory, tmp_path_factory):
    proxy = fault_proxy_factory(registry.host)
    config = tmp_path_factory.mktemp("cfg") / "config.toml"
    config.write_text(f"background_fetch = false\nmax_toc_bytes = {MAX_TOC_BYTES}\n"
                      f'hosts_dir = "{tmp_path_factory.mktemp("hosts")}"\n')
    service = snapshotter_factory(None, False, None, "--config", str(config))
    daemon = start_containerd(tmp_path_factory.mktemp("ctrd"), proxy_config(service.address))
    yield {"service": service, "daemon": daemon, "proxy": proxy}
    stop_containerd(daemon)


def lazypull_pull(node, reference: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", "pull", reference, "--address",
                           node["daemon"].address, "--json"], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)


def markers_outside_snapshots(base: Path, *roots: Path) -> list[str]:
    """Files named MARKER anywhere under `base` but inside no snapshot directory (nor
    a mount), and in every directory above `base` and the roots, where names that
    climb out of a layer would land."""
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d != "snapshots"
                       and not os.path.ismount(os.path.join(dirpath, d))]
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if MARKER in n]
    for root in (base, *roots):
        for above in Path(root).resolve().parents:
            found += [str(above / n) for n in os.listdir(above) if MARKER in n]
    return found


def markers_in_snapshots(node) -> list[Path]:
    roots = [node["service"].root / "snapshots", node["daemon"].root]
    return [p for root in roots for p in root.rglob(f"*{MARKER}*")]


def served_lazily(node, registry, tmp: Path) -> bool:
    """Whether the service still mounts a valid layer lazily (it kept answering)."""
    unique = secrets.token_bytes(16)  # a layer no earlier pull has unpacked
    layer = written_layer([member("etc", tarfile.DIRTYPE), member("etc/ok", data=unique)])
    reference = push(registry.host, f"hostile/fine-{unique[:3].hex()}", layer, tmp)
    done = lazypull_pull(node, reference)
    assert done.returncode == 0, done.stderr
    return [layer["source"] for layer in json.loads(done.stdout)["layers"]] == ["remote"]


@dataclass(frozen=True)
class Case:
    layer: Layer
    refusal: str  # what the service's log line says of the layer
    falls_back: bool  # pulled the ordinary way, else the pull fails with `error`
    error: str = ""


def cases(outside: Path) -> dict[str, Case]:
    ok = member("etc/ok", data=b"ok\n")
    return {
        "names-out-of-the-layer": Case(handmade_layer([
            member("etc", tarfile.DIRTYPE), ok,
            member(f"../../../{MARKER}-dotdot", data=b"x"),
            member(f"/{MARKER}-absolute", data=b"x")]),
            "contains a '..' component", falls_back=True),
        "symlinked-parent": Case(handmade_layer([
            member("a", tarfile.SYMTYPE, link=str(outside)),
            member(f"a/{MARKER}-through-symlink", data=b"x"), ok]),
            "parent 'a' is not a directory", falls_back=True),
        "hard-link-to-a-later-entry": Case(handmade_layer([
            member("early", tarfile.LNKTYPE, link="late"), member("late", data=b"x")]),
            "hard link target 'late' is not an earlier entry", falls_back=False,
            error="late"),
        "toc-of-64-mib": Case(handmade_layer([member("etc", tarfile.DIRTYPE), ok],
                                             toc_size=64 << 20),
                              f"exceeds the limit of {MAX_TOC_BYTES}", falls_back=True),
    }


@pytest.mark.parametrize("name", ["names-out-of-the-layer", "symlinked-parent",
                                  "hard-link-to-a-later-entry", "toc-of-64-mib"])
def test_hostile_layer_is_refused_and_contained(node, registry, tmp_path, name: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    case = cases(outside)[name]
    layer_digest = sha(case.layer.blob)
    reference = push(registry.host, f"hostile/{name}", case.layer, tmp_path)
    manager = node["service"].fuse_manager_pid
    done = lazypull_pull(node, reference)
    log = node["service"].log
    refusal = next(line for line in log.splitlines()
                   if f"unpacking {layer_digest} the ordinary way" in line)
    assert case.refusal in refusal, refusal
    if case.falls_back:
        assert done.returncode == 0, done.stderr
        assert [layer["source"] for layer in json.loads(done.stdout)["layers"]] == \
            ["fetched+applied"]
    else:
        assert done.returncode != 0 and case.error in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert list(outside.iterdir()) == []
    base = tmp_path.parent.parent  # the session's temp root: registry, service, containerd
    assert markers_outside_snapshots(base, node["service"].root, node["daemon"].root) == []
    if name != "toc-of-64-mib" and case.falls_back:
        assert markers_in_snapshots(node)  # containerd unpacked them, inside its snapshot
    assert node["service"].process.poll() is None
    assert node["service"].fuse_manager_pid == manager  # neither process fell over
    assert served_lazily(node, registry, tmp_path)


def test_the_handmade_layers_are_valid_when_not_hostile(tmp_path) -> None:
    """So that a refusal above is the attack's, not the test's way of writing layers."""
    layer = handmade_layer([member("etc", tarfile.DIRTYPE), member("etc/ok", data=b"ok\n"),
                            member("etc/link", tarfile.LNKTYPE, link="etc/ok")])
    reader = BlobReader.open(FileSource(io.BytesIO(layer.blob)), layer.toc_digest)
    assert reader.read_file(reader.lookup("etc/link")) == b"ok\n"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.blob))) as tar:
        assert tar.getnames() == ["etc", "etc/ok", "etc/link", TOC_NAME]


def test_a_manifest_that_lies_about_its_digest_is_not_served_lazily(node, registry,
                                                                      tmp_path) -> None:
    """The FUSE manager fetches the image's manifest again by digest; a registry that
    answers with another document (here an index naming that very digest) is not
    believed, and the layer is pulled the ordinary way."""
    layer = written_layer([member("etc", tarfile.DIRTYPE), member("etc/ok", data=b"ok\n")])
    reference = push(registry.host, "hostile/lying-manifest", layer, tmp_path)
    proxy = node["proxy"]
    manifest_digest = sha(asyncio.run(_manifest_bytes(reference)))
    self_index = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
        {"mediaType": mt.OCI_INDEX, "digest": manifest_digest, "size": 300}]}).encode()
    proxy.add(WireFault("answer", "GET", f"/manifests/{manifest_digest}", status=200,
                        body=self_index, headers={"Content-Type": mt.OCI_INDEX}))
    done = lazypull_pull(node, reference.replace(registry.host, proxy.host))
    assert done.returncode == 0, done.stderr
    assert [layer["source"] for layer in json.loads(done.stdout)["layers"]] == \
        ["fetched+applied"]
    assert "cannot read the manifest" in node["service"].log
    assert served_lazily(node, registry, tmp_path)


@pytest.mark.parametrize(("body", "error"), [
    (b"[" * 1_000_000, "not JSON"),
    (json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "layers": [],
                 "config": {"mediaType": mt.OCI_CONFIG, "digest": "sha256:00", "size": 2}}
                ).encode(), "invalid digest"),
    (json.dumps({"schemaVersion": 2, "mediaType": ["a"], "layers": []}).encode(),
     "is not a string"),
])
def test_a_malformed_manifest_fails_the_pull_clearly(node, registry, body: bytes,
                                                     error: str) -> None:
    proxy = node["proxy"]
    proxy.add(WireFault("answer", "GET", "/manifests/v1", status=200, body=body,
                        headers={"Content-Type": mt.OCI_MANIFEST}))
    done = lazypull_pull(node, f"{proxy.host}/hostile/malformed:v1")
    assert done.returncode != 0
    assert error in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert node["service"].process.poll() is None


async def _manifest_bytes(reference: str) -> bytes:
    async with RegistryClient(trust_env=False) as client:
        data, _, _ = await client.get_manifest(Reference.parse(reference))
        return data
