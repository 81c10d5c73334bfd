"""Cold start of workspace images: pull + run to a READY line, full pull against lazy
pulling, with the registry behind a shaped link.

Images (perf/workspace_images.py, built once and cached): Debian bookworm minbase +
python3 + python3-numpy, whose workload imports a handful of stdlib modules; and
minbase + gcc + libc6-dev, whose workload compiles and runs hello.c. Each is three
gzip layers (base, packages, workspace files) and prints READY when its work is done.

Network (perf/netem.py): the registry (docker-registry) runs in its own network
namespace, reached from the root namespace over veth pairs through a userspace
forwarder that holds every frame DELAY ms each way, with tbf at RATE on both sides.
containerd, lazypull's snapshotter service, `ctr images pull` and `lazypull pull` all
reach it that way; a hosts.toml tells lazypull the registry speaks plain HTTP.

Set-up, untimed and before the link is shaped: push each image (`ws/NAME:v1`),
convert it with `lazypull convert` to eStargz without a prefetch list
(`ws/NAME:v1-esgz`), and to eStargz with the workload's files at the front of each
layer (`ws/NAME:v1-esgz-prefetch`). Where those files come from (--prefetch-source):

- profile: the workload is run once lazily from `v1-esgz` on a fresh node; the
  service records what it read; `lazypull profile export` writes the profile, and
  `lazypull convert --prefetch-profile` uses it;
- strace: the workload runs under `strace -f -e trace=openat,execve` in a chroot of
  the fully pulled image; the regular files it opened or executed, in first-access
  order and with symlinks resolved inside the image, are the `--prefetch-list`.

`auto` (the default) takes profile when this checkout has `lazypull profile export`.

Timed variants, each sample on a fresh node: a new containerd (own root and state;
CRI off) and, for lazy variants, a new snapshotter service (own root, so an empty
chunk cache; its defaults otherwise, plus hosts_dir), then `sync` and
`echo 3 > /proc/sys/vm/drop_caches`. The clock starts when the pull command starts
and stops when the workload's READY line arrives on `ctr run`'s stdout:

- full-overlayfs: `ctr images pull --plain-http` (fetch and unpack into overlayfs),
  then `ctr run --rm`;
- lazy: `lazypull pull v1-esgz`, then `ctr run --rm --snapshotter lazypull`;
- lazy-prefetch: the same with `v1-esgz-prefetch`;
- lazy-nobg, lazy-prefetch-nobg: the same two with the service's background fetch
  off (`background_fetch = false`): what the background fetch costs or saves;
- local-cold and local-warm, measured on the node of each full-overlayfs sample once
  its run is over: `ctr run --rm` alone with the image already unpacked, after
  dropping the page cache again, and then once more with the cache warm.

Samples run interleaved, variants in forward order on even repetitions and reversed
on odd ones, images in turn. Bytes on the wire are tbf's counter on the registry's
side (frames with their headers) across the sample. For lazy variants the service's
own counters (its /metrics) are read the moment READY arrives: bytes, range requests
and their summed durations by kind of fetch (demand, prefetch, background), FUSE
operations, chunk cache hits. Afterwards the runc cgroup directories of our
containerd namespace are removed, and each node's directories.

Read throughput (--bigfile-mib, 0 to skip): an image with one large file of
incompressible bytes is pulled both ways on one node (service defaults), with the
link unshaped (the network is not what is measured): `ctr images pull` into overlayfs
and `lazypull pull` of its eStargz twin. Each image's snapshot is mounted as a view
(the overlay mount containerd would give a container: over the unpacked directory,
or over lazypull's FUSE layer tree). The file is read through each with the page
cache dropped (first: lazy fetches, unless the background fetch got there first;
again: lazy is served from the service's chunk cache), then --warm-reads times more,
alternating, with the page cache warm.

Only medians are reported, with ratios measured in the same run; nothing is asserted.
Everything is torn down at the end: processes stopped by PID, namespaces deleted.
"""

import argparse
import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from perf.convert_throughput import _cpu_model, _first_line, _row
from perf.netem import NS_REGISTRY, ShapedPath
from perf.workspace_images import (
    DEFAULT_CACHE,
    SPECS,
    WorkspaceImage,
    apt_mirror,
    ensure_bigfile_image,
    ensure_image,
    push,
)
from tests.fixtures.containerd import Containerd, start_containerd, stop_containerd, unmount_below
from tests.fixtures.snapshotter import SnapshotterProcess, free_tcp_port

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = Path(__file__).parent / "results" / "cold-start.json"
NAMESPACE = "lazypull-perf"
REGISTRY_PORT = 5000
MB = 1_000_000
MIB = 1 << 20
READY = b"READY"
RUN_TIMEOUT = 600.0
PULL_TIMEOUT = 900
TOOLS = ("debootstrap", "umoci", "skopeo", "ctr", "containerd", "runc", "docker-registry",
         "ip", "tc", "strace")
PROXY_CONFIG = """
[proxy_plugins]
  [proxy_plugins.lazypull]
    type = "snapshot"
    address = "{address}"
"""
TIMED = ("full-overlayfs", "lazy", "lazy-prefetch", "lazy-nobg", "lazy-prefetch-nobg")
DEFAULT_VARIANTS = TIMED
DERIVED = ("local-cold", "local-warm")
LABELS = {
    "full-overlayfs": "ctr images pull (overlayfs) + ctr run",
    "lazy": "lazypull pull of the eStargz image (no prefetch) + ctr run --snapshotter lazypull",
    "lazy-prefetch": "lazypull pull of the eStargz image with the workload's files prefetched "
                     "+ ctr run --snapshotter lazypull",
    "lazy-nobg": "lazy, service with background_fetch = false",
    "lazy-prefetch-nobg": "lazy-prefetch, service with background_fetch = false",
    "local-cold": "ctr run alone, image already unpacked in overlayfs, page cache dropped",
    "local-warm": "ctr run alone, image already unpacked in overlayfs, page cache warm",
}
TAGS = {"full-overlayfs": "v1", "lazy": "v1-esgz", "lazy-prefetch": "v1-esgz-prefetch",
        "lazy-nobg": "v1-esgz", "lazy-prefetch-nobg": "v1-esgz-prefetch"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def lazypull_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def run(argv: list[str], timeout: float = PULL_TIMEOUT, what: str = "") -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{what or ' '.join(argv)} exited {done.returncode}:\n"
                           f"{(done.stderr or done.stdout)[-4000:]}")
    return done.stdout


# -- the machine ----------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def remove_cgroups() -> None:
    """runc leaves empty cgroup directories of the containerd namespace behind."""
    root = Path("/sys/fs/cgroup")
    for top in [root / NAMESPACE, *root.glob(f"*/{NAMESPACE}")]:
        if not top.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


# -- the registry ---------------------------------------------------------------------


@dataclass
class Registry:
    host: str  # ADDRESS:PORT
    process: subprocess.Popen
    root: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # by PID
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_registry_in_namespace(workdir: Path, address: str) -> Registry:
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    config = {
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": f"{address}:{REGISTRY_PORT}", "secret": secrets.token_hex(16)},
    }
    path = workdir / "config.yml"
    path.write_text(json.dumps(config, indent=2))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)}
    with open(workdir / "registry.log", "ab") as out:
        process = subprocess.Popen(["ip", "netns", "exec", NS_REGISTRY, "docker-registry",
                                    "serve", str(path)], stdout=out, stderr=subprocess.STDOUT,
                                   env=env, cwd=workdir)
    registry = Registry(f"{address}:{REGISTRY_PORT}", process, root)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with opener.open(f"http://{registry.host}/v2/", timeout=2):
                return registry
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    registry.stop()
    raise RuntimeError(f"docker-registry did not start: {workdir / 'registry.log'}")


# -- nodes: containerd (+ the snapshotter service) -------------------------------------


@dataclass
class Node:
    base: Path
    daemon: Containerd
    service: SnapshotterProcess | None

    def ctr(self, *args: str) -> list[str]:
        return ["ctr", "--address", self.daemon.address, "--namespace", NAMESPACE, *args]


def start_node(base: Path, lazy: bool, service_config: Path) -> Node:
    base.mkdir(parents=True)
    service = None
    if lazy:
        service = SnapshotterProcess(root=base / "sn", address=str(base / "s.sock"),
                                     log_path=base / "service.log",
                                     metrics_port=free_tcp_port(),
                                     extra_args=("--config", str(service_config),
                                                 "--log-level", "info"))
        service.start()
    try:
        daemon = start_containerd(base / "c", PROXY_CONFIG.format(address=service.address)
                                  if service else "")
    except BaseException:
        if service:
            service.stop()
        raise
    daemon.namespace = NAMESPACE
    return Node(base, daemon, service)


METRICS = (  # Prometheus series -> (label, key suffix)
    ("lazypull_fetch_bytes_total", "kind", "bytes"),
    ("lazypull_fetch_requests_total", "kind", "requests"),
    ("lazypull_fetch_duration_seconds_sum", "kind", "request_seconds"),
    ("lazypull_fuse_operation_duration_seconds_count", "operation", "ops"),
    ("lazypull_fuse_operation_duration_seconds_sum", "operation", "op_seconds"),
    ("lazypull_chunk_cache_hits_total", "tier", "cache_hits"),
)


def fetch_metrics(node: Node) -> dict[str, float]:
    """The service's counters: bytes, range requests and their summed durations by kind
    of fetch (`demand_bytes`, ...); FUSE operations and their summed durations
    (`fuse_read_ops`, `fuse_read_op_seconds`, ...); chunk cache hits by tier."""
    if node.service is None or node.service.metrics_port is None:
        return {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{node.service.metrics_port}/metrics",
                         timeout=10) as response:
            text = response.read().decode()
    except OSError as exc:
        log(f"  (the service's /metrics did not answer: {exc})")
        return {}
    found: dict[str, float] = {}
    for line in text.splitlines():
        for metric, label, suffix in METRICS:
            if line.startswith(metric + "{") and f'{label}="' in line:
                value = line.split(f'{label}="', 1)[1].split('"', 1)[0]
                prefix = "fuse_" if label == "operation" else ""
                found[f"{prefix}{value}_{suffix}"] = float(line.rsplit(" ", 1)[1])
        if line.startswith("lazypull_chunk_cache_misses_total "):
            found["cache_misses"] = float(line.rsplit(" ", 1)[1])
    return found


def fetch_summary(counters: dict[str, float]) -> str:
    kinds = sorted(k[:-6] for k in counters if k.endswith("_bytes") and not
                   k.startswith("fuse_"))
    return ", ".join(f"{k} {counters[k + '_bytes'] / MB:.1f} MB/"
                     f"{counters.get(k + '_requests', 0):.0f} req/"
                     f"{counters.get(k + '_request_seconds', 0):.1f} s" for k in kinds)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0), 6) for k, v in after.items()
            if v - before.get(k, 0)}


def stop_node(node: Node) -> None:
    try:
        stop_containerd(node.daemon)
    finally:
        if node.service is not None:
            node.service.stop()
        unmount_below(node.base)
        remove_cgroups()
        shutil.rmtree(node.base, ignore_errors=True)


def run_to_ready(node: Node, ref: str, cid: str, command: tuple[str, ...],
                 snapshotter: str | None, started: float,
                 on_ready: Callable[[], None] | None = None) -> tuple[float, float, str]:
    """`ctr run --rm` the workload: seconds from `started` to the READY line and to the
    exit, and what it printed. `on_ready` is called as soon as READY is seen."""
    argv = node.ctr("run", "--rm", *(["--snapshotter", snapshotter] if snapshotter else []),
                    ref, cid, *command)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, "out")
    selector.register(process.stderr, selectors.EVENT_READ, "err")
    out, err = bytearray(), bytearray()
    ready: float | None = None
    deadline = time.monotonic() + RUN_TIMEOUT
    open_streams = 2
    while open_streams:
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"{' '.join(argv)}: no exit within {RUN_TIMEOUT:g}s; "
                               f"output {bytes(out)[-500:]!r} {bytes(err)[-500:]!r}")
        for key, _ in selector.select(1.0):
            data = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
            if not data:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            if key.data == "out":
                out += data
                if ready is None and any(line.startswith(READY) for line in out.splitlines()):
                    ready = time.perf_counter() - started
                    if on_ready is not None:
                        on_ready()
            else:
                err += data
    code = process.wait(timeout=60)
    ended = time.perf_counter() - started
    text = out.decode(errors="replace") + err.decode(errors="replace")
    if code != 0 or ready is None:
        raise RuntimeError(f"{' '.join(argv)} exited {code} (READY seen: {ready is not None}):"
                           f"\n{text[-3000:]}")
    return ready, ended, text


# -- setup: images, conversions, prefetch ---------------------------------------------


@dataclass
class Setup:
    args: argparse.Namespace
    workdir: Path
    path: ShapedPath
    registry: Registry
    hosts_dir: Path
    service_config: Path  # the service's defaults, plus hosts_dir and --service-option
    images: dict[str, WorkspaceImage] = field(default_factory=dict)
    conversions: dict[str, dict] = field(default_factory=dict)
    prefetch: dict[str, dict] = field(default_factory=dict)
    seq: int = 0

    def ref(self, image: str, variant: str) -> str:
        return f"{self.registry.host}/ws/{image}:{TAGS[variant]}"

    def config_for(self, variant: str) -> Path:
        if variant.endswith("-nobg"):
            return self.service_config.with_name("service-nobg.toml")
        return self.service_config

    def next_base(self, prefix: str) -> Path:
        self.seq += 1
        return self.workdir / f"{prefix}{self.seq}"


def write_hosts(hosts_dir: Path, host: str) -> None:
    """The registry speaks plain HTTP: tell lazypull as containerd's hosts.toml would."""
    directory = hosts_dir / host
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(
        f'server = "http://{host}"\n\n[host."http://{host}"]\n'
        '  capabilities = ["pull", "resolve"]\n')


def convert(setup: Setup, image: str, tag: str, extra: list[str]) -> dict:
    source = f"docker://{setup.registry.host}/ws/{image}:v1"
    destination = f"docker://{setup.registry.host}/ws/{image}:{tag}"
    started = time.perf_counter()
    out = run(lazypull_argv("convert", source, destination, "--plain-http", "--no-cache",
                            "--json", *extra), what=f"lazypull convert -> {tag}")
    report = json.loads(out)
    manifest = report["manifests"][0]
    return {
        "tag": tag,
        "seconds": round(time.perf_counter() - started, 2),
        "manifest_digest": manifest["digest"],
        "compressed_bytes": sum(layer["size"] for layer in manifest["layers"]),
        "hot_files": sum(layer.get("hot_files", 0) for layer in manifest["layers"]),
        "prefetch_bytes": sum(layer.get("prefetch_size") or 0 for layer in manifest["layers"]),
        "missing_hot_files": len(manifest.get("missing_hot_files", [])),
        "layers": [{k: layer.get(k) for k in ("size", "hot_files", "prefetch_size")}
                   for layer in manifest["layers"]],
    }


def profile_export_available() -> bool:
    done = subprocess.run(lazypull_argv("profile", "export", "--help"), capture_output=True,
                          cwd=REPO_ROOT, timeout=120)
    return done.returncode == 0


def lazy_pull(setup: Setup, node: Node, ref: str) -> dict:
    out = run(lazypull_argv("pull", ref, "--address", node.daemon.address, "--namespace",
                            NAMESPACE, "--hosts-dir", str(setup.hosts_dir), "--json"),
              what=f"lazypull pull {ref}")
    return json.loads(out)


def record_profile(setup: Setup, image: WorkspaceImage) -> tuple[Path, dict]:
    """Run the workload once lazily; the service records what it read; export that."""
    ref = setup.ref(image.name, "lazy")
    node = start_node(setup.next_base("rec"), True, setup.service_config)
    out = setup.workdir / f"{image.name}.profile.json"
    try:
        lazy_pull(setup, node, ref)
        run_to_ready(node, ref, f"rec-{image.name}", image.command, "lazypull",
                     time.perf_counter())
        assert node.service is not None
        node.service.stop()  # profiles are written at shutdown at the latest
        run(lazypull_argv("profile", "export", ref, "--root", str(node.service.root),
                          "-o", str(out)), what=f"lazypull profile export {ref}")
    finally:
        stop_node(node)
    doc = json.loads(out.read_text())
    files = [f for entry in doc.get("images", []) for f in entry.get("files", [])]
    return out, {"source": "profile", "file": str(out), "files": len(files),
                 "first_files": [f.get("path") for f in files[:10]]}


def _resolve_in(rootfs: Path, path: str, depth: int = 0) -> str | None:
    """`path` as the image sees it, symlinks followed inside `rootfs`; None if it is
    not a regular file there."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = rootfs.joinpath(*done, part)
        if here.is_symlink():
            if depth > 40:
                return None
            target = os.readlink(here)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                done = []
            depth += 1
            continue
        done.append(part)
    final = rootfs.joinpath(*done)
    return "/" + "/".join(done) if final.is_file() and not final.is_symlink() else None


def strace_prefetch_list(setup: Setup, image: WorkspaceImage) -> tuple[Path, dict]:
    """Run the workload under strace in a chroot of the fully pulled image."""
    ref = setup.ref(image.name, "full-overlayfs")
    node = start_node(setup.next_base("strace"), False, setup.service_config)
    out = setup.workdir / f"{image.name}.prefetch.txt"
    rootfs = node.base / "rootfs"
    mounted: list[Path] = []
    try:
        run(node.ctr("images", "pull", "--plain-http", ref))
        chain = chain_id_of(image)
        run(node.ctr("snapshots", "prepare", "strace-rw", chain))
        rootfs.mkdir()
        run(["sh", "-e", "-c", run(node.ctr("snapshots", "mounts", str(rootfs), "strace-rw"))])
        mounted.append(rootfs)
        for name, how in (("proc", ["-t", "proc", "proc"]), ("dev", ["--rbind", "/dev"])):
            (rootfs / name).mkdir(exist_ok=True)
            run(["mount", *how, str(rootfs / name)])
            mounted.append(rootfs / name)
        trace = node.base / "strace.txt"
        run(["strace", "-f", "-qq", "-e", "trace=openat,execve", "-o", str(trace),
             "chroot", str(rootfs), *image.command], what="strace of the workload")
        seen: dict[str, None] = {}
        started = False  # chroot's own start-up reads the host's files: skip it
        for line in trace.read_text(errors="replace").splitlines():
            if "= -1" in line or '"' not in line or ("openat(" not in line
                                                     and "execve(" not in line):
                continue
            path = line.split('"', 2)[1]
            started = started or ("execve(" in line and path == image.command[0])
            if not started:
                continue
            if not path.startswith("/") or path.startswith(("/proc", "/dev", "/sys")):
                continue
            real = _resolve_in(rootfs, path)
            if real is not None:
                seen.setdefault(real, None)
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        stop_node(node)
    files = [p for p in seen if not p.startswith("/tmp/")]
    out.write_text(f"# files `{' '.join(image.command)}` opened or executed, first access "
                   "order (strace -f -e trace=openat,execve)\n" + "\n".join(files) + "\n")
    return out, {"source": "strace", "file": str(out), "files": len(files),
                 "first_files": files[:10]}


def chain_id_of(image: WorkspaceImage) -> str:
    import hashlib
    blobs = image.layout / "blobs" / "sha256"
    manifest = json.loads((blobs / image.manifest_digest.split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    chain = ""
    for diff_id in config["rootfs"]["diff_ids"]:
        chain = diff_id if not chain else \
            "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


def prepare(setup: Setup, names: list[str], bigfile_bytes: int, source: str) -> None:
    cache = setup.args.cache_dir
    mirror = apt_mirror()
    for name in names:
        setup.images[name] = ensure_image(SPECS[name], cache, mirror, log)
    if bigfile_bytes:
        setup.images["bigfile"] = ensure_bigfile_image(bigfile_bytes, cache, log)
    for name, image in setup.images.items():
        log(f"pushing {name} ({image.compressed_bytes / MB:.1f} MB gzip) ...")
        push(image, setup.registry.host, f"ws/{name}", "v1")
        log(f"converting {name} -> v1-esgz ...")
        setup.conversions[f"{name}:v1-esgz"] = convert(setup, name, "v1-esgz", [])
    for name in names:
        image = setup.images[name]
        if source == "profile":
            log(f"recording an access profile of {name} (one lazy run) ...")
            path, info = record_profile(setup, image)
            extra = ["--prefetch-profile", str(path)]
        else:
            log(f"recording the files {name}'s workload opens (strace) ...")
            path, info = strace_prefetch_list(setup, image)
            extra = ["--prefetch-list", str(path)]
        setup.prefetch[name] = info
        log(f"converting {name} -> v1-esgz-prefetch ({info['files']} files from {source}) ...")
        setup.conversions[f"{name}:v1-esgz-prefetch"] = convert(setup, name, "v1-esgz-prefetch",
                                                                extra)


# -- cold-start samples ----------------------------------------------------------------


@dataclass
class Samples:
    ready_s: list[float] = field(default_factory=list)
    pull_s: list[float] = field(default_factory=list)  # the pull command alone
    pull_inner_s: list[float] = field(default_factory=list)  # lazypull pull's own figure
    exit_s: list[float] = field(default_factory=list)
    wire_bytes: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    layer_sources: set[str] = field(default_factory=set)
    fetched_at_ready: list[dict[str, float]] = field(default_factory=list)  # service counters


def cold_sample(setup: Setup, image: WorkspaceImage, variant: str,
                samples: dict[str, Samples]) -> str:
    lazy = variant != "full-overlayfs"
    ref = setup.ref(image.name, variant)
    node = start_node(setup.next_base("s"), lazy, setup.config_for(variant))
    cid = f"cs{setup.seq}"
    try:
        drop_caches()
        wire0 = setup.path.bytes_to_host()
        started = time.perf_counter()
        if lazy:
            result = lazy_pull(setup, node, ref)
            samples[variant].layer_sources.update(layer["source"] for layer in result["layers"])
            samples[variant].pull_inner_s.append(result["seconds"])
        else:
            run(node.ctr("images", "pull", "--plain-http", ref), what=f"ctr images pull {ref}")
        pulled = time.perf_counter() - started
        at_ready: dict[str, float] = {}
        ready, ended, _ = run_to_ready(node, ref, cid, image.command,
                                       "lazypull" if lazy else None, started,
                                       lambda: at_ready.update(fetch_metrics(node)))
        s = samples[variant]
        if lazy:
            s.fetched_at_ready.append(at_ready)
        s.ready_s.append(ready)
        s.pull_s.append(pulled)
        s.exit_s.append(ended)
        s.wire_bytes.append(setup.path.bytes_to_host() - wire0)
        line = f"READY {ready:6.2f} s (pull {pulled:5.2f} s, {s.wire_bytes[-1] / MB:6.1f} MB)"
        if at_ready:
            line += " at READY: " + fetch_summary(at_ready)
        if not lazy:
            for name, drop in (("local-cold", True), ("local-warm", False)):
                if drop:
                    drop_caches()
                started = time.perf_counter()
                ready, ended, _ = run_to_ready(node, ref, f"{cid}{name[-4:]}", image.command,
                                               None, started)
                samples[name].ready_s.append(ready)
                samples[name].exit_s.append(ended)
                line += f"; {name} {ready:5.2f} s"
        return line
    except Exception as exc:
        message = f"{exc}\n-- containerd log tail --\n{node.daemon.log[-2000:]}"
        if node.service is not None:
            message += f"\n-- service log tail --\n{node.service.log[-3000:]}"
        samples[variant].errors.append(message)
        return f"FAILED: {str(exc).splitlines()[0][:200]}"
    finally:
        stop_node(node)


def schedule(names: list[str], variants: list[str],
             repeat: int) -> Iterator[tuple[int, str, str]]:
    for rep in range(repeat):
        order = variants if rep % 2 == 0 else variants[::-1]
        for name in names:
            for variant in order:
                yield rep, name, variant


def measure_cold(setup: Setup, names: list[str], variants: list[str],
                 repeat: int) -> dict[str, dict[str, Samples]]:
    derived = list(DERIVED) if "full-overlayfs" in variants else []
    samples = {n: {v: Samples() for v in [*variants, *derived]} for n in names}
    for rep, name, variant in schedule(names, variants, repeat):
        line = cold_sample(setup, setup.images[name], variant, samples[name])
        log(f"  rep {rep + 1}/{repeat}  {name:<7} {variant:<15} {line}")
    return samples


# -- warm read throughput ---------------------------------------------------------------


def read_file(path: Path) -> tuple[float, int]:
    buffer = bytearray(MIB)
    view = memoryview(buffer)
    total = 0
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return time.perf_counter() - started, total


def mount_view(node: Node, snapshotter: str, key: str, parent: str, target: Path) -> None:
    run(node.ctr("snapshots", "--snapshotter", snapshotter, "view", key, parent))
    target.mkdir(parents=True)
    commands = run(node.ctr("snapshots", "--snapshotter", snapshotter, "mounts", str(target),
                            key))
    run(["sh", "-e", "-c", commands])


def measure_throughput(setup: Setup, warm_reads: int) -> dict:
    image = setup.images["bigfile"]
    setup.path.unshape()
    node = start_node(setup.next_base("tp"), True, setup.service_config)
    try:
        native_ref = f"{setup.registry.host}/ws/bigfile:v1"
        lazy_ref = f"{setup.registry.host}/ws/bigfile:v1-esgz"
        run(node.ctr("images", "pull", "--plain-http", native_ref))
        result = lazy_pull(setup, node, lazy_ref)
        targets = {"native-overlayfs": node.base / "native", "lazy-fuse": node.base / "lazy"}
        mount_view(node, "overlayfs", "tp-native", chain_id_of(image),
                   targets["native-overlayfs"])
        mount_view(node, "lazypull", "tp-lazy", result["chain_id"], targets["lazy-fuse"])
        files = {k: v / "data" / "big.bin" for k, v in targets.items()}
        cold: dict[str, dict] = {"first": {}, "reread": {}}
        # first: nothing in the page cache (lazy: nothing fetched, unless the background
        # fetch got there first); reread: page cache dropped again, so native reads the
        # disk and lazy is served by the service from its chunk cache.
        for phase in ("first", "reread"):
            drop_caches()
            for name, path in files.items():
                before = fetch_metrics(node) if name == "lazy-fuse" else {}
                seconds, size = read_file(path)
                after = fetch_metrics(node) if name == "lazy-fuse" else {}
                cold[phase][name] = {
                    "seconds": round(seconds, 3), "bytes": size,
                    "mb_per_s": round(size / MB / seconds, 1),
                    "service_counters_during_read": _delta(after, before)}
                log(f"  {phase:<6} read {name:<17} {size / MB:7.1f} MB in {seconds:6.2f} s "
                    f"({size / MB / seconds:7.1f} MB/s)"
                    + (f" {_delta(after, before)}" if after else ""))
        first = cold["first"]
        warm: dict[str, list[float]] = {k: [] for k in files}
        names = list(files)
        before = fetch_metrics(node)
        for i in range(warm_reads):
            for name in names if i % 2 == 0 else names[::-1]:
                seconds, size = read_file(files[name])
                warm[name].append(size / MB / seconds)
        during_warm = _delta(fetch_metrics(node), before)
        log(f"  service counters during the warm reads: {during_warm}")
        medians = {k: statistics.median(v) for k, v in warm.items()}
        for name, value in medians.items():
            log(f"  warm reads  {name:<17} median {value:8.1f} MB/s "
                f"({', '.join(f'{x:.0f}' for x in warm[name])})")
        return {
            "file_bytes": first["native-overlayfs"]["bytes"],
            "image": image.to_json(),
            "link": "unshaped (forwarder without delay, no tbf)",
            "first_read": first,
            "reread_page_cache_dropped": cold["reread"],
            "warm_mb_per_s": {k: [round(x, 1) for x in v] for k, v in warm.items()},
            "service_counters_during_warm_reads": during_warm,
            "warm_median_mb_per_s": {k: round(v, 1) for k, v in medians.items()},
            "warm_ratio_lazy_over_native": round(medians["lazy-fuse"]
                                                 / medians["native-overlayfs"], 3),
        }
    finally:
        stop_node(node)


# -- report ------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(samples: dict[str, dict[str, Samples]]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for name, by_variant in samples.items():
        full = _median(by_variant["full-overlayfs"].ready_s) if "full-overlayfs" in by_variant \
            else None
        floor = _median(by_variant["local-cold"].ready_s) if "local-cold" in by_variant else None
        out[name] = {}
        for variant, s in by_variant.items():
            ready = _median(s.ready_s)
            out[name][variant] = {
                "label": LABELS[variant],
                "runs": len(s.ready_s),
                "failed": len(s.errors),
                "median_ready_s": ready,
                "min_ready_s": min(s.ready_s) if s.ready_s else None,
                "max_ready_s": max(s.ready_s) if s.ready_s else None,
                "median_pull_s": _median(s.pull_s),
                "median_pull_reported_s": _median(s.pull_inner_s),
                "median_exit_s": _median(s.exit_s),
                "median_wire_bytes": _median([float(b) for b in s.wire_bytes]),
                "speedup_vs_full": full / ready if full and ready else None,
                "times_local_cold": ready / floor if floor and ready else None,
                "layer_sources": sorted(s.layer_sources),
                "service_fetch_counters_at_ready": s.fetched_at_ready,
                "median_service_fetched_bytes_at_ready": _median(
                    [sum(v for k, v in c.items() if k.endswith("_bytes"))
                     for c in s.fetched_at_ready]),
                "ready_s": [round(x, 3) for x in s.ready_s],
                "pull_s": [round(x, 3) for x in s.pull_s],
                "pull_reported_s": s.pull_inner_s,
                "wire_bytes": s.wire_bytes,
                "errors": s.errors,
            }
    return out


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def cold_table(summary: dict[str, dict[str, dict]]) -> str:
    rows = [["image variant", "READY s", "min-max s", "pull s", "MB wire", "svc MB@READY",
             "full / this", "this / local-cold", "runs"]]
    for name, by_variant in summary.items():
        for variant, s in by_variant.items():
            wire = s["median_wire_bytes"]
            rows.append([
                f"{name} {variant}",
                _f(s["median_ready_s"], ".2f"),
                f"{_f(s['min_ready_s'], '.2f')}-{_f(s['max_ready_s'], '.2f')}",
                _f(s["median_pull_s"], ".2f"),
                _f(wire / MB if wire is not None else None, ".1f"),
                _f(s["median_service_fetched_bytes_at_ready"] / MB
                   if s["median_service_fetched_bytes_at_ready"] is not None else None, ".1f"),
                _f(s["speedup_vs_full"], ".2f"),
                _f(s["times_local_cold"], ".1f"),
                f"{s['runs']}" + (f" ({s['failed']} failed)" if s["failed"] else ""),
            ])
    return "\n".join(_table(rows))


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [_row(r, widths) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _dirty_files() -> int | None:
    done = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"],
                          capture_output=True, text=True)
    return len(done.stdout.splitlines()) if done.returncode == 0 else None


def environment() -> dict[str, object]:
    import platform
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "containerd": _first_line(["containerd", "--version"]),
        "runc": _first_line(["runc", "--version"]),
        "docker_registry": _first_line(["docker-registry", "--version"]),
        "umoci": _first_line(["umoci", "--version"]),
        "git_commit": _first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"]),
        "git_dirty_files": _dirty_files(),
    }


def print_report(setup: Setup, summary: dict, throughput: dict | None, repeat: int) -> None:
    args = setup.args
    print(f"registry behind {args.rate} (tbf, both ways) + {args.delay_ms:g} ms one-way delay "
          "(AF_PACKET forwarder); fresh containerd (+ service) and dropped page cache per run")
    for name in summary:
        image = setup.images[name]
        print(f"{name}: {len(image.layers)} layers, {image.compressed_bytes / MB:.1f} MB gzip, "
              f"{image.uncompressed_bytes / MB:.1f} MB tar; {image.workload}")
        for tag in ("v1-esgz", "v1-esgz-prefetch"):
            c = setup.conversions[f"{name}:{tag}"]
            print(f"  {tag:<17} {c['compressed_bytes'] / MB:6.1f} MB, {c['hot_files']} hot "
                  f"files, prefetch region {c['prefetch_bytes'] / MB:.1f} MB")
        p = setup.prefetch[name]
        print(f"  prefetch files from {p['source']}: {p['files']} files")
    print(f"median of {repeat} runs, interleaved; READY s = pull start to the READY line; "
          "MB wire = bytes the registry side sent (with headers); MB = 10^6 bytes")
    print()
    print(cold_table(summary))
    if throughput:
        print()
        print(f"read of a {throughput['file_bytes'] / MIB:.0f} MiB file through the image's "
              f"overlay view, link unshaped: warm page cache (median of {args.warm_reads}); "
              "first read (page cache cold, lazy: fetched); reread with the page cache "
              "dropped (lazy: from the service's chunk cache)")
        first, warm = throughput["first_read"], throughput["warm_median_mb_per_s"]
        reread = throughput["reread_page_cache_dropped"]
        rows = [["path", "warm MB/s", "first read MB/s", "reread, cache dropped MB/s"]]
        for name in warm:
            rows.append([name, f"{warm[name]:.1f}", f"{first[name]['mb_per_s']:.1f}",
                         f"{reread[name]['mb_per_s']:.1f}"])
        print("\n".join(_table(rows)))
        print(f"lazy-fuse / native-overlayfs (warm): "
              f"{throughput['warm_ratio_lazy_over_native']:.3f}")
    failures = [(n, v, e) for n, by in summary.items() for v, s in by.items()
                for e in s["errors"]]
    for name, variant, error in failures:
        print(f"\nFAILED {name} {variant}:\n{error[:2000]}")


# -- entry point -------------------------------------------------------------------------


def add_shaped_link_arguments(parser: argparse.ArgumentParser, default_json: Path) -> None:
    """The options every shaped-link benchmark takes: the link, the prefetch source,
    the service's config, where things are kept."""
    parser.add_argument("--rate", default="100mbit", help="tbf rate (default: 100mbit)")
    parser.add_argument("--delay-ms", type=float, default=20.0,
                        help="one-way delay in ms (default: 20)")
    parser.add_argument("--prefetch-source", choices=("auto", "profile", "strace"),
                        default="auto", help="where the prefetched files come from "
                        "(default: auto = profile if `lazypull profile export` exists)")
    parser.add_argument("--service-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a line added to the snapshotter service's TOML config, e.g. "
                             "'background_fetch = false' (repeatable; default: none, so "
                             "the service's defaults apart from hosts_dir)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"built images and .debs (default: {DEFAULT_CACHE})")
    parser.add_argument("--tmpdir", type=Path, default=None,
                        help="where registries and nodes keep their state (default: the "
                             "system temp dir)")
    parser.add_argument("--json", type=Path, default=default_json,
                        help=f"JSON results (default: {default_json})")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m perf cold-start",
        description="Cold start (pull + run to READY) of Debian workspace images over a "
                    "shaped link: full pull with overlayfs against lazy pulling without "
                    "and with prefetch; plus warm read throughput through FUSE vs overlayfs.")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (default: 3)")
    parser.add_argument("--images", default="python,gcc",
                        help=f"comma-separated, of {', '.join(SPECS)} (default: python,gcc)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, of {', '.join(TIMED)} (default: all); "
                             "local-cold/-warm come with full-overlayfs")
    parser.add_argument("--bigfile-mib", type=int, default=256,
                        help="size of the file for the read-throughput test; 0 skips it "
                             "(default: 256)")
    parser.add_argument("--warm-reads", type=int, default=5,
                        help="warm reads per path (default: 5)")
    add_shaped_link_arguments(parser, DEFAULT_JSON)
    args = parser.parse_args(argv)
    args.image_names = [n.strip() for n in args.images.split(",") if n.strip()]
    unknown = [n for n in args.image_names if n not in SPECS]
    if unknown or not args.image_names:
        parser.error(f"unknown image(s) {', '.join(unknown)}; known: {', '.join(SPECS)}")
    args.variant_names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_names if v not in TIMED]
    if unknown or not args.variant_names:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(TIMED)}")
    if args.repeat < 1 or args.warm_reads < 1 or args.bigfile_mib < 0 or args.delay_ms < 0:
        parser.error("--repeat and --warm-reads must be positive, sizes and delays not "
                     "negative")
    return args


def machine_problem(benchmark: str) -> str | None:
    """Why this machine cannot run a shaped-link benchmark, or None."""
    if os.geteuid() != 0:
        return f"{benchmark} needs root (namespaces, tc, mounts, drop_caches)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt-get install them)"
    return None


def prefetch_source(choice: str) -> str:
    source = choice
    if source == "auto":
        source = "profile" if profile_export_available() else "strace"
    log(f"prefetch files from: {source}")
    return source


@contextlib.contextmanager
def shaped_registry(args: argparse.Namespace, workdir: Path) -> Iterator[Setup]:
    """The registry in its namespace behind the path (not shaped yet: see ShapedPath.shape),
    its hosts.toml and the service's base config (hosts_dir + --service-option lines).
    Everything is stopped and deleted on the way out."""
    path = ShapedPath(args.rate, args.delay_ms, workdir)
    path.open()
    registry = None
    try:
        registry = start_registry_in_namespace(workdir / "registry", path.registry_address)
        hosts_dir = workdir / "hosts"
        write_hosts(hosts_dir, registry.host)
        service_config = workdir / "service.toml"
        service_config.write_text(f'hosts_dir = "{hosts_dir}"\n'
                                  + "".join(f"{line}\n" for line in args.service_option))
        yield Setup(args, workdir, path, registry, hosts_dir, service_config)
    finally:
        if registry is not None:
            registry.stop()
        path.close()
        remove_cgroups()


def network_method(args: argparse.Namespace) -> dict[str, object]:
    return {"rate": args.rate, "one_way_delay_ms": args.delay_ms,
            "how": "registry in its own netns; veth pairs through a netns that "
                   "holds every frame (AF_PACKET, PACKET_VNET_HDR) for the delay; "
                   "tbf at the rate on both sides (burst 128kb, latency "
                   f"{max(20.0, 2 * args.delay_ms):g}ms)"}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    problem = machine_problem("cold-start")
    if problem:
        print(problem, file=sys.stderr)
        return 1
    source = prefetch_source(args.prefetch_source)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lazypull-perf-cold-", dir=args.tmpdir) as tmp, \
            shaped_registry(args, Path(tmp)) as setup:
        service_config_text = setup.service_config.read_text()
        setup.service_config.with_name("service-nobg.toml").write_text(
            service_config_text + "background_fetch = false\n")
        prepare(setup, args.image_names, args.bigfile_mib * MIB, source)
        setup_s = time.monotonic() - started
        log(f"set-up done in {setup_s:.0f} s; shaping the link: {args.rate}, "
            f"{args.delay_ms:g} ms one way")
        setup.path.shape()
        samples = measure_cold(setup, args.image_names, args.variant_names, args.repeat)
        throughput = None
        if args.bigfile_mib:
            log("warm read throughput (link unshaped) ...")
            throughput = measure_throughput(setup, args.warm_reads)
    summary = summarize(samples)
    data = {
        "benchmark": "cold-start",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        "method": {
            "repeat": args.repeat,
            "network": network_method(args),
            "per_run": "fresh containerd root/state (and snapshotter service root, chunk "
                       "cache) per sample; sync + drop_caches before the timed pull",
            "timing": "from the start of the pull command to the READY line on ctr run's "
                      "stdout",
            "order": "interleaved; variants forward on even repetitions, reversed on odd",
            "prefetch_source": source,
            "service_config": service_config_text,
            "service": "python -m cli.main snapshotter --config FILE --log-level info; "
                       "options not in service_config at their defaults",
            "wire_bytes": "tbf 'Sent' counter on the registry side's veth (frames)",
            "setup_seconds": round(setup_s, 1),
        },
        "images": {n: setup.images[n].to_json() for n in args.image_names},
        "conversions": setup.conversions,
        "prefetch": setup.prefetch,
        "results": summary,
        "throughput": throughput,
    }
    print_report(setup, summary, throughput, args.repeat)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nresults: {args.json} (whole run {time.monotonic() - started:.0f} s)")
    return 0
