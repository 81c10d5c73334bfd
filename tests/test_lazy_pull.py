"""Lazy pulling end to end: converted images start from FUSE-mounted layers.

A registry (behind a recording proxy, so bytes are counted at the registry side),
our snapshotter service (background fetch off, so only what is read is fetched)
and a private containerd with the service as proxy snapshotter "lazypull".
"""

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from snapshotter.fusemanager.protocol import RELAY_MAX_BLOB

from .fixtures.containerd import unmount_below
from .images import File, Symlink
from .lazy_node import convert_pushed, lazy_node_fixture, pull  # noqa: F401  (the `node` fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
BIG = 24 << 20
LAYERS = [
    {"bin/busybox": File(Path("/bin/busybox").read_bytes(), 0o755), "bin/sh": Symlink("busybox"),
     "etc/motd": b"base\n", "opt/tools/readme": b"tools\n"},
    {"etc/hello": b"hello lazily\n", "data/big.bin": os.urandom(BIG),
     "data/other.bin": os.urandom(BIG // 2), "data/small/a.txt": b"a" * 100,
     "data/small/b.txt": b"b" * 200, "data/link": Symlink("small/a.txt")},
    {"app/run.sh": File(b"#!/bin/sh\ncat /etc/hello\nhead -c 16 /data/big.bin | wc -c\n",
                        0o755), "opt/tools/readme": None},
]
HOT = "/app/run.sh\n/etc/hello\n/bin/busybox\n"


def layer_digests(images) -> set[str]:
    return {layer["digest"] for layer in images["report"]["manifests"][0]["layers"]}


def blob_bytes(proxy, digests: set[str]) -> int:
    """Bytes of these layer blobs the registry served (ranges, or whole blobs)."""
    total = 0
    for request in proxy.requests("GET", r"/blobs/sha256:"):
        if request.path.rsplit("/", 1)[-1].split("?")[0] not in digests:
            continue
        match = re.match(r"bytes=(\d+)-(\d+)", request.headers.get("Range", "")
                         or request.headers.get("range", ""))
        if match:
            total += int(match.group(2)) - int(match.group(1)) + 1
        else:
            total += 1 << 40  # a whole-blob download: never expected on the lazy path
    return total


def metric_values(service) -> dict[str, float]:
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics",
                                  timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values




@pytest.fixture(scope="module")
def images(registry, tmp_path_factory):
    image, report = convert_pushed(registry, tmp_path_factory.mktemp("img"), LAYERS, "ws/lazy",
                                   hot=HOT, cmd=["/app/run.sh"])
    return {"plain": "ws/lazy:v1", "lazy": "ws/lazy:v1-esgz", "image": image, "report": report}


def test_converted_image_starts_lazily(node, images) -> None:
    daemon, proxy = node["daemon"], node["proxy"]
    result = pull(node, images["lazy"])
    assert [layer["source"] for layer in result["layers"]] == ["remote"] * 3
    content = daemon.ctr("content", "ls", "-q").stdout.split()
    assert not {layer["digest"] for layer in images["report"]["manifests"][0]["layers"]} & \
        set(content)  # layer blobs never entered containerd's content store
    ref = f"{proxy.host}/{images['lazy']}"
    run = daemon.ctr("run", "--rm", "--snapshotter", "lazypull", ref, "lazy1", "/app/run.sh")
    assert run.stdout == "hello lazily\n16\n"
    image_size = sum(layer["size"] for layer in images["report"]["manifests"][0]["layers"])
    served = blob_bytes(proxy, layer_digests(images))
    assert served < image_size / 4, (served, image_size)
    metrics = metric_values(node["service"])
    assert metrics["lazypull_lazy_layers_mounted"] == 3
    assert metrics['lazypull_fetch_bytes_total{kind="prefetch"}'] > 0
    assert metrics['lazypull_fetch_bytes_total{kind="demand"}'] > 0
    assert metrics['lazypull_fuse_operation_duration_seconds_count{operation="read"}'] > 0
    assert metrics['lazypull_chunk_cache_bytes'] > 0


def test_unconverted_image_falls_back_and_runs(node, images) -> None:
    result = pull(node, images["plain"])
    assert [layer["source"] for layer in result["layers"]] == ["fetched+applied"] * 3
    ref = f"{node['proxy'].host}/{images['plain']}"
    run = node["daemon"].ctr("run", "--rm", "--snapshotter", "lazypull", ref, "plain1",
                             "/app/run.sh")
    assert run.stdout == "hello lazily\n16\n"


def test_a_pull_handed_to_the_service_reads_the_registry_through_the_manager(
        node, images) -> None:
    """The service loads no registry client of its own for a lazy pull: manifests and
    the config come through the FUSE manager. Layers downloaded whole (an unconverted
    image) are the service's to stream, with its own client, but for small ones."""
    service = node["service"]
    handoff = ("--service-socket", str(Path(service.address).parent / "pull.sock"))
    own_client = "with the service's own registry client"
    lazy = pull(node, images["lazy"], *handoff)
    assert [layer["source"] for layer in lazy["layers"]] == ["remote"] * 3
    assert f"pull of {node['proxy'].host}/{images['lazy']}" in service.log
    assert own_client not in service.log
    plain = pull(node, images["plain"], *handoff)
    assert [layer["source"] for layer in plain["layers"]] == ["fetched+applied"] * 3
    streamed = [x for x in images["image"].manifest["layers"] if x["size"] > RELAY_MAX_BLOB]
    assert streamed and service.log.count(own_client) == len(streamed)
    ref = f"{node['proxy'].host}/{images['plain']}"
    run = node["daemon"].ctr("run", "--rm", "--snapshotter", "lazypull", ref, "handed1",
                             "/app/run.sh")
    assert run.stdout == "hello lazily\n16\n"


def _tree(root: Path) -> dict[str, tuple]:
    """Everything a container sees of a file tree (landmarks and the TOC entry aside,
    which only the eStargz tar stream has)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel in (".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json"):
                continue
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            else:
                body = ""
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        int(st.st_mtime), st.st_size if not stat.S_ISDIR(st.st_mode) else 0, body)
    return out


def _mount_view(daemon, snapshotter: str, key: str, parent: str, target: Path) -> None:
    # One call creates the view and prints its mounts: containerd's garbage collector
    # may drop an unleased view at any moment, but not the layers a mount holds.
    mounts = json.loads(daemon.ctr("snapshots", "--snapshotter", snapshotter, "view",
                                   "--mounts", key, parent).stdout)
    target.mkdir(parents=True)
    for mount in mounts:  # containerd's mount.Mount, as Go encodes it
        options = ",".join(mount.get("Options") or [])
        subprocess.run(["mount", "-t", mount["Type"], "-o", options, mount["Source"],
                        str(target)], check=True)


def implicit_dirs(images, registry) -> set[str]:
    """Directories some layer holds no entry for: containerd creates them at unpack time
    (so their mtime is the unpack's), the lazy view shows them as the TOC implies."""
    from estargz import BlobReader, FileSource
    found: set[str] = set()
    for layer in images["report"]["manifests"][0]["layers"]:
        with FileSource.open(str(registry.blob_data_path(layer["digest"]))) as blob:
            tree = BlobReader.open(blob, layer["toc_digest"]).layer
            found |= {path for path, node in tree.walk() if node.implicit and path}
    return found


def test_lazy_tree_equals_native_unpack(node, images, registry, tmp_path) -> None:
    daemon, proxy = node["daemon"], node["proxy"]
    pull(node, images["lazy"])
    ref = f"{proxy.host}/{images['lazy']}"
    daemon.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
    chain = daemon.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout.split()
    top = [word for word in chain if word.startswith("sha256:")]
    parents = {line.split()[0]: (line.split()[1] if len(line.split()) > 2 else "")
               for line in daemon.ctr("snapshots", "--snapshotter", "overlayfs",
                                      "ls").stdout.splitlines()[1:]}
    leaf = next(key for key in parents if key not in parents.values())
    assert leaf in top
    try:
        _mount_view(daemon, "overlayfs", "native-view", leaf, tmp_path / "native")
        _mount_view(daemon, "lazypull", "lazy-view", leaf, tmp_path / "lazy")
        native, lazy = _tree(tmp_path / "native"), _tree(tmp_path / "lazy")
        assert native.keys() == lazy.keys()
        unpack_time = implicit_dirs(images, registry)
        for path in native:
            if path in unpack_time:
                native[path] = native[path][:4] + native[path][5:]
                lazy[path] = lazy[path][:4] + lazy[path][5:]
            assert native[path] == lazy[path], path
        assert "opt/tools/readme" not in lazy and "data/big.bin" in lazy
    finally:
        unmount_below(tmp_path)


def test_corrupt_chunk_gives_eio_for_that_file_only(node, images, registry) -> None:
    layer = images["report"]["manifests"][0]["layers"][1]
    blob = registry.blob_data_path(layer["digest"])
    original = blob.read_bytes()
    middle = len(original) // 3  # inside data/big.bin's chunks, far from the prefetch region
    corrupted = bytearray(original)
    corrupted[middle] ^= 0xFF
    blob.write_bytes(bytes(corrupted))
    try:
        pull(node, images["lazy"])
        ref = f"{node['proxy'].host}/{images['lazy']}"
        run = node["daemon"].ctr("run", "--rm", "--snapshotter", "lazypull", ref, "eio1",
                                 "/bin/sh", "-c", "cat /data/big.bin > /dev/null; echo $?; "
                                 "cat /data/small/a.txt | wc -c; cat /etc/hello", check=False)
        lines = run.stdout.splitlines()
        assert lines[0] != "0" and "Input/output error" in run.stderr
        assert lines[1:] == ["100", "hello lazily"]
    finally:
        blob.write_bytes(original)


def _sha256_in(daemon, container: str, exec_id: str, path: str) -> str:
    done = daemon.ctr("tasks", "exec", "--exec-id", exec_id, container, "/bin/busybox",
                      "sha256sum", path)
    return done.stdout.split()[0]


READ_A_LITTLE = "cat /etc/hello; head -c 4096 /data/other.bin | wc -c"


def _pull_and_read_a_little(node, images, container: str) -> str:
    """Pull the lazy image, run a container that reads a little; its reference."""
    pull(node, images["lazy"])
    ref = f"{node['proxy'].host}/{images['lazy']}"
    first = node["daemon"].ctr("run", "--rm", "--snapshotter", "lazypull", ref, container,
                               "/bin/sh", "-c", READ_A_LITTLE)
    assert first.stdout == "hello lazily\n4096\n"
    return ref


def test_running_containers_keep_reading_across_a_service_kill(node, images,
                                                                 snapshotter_factory):
    daemon, proxy, service = node["daemon"], node["proxy"], node["service"]
    ref = _pull_and_read_a_little(node, images, "r1")
    # A container keeps running while the service is killed under it.
    daemon.ctr("run", "-d", "--snapshotter", "lazypull", ref, "running", "/bin/busybox",
               "sleep", "600")
    manager = service.fuse_manager_pid
    assert manager is not None
    service.kill9()
    digests = layer_digests(images)
    before = blob_bytes(proxy, digests)
    # With the service down, the container reads a file none had read: fetched on demand
    # by the FUSE manager, verified, whole.
    big = hashlib.sha256(LAYERS[1]["data/big.bin"]).hexdigest()
    assert _sha256_in(daemon, "running", "down", "/data/big.bin") == big
    assert blob_bytes(proxy, digests) > before + BIG // 2
    again = snapshotter_factory(service.root, False, service.address, "--config",
                                str(node["config"]))
    node["service"] = again
    from .test_snapshotter_containerd import reconnected
    reconnected(daemon)
    assert again.fuse_manager_pid == manager  # the same mount, never interrupted
    fetched = blob_bytes(proxy, digests)
    # A new container starts from the same image without fetching what is cached.
    second = daemon.ctr("run", "--rm", "--snapshotter", "lazypull", ref, "r2", "/bin/sh", "-c",
                        READ_A_LITTLE + "; /bin/busybox sha256sum /data/big.bin")
    assert second.stdout.split()[:3] == ["hello", "lazily", "4096"]
    assert second.stdout.split()[3] == big
    assert blob_bytes(proxy, digests) == fetched
    assert _sha256_in(daemon, "running", "up", "/data/small/b.txt") == \
        hashlib.sha256(b"b" * 200).hexdigest()
    assert "running" in daemon.ctr("tasks", "ls").stdout


def test_killed_fuse_manager_is_started_again_with_every_layer(node, images):
    daemon, proxy, service = node["daemon"], node["proxy"], node["service"]
    ref = _pull_and_read_a_little(node, images, "m1")
    manager = service.fuse_manager_pid
    assert manager is not None
    indexes = _layer_indexes(service)
    assert len(indexes) >= len(layer_digests(images))  # every lazy layer keeps its index
    os.kill(manager, signal.SIGKILL)  # by PID
    digests = layer_digests(images)
    fetched = blob_bytes(proxy, digests)
    # The service notices, starts a new manager and serves its lazy layers again from
    # their TOCs and the chunk cache on disk: no byte is fetched twice.
    deadline = time.monotonic() + 30
    while service.fuse_manager_pid in (None, manager) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.fuse_manager_pid not in (None, manager)
    second = daemon.ctr("run", "--rm", "--snapshotter", "lazypull", ref, "m2", "/bin/sh", "-c",
                        READ_A_LITTLE)
    assert second.stdout == "hello lazily\n4096\n"
    assert blob_bytes(proxy, digests) == fetched
    assert "lost the FUSE manager" in service.log
    assert _layer_indexes(service) == indexes  # reopened as they were, not built again


def _layer_indexes(service) -> dict[Path, int]:
    """Each lazy snapshot's layer index and its inode number."""
    return {path: path.stat().st_ino
            for path in Path(service.root).glob("snapshots/*/index.db")}


def test_unreachable_lazy_layer_gives_unavailable_not_a_hang(
        images, registry, fault_proxy_factory, snapshotter_factory, tmp_path) -> None:
    import shutil

    import grpc

    from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
    from snapshotter.lazy import layer_source as remote

    proxy = fault_proxy_factory(registry.host)
    config = tmp_path / "config.toml"
    config.write_text("background_fetch = false\nprefetch_timeout_seconds = 5.0\n"
                      f'hosts_dir = "{tmp_path / "hosts"}"\n')
    service = snapshotter_factory(None, False, None, "--config", str(config))
    layer = images["report"]["manifests"][0]["layers"][0]
    labels = {remote.REF_LABEL: "sha256:" + "c" * 64,
              remote.STARGZ_REFERENCE: f"{proxy.host}/{images['lazy']}",
              remote.STARGZ_DIGEST: layer["digest"]}
    client = service.client()
    with pytest.raises(grpc.RpcError) as answer:
        client.Prepare(pb.PrepareSnapshotRequest(key="extract-1", labels=labels))
    assert answer.value.code() == grpc.StatusCode.ALREADY_EXISTS  # mounted lazily
    assert service.stop() == 0
    # The registry goes away and the node loses its chunk cache: the restarted service
    # serves the layer from its TOC, but cannot prefetch it.
    proxy.stop()
    shutil.rmtree(service.root / "cache")
    again = snapshotter_factory(service.root, False, None, "--config", str(config))
    with pytest.raises(grpc.RpcError) as refused:
        again.client().Prepare(pb.PrepareSnapshotRequest(key="container",
                                                         parent=labels[remote.REF_LABEL]),
                                timeout=60)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "prefetch" in refused.value.details()
    # Refused before anything was made: no half-made snapshot is left behind.
    listed = [i.name for r in again.client().List(pb.ListSnapshotsRequest()) for i in r.info]
    assert listed == [labels[remote.REF_LABEL]]
