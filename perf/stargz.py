"""stargz-snapshotter 0.12 as a comparator in the cold-start benchmark.

The comparator (`shared/comparators/stargz/` beside the checkout, see its README) is
built offline from Debian's Go sources with its `build.sh` into the benchmark's cache,
once per version of its sources, and gives three programs:

- `stargz-anchor`: stargz-snapshotter's filesystem and snapshotter (upstream default
  config: prefetch and background fetch on) served as containerd's snapshots API on a
  unix socket, for a `[proxy_plugins.stargz]` entry; its Prometheus metrics on a port;
- `rpull-anchor`: pulls like `ctr-remote rpull` (stargz and CRI remote-snapshot labels),
  prints its own pull time;
- `ctr-remote`: stock `image optimize` (the workload runs once, what it reads goes to
  the front of each layer with a prefetch landmark) and `image optimize --no-optimize`.

Everything runs as a child process stopped by its PID.
"""

import hashlib
import os
import re
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from perf.processes import stop_process

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "comparators" / "stargz"
PROGRAMS = ("stargz-anchor", "rpull-anchor", "ctr-remote")
BUILD_TIMEOUT = 1800
START_TIMEOUT = 30.0
PROXY_NAME = "stargz"
PROXY_CONFIG = """
[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "{address}"
"""
# Go packages the build needs (Debian: golang-go, golang-github-containerd-stargz-
# snapshotter-dev, golang-github-containerd-containerd-dev).
GOPATH = Path("/usr/share/gocode/src")
REQUIRED_SOURCES = ("github.com/containerd/stargz-snapshotter/fs/fs.go",
                    "github.com/containerd/containerd/client.go")
PULLED = re.compile(r" in ([0-9.]+)s$")


@dataclass(frozen=True)
class StargzTools:
    directory: Path
    version: str  # a hash of the comparator's sources

    def program(self, name: str) -> str:
        return str(self.directory / name)


def toolchain_problem(source: Path = DEFAULT_SOURCE) -> str | None:
    """Why the comparator cannot be built here, or None."""
    if not (source / "build.sh").is_file():
        return f"no comparator sources at {source} (expected build.sh there)"
    if not any((Path(d) / "go").exists() for d in os.environ.get("PATH", "").split(":")):
        return "no Go toolchain (apt-get install golang-go)"
    missing = [p for p in REQUIRED_SOURCES if not (GOPATH / p).is_file()]
    if missing:
        return (f"missing Go sources {', '.join(missing)} (apt-get install "
                "golang-github-containerd-stargz-snapshotter-dev "
                "golang-github-containerd-containerd-dev)")
    return None


def _sources_key(source: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def ensure_built(cache: Path, source: Path = DEFAULT_SOURCE, log=print) -> StargzTools:
    """The comparator's programs, built with its build.sh unless this version of its
    sources was built into `cache` before."""
    problem = toolchain_problem(source)
    if problem:
        raise RuntimeError(f"stargz-snapshotter comparator: {problem}")
    key = _sources_key(source)
    out = cache / "comparators" / f"stargz-{key}"
    if all((out / p).is_file() for p in PROGRAMS):
        return StargzTools(out, key)
    log(f"building the stargz-snapshotter comparator into {out} (minutes) ...")
    out.mkdir(parents=True, exist_ok=True)
    # Go needs a build cache; a CI environment may have no HOME to put it under
    env = {**os.environ, "GOCACHE": os.environ.get("GOCACHE") or str(out / ".gocache")}
    done = subprocess.run(["sh", str(source / "build.sh"), str(out)], capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT, env=env)
    if done.returncode != 0 or not all((out / p).is_file() for p in PROGRAMS):
        raise RuntimeError(f"{source / 'build.sh'} exited {done.returncode}:\n"
                           f"{(done.stderr or done.stdout)[-3000:]}")
    return StargzTools(out, key)


@dataclass
class StargzDaemon:
    tools: StargzTools
    root: Path
    address: str
    log_path: Path
    metrics_port: int
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # --plain-http: the benchmark's registry is plain HTTP on a namespace address
            self.process = subprocess.Popen(
                [self.tools.program("stargz-anchor"), "--address", self.address, "--root",
                 str(self.root), "--metrics-address", f"127.0.0.1:{self.metrics_port}",
                 "--plain-http"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"stargz-anchor exited {self.process.returncode}:\n"
                                   f"{self.log[-2000:]}")
            if Path(self.address).exists():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"stargz-anchor made no socket within {START_TIMEOUT:g}s")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM (it unmounts its FUSE layers on the way out), then SIGKILL."""
        stop_process(self.process, timeout=30)

    def metrics(self) -> dict[str, float]:
        """stargz's own counters, summed over layers: `mount_ms`, `stargz_toc_get_ms`,
        `prefetch_total_ms`, ... (sums of its latency histograms, in milliseconds) and
        `on_demand_bytes_fetched` and the like (its byte gauges)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.metrics_port}/metrics",
                             timeout=10) as response:
                text = response.read().decode()
        except OSError:
            return {}
        return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("stargz_fs_") or "operation_type=\"" not in line:
            continue
        name = line.split("{", 1)[0]
        operation = line.split('operation_type="', 1)[1].split('"', 1)[0]
        value = float(line.rsplit(" ", 1)[1])
        if name == "stargz_fs_operation_duration_milliseconds_sum":
            key = f"{operation}_ms"
        elif name == "stargz_fs_operation_duration_milliseconds_count":
            key = f"{operation}_count"
        elif name in ("stargz_fs_bytes_served", "stargz_fs_operation_count"):
            key = operation
        else:
            continue
        found[key] = found.get(key, 0.0) + value
    return found


def rpull(tools: StargzTools, containerd_address: str, namespace: str, ref: str,
          timeout: float) -> float:
    """Pull `ref` through the stargz snapshotter; the pull time rpull-anchor reports."""
    done = subprocess.run([tools.program("rpull-anchor"), "--address", containerd_address,
                           "--namespace", namespace, "--snapshotter", PROXY_NAME,
                           "--plain-http", ref], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"rpull-anchor {ref} exited {done.returncode}: "
                           f"{(done.stderr or done.stdout)[-2000:]}")
    found = PULLED.search(done.stdout.strip())
    return float(found.group(1)) if found else float("nan")


def ctr_remote(tools: StargzTools, containerd_address: str, namespace: str,
               *args: str) -> list[str]:
    return [tools.program("ctr-remote"), "--address", containerd_address, "--namespace",
            namespace, *args]


def optimize_argv(tools: StargzTools, containerd_address: str, namespace: str, source: str,
                  target: str, command: tuple[str, ...], optimize: bool) -> list[str]:
    """`ctr-remote image optimize` of `source` (already in containerd's content store)
    into `target`: with the workload as entrypoint, or --no-optimize."""
    if optimize:
        workload = ["--entrypoint", _json_array(command[:1]), "--args",
                    _json_array(command[1:]), "--period", "60"]
    else:
        workload = ["--no-optimize"]
    return ctr_remote(tools, containerd_address, namespace, "image", "optimize", "--oci",
                      *workload, source, target)


def _json_array(items: tuple[str, ...]) -> str:
    import json
    return json.dumps(list(items))
