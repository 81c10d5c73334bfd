"""Unmodified gzip images pulled lazily through their gzip index, end to end: a real
registry (behind a recording proxy), our snapshotter service and FUSE manager, and a
private containerd. The image is indexed with the real `lazypull index` and never
changes; its layers are FUSE mounts, their tree equals containerd's native unpack,
a flipped blob byte gives EIO, a restarted FUSE manager serves them from local
state, and layers without an index (or zstd ones) are pulled the ordinary way."""

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import zstandard

from .fixtures.containerd import unmount_below
from .images import push_layout_image
from .layers import LONG_DIR, big_payload
from .lazy_node import (  # noqa: F401  (lazy_node_fixture: the `node` fixture)
    lazy_node_fixture,
    lazypull,
    pull,
    start_lazy_node,
    stop_lazy_node,
)
from .test_lazy_pull import _mount_view, _tree, metric_values

BIG = 3 << 20
BIG_DATA = os.urandom(BIG)
BUSYBOX = Path("/bin/busybox").read_bytes()
HOT = ["etc/hostname", "bin/busybox", "opt/new"]
REFERRER_PATHS = r"/referrers/|/manifests/sha256-"


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, **fields: object
          ) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, 1_700_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def base_tar() -> bytes:
    """What the coverage layer above whites out or hides, a big file, a shell."""
    return _tar([
        (_info("bin", tarfile.DIRTYPE, 0o755), b""),
        (_info("bin/busybox", mode=0o755), BUSYBOX),
        (_info("bin/sh", tarfile.SYMTYPE, linkname="busybox"), b""),
        (_info("var", tarfile.DIRTYPE, 0o755), b""),
        (_info("var/cache", tarfile.DIRTYPE, 0o755), b""),
        (_info("var/cache/old", uid=7, gid=8), b"old cache\n"),
        (_info("opt", tarfile.DIRTYPE, 0o755), b""),
        (_info("opt/old"), b"hidden by the opaque directory above\n"),
        (_info("data", tarfile.DIRTYPE, 0o755), b""),
        (_info("data/big.bin"), BIG_DATA),
        (_info("data/big-link", tarfile.LNKTYPE, linkname="data/big.bin"), b""),
    ])


def upper_tar() -> bytes:
    """Every entry kind, owners, xattrs, a hard link, a whiteout, an opaque directory
    (`tests.layers.coverage_tar`, but with xattrs the kernel takes as they are)."""
    long_file = LONG_DIR + "/" + "f" * 120
    return _tar([
        (_info("etc", tarfile.DIRTYPE, 0o755), b""),
        (_info("etc/hostname", uid=1000, gid=1000, uname="dev", gname="dev"), b"workspace\n"),
        (_info("etc/empty"), b""),
        (_info("usr", tarfile.DIRTYPE, 0o700), b""),
        (_info("usr/bin", tarfile.DIRTYPE, 0o755), b""),
        (_info("usr/bin/tool", mode=0o4755, mtime=1_234_567_890), big_payload(300_000)),
        # Hard links carry their target's metadata, as tar writers give it (containerd
        # applies a link header's mode to the shared inode).
        (_info("usr/bin/tool-link", tarfile.LNKTYPE, 0o4755, mtime=1_234_567_890,
               linkname="usr/bin/tool"), b""),
        (_info("usr/bin/sym", tarfile.SYMTYPE, linkname="tool"), b""),
        (_info("usr/bin/noted", pax_headers={"SCHILY.xattr.user.comment": "ünïcode",
                                             "SCHILY.xattr.user.other": "x"}), b"noted\n"),
        (_info("dev", tarfile.DIRTYPE, 0o755), b""),
        (_info("dev/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3), b""),
        (_info("dev/pipe", tarfile.FIFOTYPE), b""),
        (_info(LONG_DIR, tarfile.DIRTYPE, 0o755), b""),
        (_info(long_file, uid=5, gid=6), b"long name content\n"),
        (_info("deep/long-link", tarfile.SYMTYPE, linkname=long_file), b""),
        (_info("deep/long-hardlink", tarfile.LNKTYPE, uid=5, gid=6, linkname=long_file), b""),
        (_info("var", tarfile.DIRTYPE, 0o755), b""),
        (_info("var/.wh.cache"), b""),
        (_info("opt", tarfile.DIRTYPE, 0o755), b""),
        (_info("opt/.wh..wh..opq"), b""),
        (_info("opt/new"), b"new\n"),
    ])


def write_layout(dest: Path, tag: str, tars: list[bytes], zstd: bool = False) -> str:
    """An OCI layout holding one image of these tars as gzip (or plain zstd) layers;
    its manifest digest."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest

    layers = []
    for tar in tars:
        blob = zstandard.compress(tar) if zstd else gzip.compress(tar, 6, mtime=0)
        kind = "zstd" if zstd else "gzip"
        layers.append({"mediaType": f"application/vnd.oci.image.layer.v1.tar+{kind}",
                       "digest": put(blob), "size": len(blob)})
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [
                             "sha256:" + hashlib.sha256(t).hexdigest() for t in tars]}}).encode()
    manifest = json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": put(config), "size": len(config)},
                           "layers": layers}).encode()
    digest = put(manifest)
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return digest


def raw_digest(reference: str) -> str:
    done = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                           f"docker://{reference}"], check=True, capture_output=True)
    return "sha256:" + hashlib.sha256(done.stdout).hexdigest()


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory):
    layout = tmp_path_factory.mktemp("gz") / "layout"
    tars = [base_tar(), upper_tar()]
    digest = write_layout(layout, "v1", tars)
    indexed = push_layout_image(layout, "v1", registry.host, "gz/indexed")
    push_layout_image(layout, "v1", registry.host, "gz/plain")
    zstd_layout = layout.parent / "zstd"
    write_layout(zstd_layout, "v1", tars, zstd=True)
    push_layout_image(zstd_layout, "v1", registry.host, "gz/zstd")
    profile = tmp_path_factory.mktemp("profile") / "profile.json"
    profile.write_text(json.dumps({"schemaVersion": 1, "images": [{
        "reference": f"{registry.host}/gz/indexed:v1",
        "files": [{"path": path} for path in HOT]}]}))
    done = lazypull("index", indexed, "--plain-http", "--spacing", "65536",
                    "--prefetch-profile", str(profile), "--json")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((layout / "blobs" / "sha256" / digest.split(":")[1]).read_text())
    return {"indexed": "gz/indexed:v1", "plain": "gz/plain:v1", "zstd": "gz/zstd:v1",
            "digest": digest, "layers": [layer["digest"] for layer in manifest["layers"]],
            "tars": tars}


def run(node, ref: str, name: str, script: str, check: bool = True):
    return node["daemon"].ctr("run", "--rm", "--snapshotter", "lazypull",
                              f"{node['proxy'].host}/{ref}", name, "/bin/sh", "-c", script,
                              check=check)


def lookups(node) -> dict[str, float]:
    return {key: value for key, value in metric_values(node["service"]).items()
            if key.startswith("lazypull_gzip_index_lookups_total")}


def test_indexed_gzip_image_runs_lazily_unchanged(node, images, registry) -> None:
    daemon, proxy = node["daemon"], node["proxy"]
    result = pull(node, images["indexed"])
    assert [layer["source"] for layer in result["layers"]] == ["remote"] * 2
    content = set(daemon.ctr("content", "ls", "-q").stdout.split())
    assert not set(images["layers"]) & content  # no layer blob was downloaded whole
    mounts = Path("/proc/self/mounts").read_text()
    assert f"{node['service'].root}/fuse" in mounts
    demand = 'lazypull_fetch_requests_total{kind="demand"}'
    before = metric_values(node["service"]).get(demand, 0)
    out = run(node, images["indexed"], "hot", "cat /etc/hostname /opt/new").stdout
    assert out == "workspace\nnew\n"
    # The hot files came with the prefetch: reading them asked the registry nothing.
    assert metric_values(node["service"]).get(demand, 0) == before
    big = run(node, images["indexed"], "big", "/bin/busybox sha256sum /data/big-link")
    assert big.stdout.split()[0] == hashlib.sha256(BIG_DATA).hexdigest()
    served = sum(1 for r in proxy.requests("GET", r"/blobs/sha256:")
                 if r.path.rsplit("/", 1)[-1] in images["layers"]
                 and not (r.headers.get("Range") or r.headers.get("range")))
    assert served == 0  # only range requests for the layers
    assert lookups(node)['lazypull_gzip_index_lookups_total{cached="false",outcome="found"}'] \
        >= 1
    assert metric_values(node["service"])["lazypull_gzip_index_layers_mounted"] == 2
    assert raw_digest(f"{registry.host}/{images['indexed']}") == images["digest"]


def _xattrs(root: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            names = [n for n in os.listxattr(path) if n.startswith("user.")]
            if names:
                out[str(path.relative_to(root))] = {n: os.getxattr(path, n) for n in names}
    return out


def test_lazy_tree_equals_native_unpack(node, images, tmp_path) -> None:
    daemon, proxy = node["daemon"], node["proxy"]
    pull(node, images["indexed"])
    ref = f"{proxy.host}/{images['indexed']}"
    daemon.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
    rows = daemon.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout.splitlines()[1:]
    parents = {row.split()[0]: (row.split()[1] if len(row.split()) > 2 else "") for row in rows}
    leaf = next(key for key in parents if key not in parents.values())
    try:
        _mount_view(daemon, "overlayfs", "native-view", leaf, tmp_path / "native")
        _mount_view(daemon, "lazypull", "lazy-view", leaf, tmp_path / "lazy")
        native, lazy = _tree(tmp_path / "native"), _tree(tmp_path / "lazy")
        assert native.keys() == lazy.keys()
        # Parents no tar entry names are made at unpack time, with the unpack's mtime.
        implicit = {LONG_DIR.rsplit("/", k)[0] for k in range(1, LONG_DIR.count("/") + 1)}
        for path in native:
            if path in implicit:
                native[path] = native[path][:4] + native[path][5:]
                lazy[path] = lazy[path][:4] + lazy[path][5:]
            assert native[path] == lazy[path], path
        assert "var/cache" not in lazy and "opt/old" not in lazy and "opt/new" in lazy
        assert os.stat(tmp_path / "lazy/data/big-link").st_ino == \
            os.stat(tmp_path / "lazy/data/big.bin").st_ino
        assert _xattrs(tmp_path / "lazy") == _xattrs(tmp_path / "native")
        assert _xattrs(tmp_path / "lazy")["usr/bin/noted"]["user.comment"] == "ünïcode".encode()
    finally:
        unmount_below(tmp_path)


def test_flipped_blob_byte_gives_eio_never_wrong_bytes(node, images, registry) -> None:
    blob = registry.blob_data_path(images["layers"][0])
    original = blob.read_bytes()
    corrupted = bytearray(original)
    corrupted[len(original) * 2 // 3] ^= 0xFF  # inside the big file, most of the blob
    blob.write_bytes(bytes(corrupted))
    try:
        pull(node, images["indexed"])
        done = run(node, images["indexed"], "eio", "cat /data/big.bin > /dev/null; echo $?; "
                   "cat /etc/hostname", check=False)
        lines = done.stdout.splitlines()
        assert lines[0] != "0" and "Input/output error" in done.stderr
        assert lines[1:] == ["workspace"]
    finally:
        blob.write_bytes(original)


def test_killed_fuse_manager_serves_indexed_layers_from_local_state(node, images) -> None:
    service, proxy = node["service"], node["proxy"]
    pull(node, images["indexed"])
    first = run(node, images["indexed"], "k1", "/bin/busybox sha256sum /data/big.bin")
    assert first.stdout.split()[0] == hashlib.sha256(BIG_DATA).hexdigest()
    indexes = {p: p.stat().st_ino for p in Path(service.root).glob("snapshots/*/index.db")}
    assert len(list(Path(service.root).glob("snapshots/*/gzip-index"))) == 2
    manager = service.fuse_manager_pid
    assert manager is not None
    asked = len(proxy.requests())
    os.kill(manager, signal.SIGKILL)  # by PID
    deadline = time.monotonic() + 30
    while service.fuse_manager_pid in (None, manager) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.fuse_manager_pid not in (None, manager)
    again = run(node, images["indexed"], "k2",
                "/bin/busybox sha256sum /data/big.bin; cat /etc/hostname")
    assert again.stdout.split()[0] == hashlib.sha256(BIG_DATA).hexdigest()
    assert again.stdout.split()[-1] == "workspace"
    # Nothing asked of the registry: no lookup, no index blob, no span fetched twice.
    assert [r.path for r in proxy.requests()[asked:]
            if "/blobs/" in r.path or "referrers" in r.path or "sha256-" in r.path] == []
    assert {p: p.stat().st_ino for p in indexes} == indexes


def test_image_without_index_is_pulled_and_not_looked_up_again(node, images) -> None:
    daemon, proxy = node["daemon"], node["proxy"]
    result = pull(node, images["plain"])
    assert [layer["source"] for layer in result["layers"]] == ["fetched+applied"] * 2
    asked = len(proxy.requests("GET", REFERRER_PATHS))
    assert asked > 0
    assert run(node, images["plain"], "p1", "cat /etc/hostname").stdout == "workspace\n"
    daemon.ctr("images", "rm", "--sync", f"{proxy.host}/{images['plain']}")
    result = pull(node, images["plain"])
    assert [layer["source"] for layer in result["layers"]] == ["fetched+applied"] * 2
    assert len(proxy.requests("GET", REFERRER_PATHS)) == asked  # remembered for the TTL
    counted = lookups(node)
    assert counted['lazypull_gzip_index_lookups_total{cached="false",outcome="none"}'] == 1


def test_zstd_layers_are_pulled_without_a_lookup(node, images) -> None:
    result = pull(node, images["zstd"])
    assert [layer["source"] for layer in result["layers"]] == ["fetched+applied"] * 2
    assert node["proxy"].requests("GET", REFERRER_PATHS) == []
    assert run(node, images["zstd"], "z1", "cat /opt/new").stdout == "new\n"


def test_restarted_service_and_manager_serve_indexed_layers_without_the_registry(
        node, images, snapshotter_factory) -> None:
    from .fixtures.fault_proxy import WireFault
    from .test_snapshotter_containerd import reconnected

    daemon, proxy, service = node["daemon"], node["proxy"], node["service"]
    pull(node, images["indexed"])
    script = "/bin/busybox sha256sum /data/big.bin; cat /etc/hostname /usr/bin/noted"
    first = run(node, images["indexed"], "r1", script)
    assert first.stdout.split()[0] == hashlib.sha256(BIG_DATA).hexdigest()
    manager = service.fuse_manager_pid
    service.stop()  # the service and its FUSE manager, by PID
    # From now on the registry answers nothing but errors.
    proxy.add(WireFault("status", "GET", r".", status=503))
    proxy.add(WireFault("status", "HEAD", r".", status=503))
    again = snapshotter_factory(service.root, True, service.address, "--config",
                                str(node["config"]))
    node["service"] = again
    reconnected(daemon)
    second = run(node, images["indexed"], "r2", script)
    # Every byte came from the snapshot directories and the chunk cache on disk: any
    # request would have failed, and the read with it.
    assert second.stdout == first.stdout
    assert again.fuse_manager_pid not in (None, manager)


def test_background_fetch_makes_indexed_layers_local(snapshotter_factory, registry,
                                                     fault_proxy_factory, images,
                                                     tmp_path_factory) -> None:
    from .fixtures.fault_proxy import WireFault

    node = start_lazy_node(snapshotter_factory, registry, fault_proxy_factory,
                           tmp_path_factory, "background_fetch = true\n"
                           "background_quiet_seconds = 0.2\n")
    service, proxy = node["service"], node["proxy"]
    try:
        pull(node, images["indexed"])
        deadline = time.monotonic() + 120
        while service.log.count("fully local") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert service.log.count("fully local") == 2, service.log[-3000:]
        assert metric_values(service)['lazypull_fetch_bytes_total{kind="background"}'] > 0
        proxy.add(WireFault("status", "GET", r".", status=503))
        # Every file of both layers is read from the chunk cache: the registry is gone.
        done = run(node, images["indexed"], "bg", "/bin/busybox find / -xdev -type f "
                   "-exec /bin/busybox cat {} + > /dev/null; echo $?")
        assert done.stdout == "0\n", done.stderr
        assert run(node, images["indexed"], "bg2", "/bin/busybox sha256sum /data/big.bin"
                   ).stdout.split()[0] == hashlib.sha256(BIG_DATA).hexdigest()
    finally:
        stop_lazy_node(node)
