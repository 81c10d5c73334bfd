"""`lazypull pull` into a real containerd 1.6, through lazypull's snapshotter and overlayfs.

One registry, one snapshotter service and one containerd (with the service as its
proxy snapshotter "lazypull") serve the whole module; tests keep apart by using their
own containerd namespaces. The images here are not converted, so lazypull's
snapshotter answers every Prepare with mounts and every layer takes the fallback:
downloaded, applied by containerd, committed. The lazy branch with a real containerd
is in test_lazy_pull.py; the client's remote branch is also checked against a
stand-in for containerd at the end.
"""

import asyncio
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from oci.reference import Reference
from oci.transport import registry_client
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.containerd_client import (
    AlreadyExists,
    ContainerdClient,
    LayerSource,
    PullProgress,
    pull,
)
from snapshotter.containerd_client import labels as lb

from .fixtures.containerd import start_containerd, stop_containerd
from .fixtures.snapshotter import SnapshotterProcess
from .images import (
    WHITEOUT,
    File,
    Symlink,
    build_layout_image,
    build_two_platform_image,
    push_layout_image,
)
from .test_snapshotter_containerd import proxy_config

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    {"bin/busybox": File(Path("/bin/busybox").read_bytes(), 0o755), "bin/sh": Symlink("busybox"),
     "etc/motd": b"layer one\n"},
    {"etc/hello": b"hello from layer two\n", "srv/data": os.urandom(150_000),
     "etc/gone": b"deleted above\n"},
    {"etc/motd": b"layer three\n", "etc/gone": WHITEOUT},
]
SCRIPT = "cat /etc/motd /etc/hello; test -e /etc/gone && echo present || echo gone; " \
         "wc -c < /srv/data"
EXPECTED = "layer three\nhello from layer two\ngone\n150000\n"
REMOTE_LABELS = {lb.SNAPSHOT_REF, lb.STARGZ_REFERENCE, lb.STARGZ_DIGEST, lb.STARGZ_LAYERS,
                 lb.CRI_IMAGE_REF, lb.CRI_LAYER_DIGEST, lb.CRI_MANIFEST_DIGEST,
                 lb.CRI_IMAGE_LAYERS}


class Stack:
    def __init__(self, service: SnapshotterProcess, daemon, registry, image, ref: str,
                 index_ref: str, docker_config: Path):
        self.service, self.daemon, self.registry = service, daemon, registry
        self.image, self.ref, self.index_ref = image, ref, index_ref
        self.docker_config = docker_config

    def lazypull(self, *args: str, namespace: str, address: str | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "cli.main", "pull", "--address",
                   address or self.daemon.address, "--namespace", namespace, *args]
        return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ,
                                                "DOCKER_CONFIG": str(self.docker_config),
                                                **(env or {})})

    def ctr(self, namespace: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.daemon.ctr(*args, namespace=namespace, check=check)

    def our_snapshots(self) -> list[pb.Info]:
        return [i for r in self.service.client().List(pb.ListSnapshotsRequest()) for i in r.info]


@pytest.fixture(scope="module")
def stack(registry, tmp_path_factory):
    base = tmp_path_factory.mktemp("sn")
    service = SnapshotterProcess(root=base / "root", address=str(base / "s.sock"),
                                 log_path=base / "service.log").start()
    daemon = start_containerd(tmp_path_factory.mktemp("ctrd"), proxy_config(service.address))
    try:
        layout = tmp_path_factory.mktemp("img") / "layout"
        image = build_layout_image(layout, "v1", LAYERS)
        ref = push_layout_image(layout, "v1", registry.host, "ws/app").removeprefix("docker://")
        build_two_platform_image(layout, "multi", LAYERS)
        index_ref = push_layout_image(layout, "multi", registry.host,
                                      "ws/multi").removeprefix("docker://")
        docker_config = tmp_path_factory.mktemp("dockercfg")  # no credentials: hermetic
        yield Stack(service, daemon, registry, image, ref, index_ref, docker_config)
    finally:
        stop_containerd(daemon)
        service.stop()


def content_labels(stack: Stack, namespace: str) -> dict[str, dict[str, str]]:
    """digest -> labels, from `ctr content ls` (DIGEST, SIZE, AGE, LABELS). ctr pads its
    columns with tabs, so a narrow cell is followed by more than one."""
    out = {}
    for row in stack.ctr(namespace, "content", "ls").stdout.splitlines()[1:]:
        digest, _size, _age, labels = ([*re.split(r"\t+", row.rstrip("\t")), ""])[:4]
        out[digest] = dict(item.split("=", 1) for item in labels.split(",") if "=" in item)
    return out


def leases(stack: Stack, namespace: str) -> list[str]:
    return stack.ctr(namespace, "leases", "ls", "-q").stdout.split()


def images(stack: Stack, namespace: str) -> dict[str, str]:
    """name -> target digest, from `ctr images ls`."""
    rows = stack.ctr(namespace, "images", "ls").stdout.splitlines()[1:]
    return {row.split()[0]: row.split()[2] for row in rows}


def collect_garbage(stack: Stack, namespace: str) -> None:
    """Run containerd's garbage collector now (deleting a lease with --sync waits for it)."""
    lease = stack.ctr(namespace, "leases", "create").stdout.split()[0]
    stack.ctr(namespace, "leases", "delete", "--sync", lease)


def run_in(stack: Stack, namespace: str, snapshotter: str, ref: str, name: str) -> str:
    done = stack.ctr(namespace, "run", "--rm", "--snapshotter", snapshotter, ref, name,
                     "/bin/sh", "-c", SCRIPT)
    return done.stdout


def chain_ids(stack: Stack) -> list[str]:
    return lb.chain_ids(stack.image.config["rootfs"]["diff_ids"])


# -- the fallback through lazypull's snapshotter -------------------------------------------


def test_pull_through_lazypull_falls_back_and_runs(stack: Stack) -> None:
    ns = "lazy"
    pulled = stack.lazypull("--plain-http", "--snapshotter", "lazypull", stack.ref,
                            namespace=ns)
    assert pulled.returncode == 0, pulled.stderr
    layer_lines = [line for line in pulled.stdout.splitlines() if line.startswith("  layer ")]
    assert len(layer_lines) == 3 and all("  fetched+applied  " in line for line in layer_lines)
    assert "remote" not in pulled.stdout
    assert f"{stack.ref}: image created, unpacked for lazypull (3 fetched+applied)" in \
        pulled.stdout

    assert images(stack, ns) == {stack.ref: stack.image.manifest_digest}
    assert leases(stack, ns) == []
    collect_garbage(stack, ns)  # the image record's references alone keep what it needs
    assert run_in(stack, ns, "lazypull", stack.ref, "lazy-1") == EXPECTED

    # Fallback: every layer blob is in containerd's content store, with containerd's labels.
    content = content_labels(stack, ns)
    diff_ids = stack.image.config["rootfs"]["diff_ids"]
    source = {"containerd.io/distribution.source.127.0.0.1": "ws/app"}
    for digest, diff_id in zip(stack.image.layer_digests, diff_ids, strict=True):
        assert content[digest] == {lb.UNCOMPRESSED: diff_id, **source}
    manifest = content[stack.image.manifest_digest]
    config_digest = stack.image.manifest["config"]["digest"]
    assert manifest == {lb.GC_CONFIG: config_digest, **source,
                        **{f"containerd.io/gc.ref.content.l.{i}": d
                           for i, d in enumerate(stack.image.layer_digests)}}
    assert content[config_digest] == {"containerd.io/gc.ref.snapshot.lazypull":
                                      chain_ids(stack)[-1], **source}

    # The chain, as containerd committed it in our service (keys namespaced and sequenced).
    committed = {i.name.split("/")[-1]: i for i in stack.our_snapshots()
                 if i.kind == pb.COMMITTED}
    assert set(chain_ids(stack)) <= set(committed)
    for index, chain_id in enumerate(chain_ids(stack)):
        labels = dict(committed[chain_id].labels)
        # Everything we sent with Commit is containerd.io/snapshot*: containerd forwarded all.
        assert set(labels) == REMOTE_LABELS
        assert labels[lb.SNAPSHOT_REF] == chain_id
        assert labels[lb.STARGZ_REFERENCE] == labels[lb.CRI_IMAGE_REF] == stack.ref
        assert labels[lb.STARGZ_DIGEST] == labels[lb.CRI_LAYER_DIGEST] == \
            stack.image.layer_digests[index]
        assert labels[lb.CRI_MANIFEST_DIGEST] == stack.image.manifest_digest
        above = ",".join(stack.image.layer_digests[index:])
        assert labels[lb.STARGZ_LAYERS] == labels[lb.CRI_IMAGE_LAYERS] == above

    # Pulling again changes nothing: every layer is already there.
    def committed_names() -> list[str]:
        return sorted(i.name for i in stack.our_snapshots() if i.kind == pb.COMMITTED)

    before = committed_names()
    again = stack.lazypull("--plain-http", "--snapshotter", "lazypull", stack.ref, "--json",
                           namespace=ns)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert [layer["source"] for layer in result["layers"]] == ["present"] * 3
    assert result["image_created"] is False
    assert result["chain_id"] == chain_ids(stack)[-1]
    assert committed_names() == before
    assert images(stack, ns) == {stack.ref: stack.image.manifest_digest}
    assert leases(stack, ns) == []
    assert content_labels(stack, ns) == content
    assert run_in(stack, ns, "lazypull", stack.ref, "lazy-2") == EXPECTED


def test_pull_with_containerds_overlayfs(stack: Stack) -> None:
    ns = "native"
    pulled = stack.lazypull("--plain-http", "--snapshotter", "overlayfs", stack.ref,
                            namespace=ns)
    assert pulled.returncode == 0, pulled.stderr
    assert "(3 fetched+applied)" in pulled.stdout
    assert images(stack, ns) == {stack.ref: stack.image.manifest_digest}
    assert leases(stack, ns) == []
    assert set(stack.image.layer_digests) <= set(content_labels(stack, ns))
    assert run_in(stack, ns, "overlayfs", stack.ref, "native-1") == EXPECTED
    # containerd's own metadata keeps the Commit labels under the chain IDs.
    top = chain_ids(stack)[-1]
    info = json.loads(stack.ctr(ns, "snapshots", "--snapshotter", "overlayfs", "info",
                                top).stdout)
    assert info["Labels"][lb.SNAPSHOT_REF] == top
    assert info["Labels"][lb.STARGZ_REFERENCE] == stack.ref
    again = stack.lazypull("--plain-http", "--snapshotter", "overlayfs", stack.ref, "-q",
                           namespace=ns)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert leases(stack, ns) == []


def test_pull_an_index_picks_the_platform(stack: Stack) -> None:
    ns = "multi"
    pulled = stack.lazypull("--plain-http", "--platform", "linux/amd64", "--json",
                            stack.index_ref, namespace=ns)
    assert pulled.returncode == 0, pulled.stderr
    result = json.loads(pulled.stdout)
    index_digest = result["target"]["digest"]
    assert result["target"]["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert images(stack, ns) == {stack.index_ref: index_digest}
    content = content_labels(stack, ns)
    manifests = {k: v for k, v in content[index_digest].items()
                 if k.startswith(lb.GC_MANIFEST_PREFIX)}
    assert len(manifests) == 2 and result["manifest"] in manifests.values()
    assert run_in(stack, ns, "lazypull", stack.index_ref, "multi-1") == EXPECTED

    missing = stack.lazypull("--plain-http", "--platform", "linux/s390x", stack.index_ref,
                             namespace="multi-none")
    assert missing.returncode == 4
    assert "no manifest for platform linux/s390x (it has: linux/amd64, linux/arm64)" in \
        missing.stderr
    assert "Traceback" not in missing.stderr


# -- what containerd does with the labels --------------------------------------------------


class Spy(PullProgress):
    """At each Prepare that answered with mounts, read the active snapshot's labels from
    our service (before containerd applies the layer)."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.sent: dict[int, dict[str, str]] = {}
        self.seen: dict[int, dict[str, str]] = {}
        self.keys: dict[int, str] = {}

    def prepared(self, index, key, labels, remote) -> None:
        assert not remote
        self.sent[index], self.keys[index] = dict(labels), key
        active = [i for i in self.stack.our_snapshots()
                  if i.kind == pb.ACTIVE and i.name.endswith("/" + key)]
        assert len(active) == 1, [i.name for i in self.stack.our_snapshots()]
        self.seen[index] = dict(active[0].labels)


def test_labels_containerd_forwards_to_the_snapshotter(stack: Stack) -> None:
    ns = "labels"
    spy = Spy(stack)

    async def main() -> None:
        async with ContainerdClient(stack.daemon.address, ns) as containerd, \
                registry_client(plain_http=True) as registry:
            result = await pull(containerd, registry, stack.ref, progress=spy)
            assert [layer.source for layer in result.layers] == [LayerSource.FETCHED] * 3

            # containerd keeps any label in its own database but passes on to the
            # snapshotter only containerd.io/snapshot.ref and containerd.io/snapshot/*.
            labels = {lb.SNAPSHOT_REF: "probe-target", "containerd.io/snapshot/x": "kept",
                      "example.com/private": "not forwarded", "containerd.io/other": "no"}
            async with containerd.lease():
                await containerd.prepare_snapshot("lazypull", "probe", "", labels)
                mine = json.loads(stack.ctr(ns, "snapshots", "--snapshotter", "lazypull",
                                            "info", "probe").stdout)["Labels"]
                theirs = [dict(i.labels) for i in stack.our_snapshots()
                          if i.name.endswith("/probe")]
                await containerd.remove_snapshot("lazypull", "probe")
            assert mine == labels
            assert theirs == [{lb.SNAPSHOT_REF: "probe-target",
                               "containerd.io/snapshot/x": "kept"}]

    asyncio.run(main())
    assert sorted(spy.seen) == [0, 1, 2]
    for index, chain_id in enumerate(chain_ids(stack)):
        # Prepare's key is containerd's unpack key; every label we sent arrived.
        assert spy.keys[index].startswith("extract-")
        assert spy.keys[index].endswith(" " + chain_id)
        assert spy.seen[index] == spy.sent[index]
        assert set(spy.seen[index]) == REMOTE_LABELS
    assert leases(stack, ns) == []


# -- errors ---------------------------------------------------------------------------------


def test_missing_image_is_a_clear_error(stack: Stack) -> None:
    ns = "missing"
    ref = f"{stack.registry.host}/ws/app:no-such-tag"
    done = stack.lazypull("--plain-http", ref, namespace=ns)
    assert done.returncode == 4
    assert done.stderr.startswith("lazypull pull: not found: manifest ")
    assert "Traceback" not in done.stderr
    assert images(stack, ns) == {}
    assert leases(stack, ns) == []

    bad = stack.lazypull("--plain-http", "Not A Reference", namespace=ns)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_auth_error(stack: Stack, basic_auth_registry) -> None:
    done = stack.lazypull("--plain-http", f"{basic_auth_registry.host}/ws/app:v1",
                          namespace="auth")
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("lazypull pull: authentication failed:")
    assert "Traceback" not in done.stderr


def test_unknown_snapshotter(stack: Stack) -> None:
    done = stack.lazypull("--plain-http", "--snapshotter", "nosuch", stack.ref,
                          namespace="nosuch")
    assert done.returncode == 5
    assert "containerd has no snapshotter 'nosuch'" in done.stderr
    assert "Traceback" not in done.stderr
    assert leases(stack, "nosuch") == []


def test_bad_socket_paths(stack: Stack, tmp_path) -> None:
    missing = stack.lazypull(stack.ref, namespace="x", address=str(tmp_path / "absent.sock"))
    assert missing.returncode == 6
    assert missing.stderr == (f"lazypull pull: cannot reach containerd: no socket at "
                              f"{tmp_path / 'absent.sock'} (is containerd running? see "
                              "--address)\n")

    regular = tmp_path / "file"
    regular.write_text("")
    done = stack.lazypull(stack.ref, namespace="x", address=str(regular))
    assert done.returncode == 6 and "is not a unix socket" in done.stderr

    # A socket nobody listens on: refused at once, not after a timeout.
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))
        done = stack.lazypull(stack.ref, namespace="x", address=str(dead))
    assert done.returncode == 6, done.stderr
    assert done.stderr == f"lazypull pull: cannot reach containerd at {dead}: Connection refused\n"
    assert "Traceback" not in done.stderr


# -- the remote branch and the label helpers, without containerd ----------------------------


class FakeContainerd:
    """Answers the calls a pull makes; the snapshotter 'mounts' the layers in `remote`."""

    def __init__(self, remote: set[str], diff_ids: dict[str, str]):
        self.remote, self.diff_ids = remote, diff_ids
        self.snapshots: dict[str, dict[str, str]] = {}
        self.content: dict[str, dict[str, str]] = {}
        self.calls: list[tuple[str, str]] = []
        self.images: dict[str, str] = {}

    @asynccontextmanager
    async def lease(self):
        self.calls.append(("lease", ""))
        yield "l"
        self.calls.append(("lease-deleted", ""))

    async def stat_snapshot(self, snapshotter, key):
        return self.snapshots.get(key)

    async def prepare_snapshot(self, snapshotter, key, parent, labels):
        self.calls.append(("prepare", key))
        chain_id = labels[lb.SNAPSHOT_REF]
        if labels[lb.STARGZ_DIGEST] in self.remote:
            self.snapshots[chain_id] = dict(labels)  # what a remote snapshotter commits
            raise AlreadyExists(f"target snapshot {chain_id!r}: already exists")
        self.snapshots[key] = dict(labels)
        return ["mount"]

    async def commit_snapshot(self, snapshotter, name, key, labels):
        self.calls.append(("commit", name))
        self.snapshots[name] = dict(labels)
        del self.snapshots[key]

    async def remove_snapshot(self, snapshotter, key):
        self.snapshots.pop(key, None)

    async def write_content(self, ref, digest, size, data, labels):
        if digest in self.content:
            return False
        body = b"".join([c async for c in data] if hasattr(data, "__aiter__") else data)
        assert len(body) == size and "sha256:" + hashlib.sha256(body).hexdigest() == digest
        self.calls.append(("write", ref))
        self.content[digest] = dict(labels)
        return True

    async def content_info(self, digest):
        return None

    async def update_content_labels(self, digest, labels):
        self.content.setdefault(digest, {}).update(labels)

    async def apply(self, layer, mounts):
        self.calls.append(("apply", layer.digest))
        return type(layer)("tar", self.diff_ids[layer.digest], 0)

    async def create_or_update_image(self, name, target):
        created = name not in self.images
        self.images[name] = target.digest
        return None, created


def test_remote_layers_are_neither_downloaded_nor_applied(stack: Stack) -> None:
    first, second, third = stack.image.layer_digests
    diff_ids = dict(zip(stack.image.layer_digests, stack.image.config["rootfs"]["diff_ids"],
                        strict=True))
    fake = FakeContainerd({first, third}, diff_ids)

    async def main():
        async with registry_client(plain_http=True) as registry:
            return await pull(fake, registry, stack.ref, snapshotter="lazypull")  # type: ignore[arg-type]

    result = asyncio.run(main())
    assert [layer.source for layer in result.layers] == \
        [LayerSource.REMOTE, LayerSource.FETCHED, LayerSource.REMOTE]
    writes = [ref for call, ref in fake.calls if call == "write"]
    assert f"layer-{second}" in writes
    assert not any(ref in (f"layer-{first}", f"layer-{third}") for ref in writes)
    assert [d for call, d in fake.calls if call == "apply"] == [second]
    chains = chain_ids(stack)
    assert [name for call, name in fake.calls if call == "commit"] == [chains[1]]
    assert all(chain in fake.snapshots for chain in chains)
    assert not [key for key in fake.snapshots if key.startswith("extract-")]
    assert fake.calls[0] == ("lease", "") and fake.calls[-1] == ("lease-deleted", "")
    config = stack.image.manifest["config"]["digest"]
    assert fake.content[config]["containerd.io/gc.ref.snapshot.lazypull"] == chains[-1]
    assert fake.images == {stack.ref: stack.image.manifest_digest}


def test_chain_ids_and_names() -> None:
    a, b, c = ("sha256:" + ch * 64 for ch in "abc")
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    assert lb.chain_ids([a, b, c]) == [a, ab, abc]
    assert lb.chain_ids([]) == []

    assert lb.image_name(Reference.parse("busybox")) == "docker.io/library/busybox:latest"
    assert lb.image_name(Reference.parse("127.0.0.1:5000/ws/app:v1")) == \
        "127.0.0.1:5000/ws/app:v1"
    assert lb.image_name(Reference.parse(f"quay.io/x/y:tag@{a}")) == f"quay.io/x/y@{a}"
    assert lb.distribution_source_key("127.0.0.1:5000") == \
        "containerd.io/distribution.source.127.0.0.1"
    assert lb.distribution_source_key("[::1]:5000").endswith(".source.::1")
    assert lb.merge_distribution_source("b/c,a", "b/c") == "a,b/c"


def test_layer_lists_are_truncated_to_the_label_limit() -> None:
    digests = [f"sha256:{i:064x}" for i in range(100)]
    for key, stargz in ((lb.CRI_IMAGE_LAYERS, False), (lb.STARGZ_LAYERS, True)):
        value = lb.layers_label(key, digests, stargz=stargz)
        assert len(key) + len(value) <= lb.MAX_LABEL_SIZE
        kept = value.split(",")
        assert kept == digests[:len(kept)]
        # one more digest would not have fit (as each project checks it)
        extra = "," + digests[len(kept)] + ("," if stargz else "")
        assert len(key) + len(value) + len(extra) > lb.MAX_LABEL_SIZE
    assert lb.layers_label(lb.CRI_IMAGE_LAYERS, digests[:3]) == ",".join(digests[:3])


# -- handed to the service ---------------------------------------------------------------


def handoff(stack: Stack) -> tuple[str, str]:
    return "--service-socket", str(Path(stack.service.address).parent / "pull.sock")


def test_the_service_takes_the_pull_and_the_command_loads_little(stack: Stack) -> None:
    ns = "handoff"
    done = stack.lazypull(*handoff(stack), "--plain-http", stack.ref, namespace=ns,
                          env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, done.stderr
    layer_lines = [line for line in done.stdout.splitlines() if line.startswith("  layer ")]
    assert len(layer_lines) == 3 and all("  fetched+applied  " in line for line in layer_lines)
    assert f"{stack.ref}: image created, unpacked for lazypull (3 fetched+applied)" in \
        done.stdout
    assert f"pull of {stack.ref} into {stack.daemon.address}" in stack.service.log
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "snapshotter.pull_protocol" in imported
    assert not {"asyncio", "httpx", "grpclib", "google.protobuf"} & imported
    assert images(stack, ns) == {stack.ref: stack.image.manifest_digest}
    assert leases(stack, ns) == []
    assert run_in(stack, ns, "lazypull", stack.ref, "handoff-1") == EXPECTED

    again = stack.lazypull(*handoff(stack), "--plain-http", "--json", stack.ref, namespace=ns)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert [layer["source"] for layer in result["layers"]] == ["present"] * 3
    assert result["image_created"] is False


def test_failures_handed_back_keep_their_exit_codes(stack: Stack, basic_auth_registry) -> None:
    cases = [(["--plain-http", f"{stack.registry.host}/ws/app:no-such-tag"], 4,
              "lazypull pull: not found: manifest "),
             (["--plain-http", "Not A Reference"], 2, "lazypull pull: "),
             (["--plain-http", "--platform", "linux", stack.ref], 2,
              "lazypull pull: invalid platform"),
             (["--plain-http", f"{basic_auth_registry.host}/ws/app:v1"], 3,
              "lazypull pull: authentication failed:"),
             (["--plain-http", "--snapshotter", "nosuch", stack.ref], 5,
              "lazypull pull: containerd has no snapshotter 'nosuch'")]
    for args, code, start in cases:
        done = stack.lazypull(*handoff(stack), *args, namespace="handoff-failures")
        assert (done.returncode, done.stderr.startswith(start)) == (code, True), done.stderr
        assert "Traceback" not in done.stderr
    unreachable = stack.lazypull(*handoff(stack), stack.ref, namespace="x",
                                 address="/nonexistent/containerd.sock")
    assert unreachable.returncode == 6, unreachable.stderr
    assert leases(stack, "handoff-failures") == []
