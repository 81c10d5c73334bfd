"""What the shaped-link benchmarks share: the registry in its network namespace,
nodes (a fresh containerd, with lazypull's snapshotter service or stargz-snapshotter as
its proxy snapshotter), `ctr run` timed to the workload's READY line, the service's
counters, and small report helpers. perf/cold_start.py describes the method.
"""

import contextlib
import json
import os
import secrets
import selectors
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from perf.machine import describe
from perf.processes import stop_process
from perf.stargz import PROXY_CONFIG as STARGZ_PROXY_CONFIG
from perf.stargz import StargzDaemon, StargzTools
from snapshotter.pull_protocol import socket_path
from tests.fixtures.containerd import (
    Containerd,
    start_containerd,
    stop_containerd,
    unmount_below,
    with_own_runc_root,
)
from tests.fixtures.snapshotter import SnapshotterProcess, free_tcp_port

REPO_ROOT = Path(__file__).resolve().parent.parent
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


def drop_caches(only_dentries_and_inodes: bool = False) -> None:
    """Drop the page cache and the dentry/inode caches (3), or only the latter (2)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n" if only_dentries_and_inodes else "3\n")


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
        stop_process(self.process)


def start_registry_in_namespace(workdir: Path, namespace: str, address: str) -> Registry:
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
        process = subprocess.Popen(["ip", "netns", "exec", namespace, "docker-registry",
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
    stargz: StargzDaemon | None = None
    events: "TaskEvents | None" = None

    def ctr(self, *args: str) -> list[str]:
        return ["ctr", "--address", self.daemon.address, "--namespace", NAMESPACE,
                *with_own_runc_root(args, self.daemon.runc_root)]


def start_node(base: Path, lazy: bool, service_config: Path,
               stargz_tools: StargzTools | None = None) -> Node:
    """A fresh containerd; with lazypull's service as proxy snapshotter `lazypull` if
    `lazy`, or with stargz-snapshotter as proxy snapshotter `stargz` if `stargz_tools`.
    containerd's task events are watched from the start (see TaskEvents)."""
    base.mkdir(parents=True)
    service = stargz = None
    proxy = ""
    if lazy:
        service = SnapshotterProcess(root=base / "sn", address=str(base / "s.sock"),
                                     log_path=base / "service.log",
                                     metrics_port=free_tcp_port(),
                                     extra_args=("--config", str(service_config),
                                                 "--log-level", "info"))
        service.start()
        proxy = PROXY_CONFIG.format(address=service.address)
    elif stargz_tools is not None:
        stargz = StargzDaemon(stargz_tools, base / "sz", str(base / "sz.sock"),
                              base / "stargz.log", free_tcp_port())
        stargz.start()
        proxy = STARGZ_PROXY_CONFIG.format(address=stargz.address)
    try:
        daemon = start_containerd(base / "c", proxy)
    except BaseException:
        if service:
            service.stop()
        if stargz:
            stargz.stop()
        raise
    daemon.namespace = NAMESPACE
    node = Node(base, daemon, service, stargz)
    node.events = TaskEvents.watch(node)
    return node


class TaskEvents:
    """`ctr events` of a node, read on a thread: when containerd published each topic
    first (wall clock, its own timestamps), for a phase breakdown without touching the
    workload: /tasks/create (rootfs mounted, runc created the container) and
    /tasks/start (the workload's process started)."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.first: dict[str, float] = {}
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    @classmethod
    def watch(cls, node: Node) -> "TaskEvents":
        process = subprocess.Popen(["ctr", "--address", node.daemon.address, "events"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return cls(process)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            words = line.split()
            if len(words) < 6 or not words[5].startswith("/"):
                continue
            with contextlib.suppress(ValueError):
                self.first.setdefault(words[5], parse_go_time(*words[:3]))

    def wait_for(self, topic: str, timeout: float = 5.0) -> float | None:
        deadline = time.monotonic() + timeout
        while topic not in self.first and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.first.get(topic)

    def stop(self) -> None:
        stop_process(self.process, timeout=5)


def parse_go_time(date: str, clock: str, offset: str) -> float:
    """Go's default time format, `2006-01-02 15:04:05.999999999 -0700`, as Unix time."""
    whole, _, fraction = clock.partition(".")
    stamp = datetime.strptime(f"{date} {whole} {offset}", "%Y-%m-%d %H:%M:%S %z")
    return stamp.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


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


def lazy_pull(setup: Any, node: Node, ref: str) -> dict:
    """`lazypull pull --json` into the node; `setup` has the registry's `hosts_dir`."""
    # handed to the node's service, as on a node where the service runs at its default
    assert node.service is not None
    out = run(lazypull_argv("pull", ref, "--address", node.daemon.address, "--namespace",
                            NAMESPACE, "--hosts-dir", str(setup.hosts_dir), "--json",
                            "--service-socket", socket_path(node.service.address)),
              what=f"lazypull pull {ref}")
    return json.loads(out)


def stop_node(node: Node) -> None:
    try:
        if node.events is not None:
            node.events.stop()
        stop_containerd(node.daemon)
    finally:
        if node.service is not None:
            node.service.stop()
        if node.stargz is not None:
            node.stargz.stop()
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


def write_hosts(hosts_dir: Path, host: str) -> None:
    """The registry speaks plain HTTP: tell lazypull as containerd's hosts.toml would."""
    directory = hosts_dir / host
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(
        f'server = "http://{host}"\n\n[host."http://{host}"]\n'
        '  capabilities = ["pull", "resolve"]\n')


def schedule(names: list[str], variants: list[str],
             repeat: int) -> Iterator[tuple[int, str, str]]:
    for rep in range(repeat):
        order = variants if rep % 2 == 0 else variants[::-1]
        for name in names:
            for variant in order:
                yield rep, name, variant


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _dirty_files() -> int | None:
    done = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"],
                          capture_output=True, text=True)
    return len(done.stdout.splitlines()) if done.returncode == 0 else None


def environment() -> dict[str, object]:
    return describe("containerd", "runc", "docker-registry", "umoci") | {
        "git_dirty_files": _dirty_files()}


def machine_problem(benchmark: str) -> str | None:
    """Why this machine cannot run a shaped-link benchmark, or None."""
    if os.geteuid() != 0:
        return f"{benchmark} needs root (namespaces, tc, mounts, drop_caches)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt-get install them)"
    return None


