"""Snapshotter throughput and latency through containerd: lazypull's proxy plugin
against containerd's native overlay snapshotter, in the same daemon and the same run.

One private containerd 1.6 (tests/fixtures/containerd.py: own root, state and socket,
CRI off) is started with lazypull's snapshotter service (`python -m cli.main
snapshotter`, log level info) loaded as the proxy plugin "lazypull", as in
manifests/containerd/proxy-plugin.toml. Both snapshotters keep their state under the
same temporary directory, so on the same filesystem.

The load is perf/snapshotter-bench, a small Go program built here, offline, against
containerd 1.6's Go sources. It uses containerd's own client (containerd.New +
Client.SnapshotService), so every call crosses containerd's gRPC API and its metadata
layer (a bbolt transaction per change, in a lease) before it reaches the snapshotter:
the overlay snapshotter in the daemon's process, or lazypull over a unix socket. One
sample is one run of the program: a few untimed warm-up iterations, then N timed
iterations, one call at a time, of

    Prepare(active_i, parent) -> Mounts(active_i) -> Commit(layer_i, active_i)

with parent "" (flat) or the previous layer (chain: snapshot i sits i layers deep, so
Mounts lists i lower directories). Afterwards, untimed, it removes what it made,
children first, and runs a synchronous garbage collection, so each sample starts on
an empty snapshotter (checked: both snapshot directories must be empty afterwards).
The program records the CPU time of containerd, of the service and of itself during
the timed loop only.

Samples run interleaved, forward on even repetitions and reversed on odd ones, as in
perf/convert_throughput.py. Reported: medians over repetitions of iterations/s and of
each run's per-call p50/p99 latency, and the ratios lazypull / overlayfs. Nothing is
asserted. Everything stays on this machine (unix sockets only).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from perf.machine import describe, first_line, text_table
from tests.fixtures.containerd import Containerd, start_containerd, stop_containerd
from tests.fixtures.snapshotter import SnapshotterProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
GO_SOURCE = Path(__file__).parent / "snapshotter-bench"
GOPATH = "/usr/share/gocode"
DEFAULT_JSON = Path(__file__).parent / "results" / "snapshotter.json"
PROXY_NAME = "lazypull"
NATIVE_NAME = "overlayfs"
OPS = ("iteration", "prepare", "mounts", "commit")
MODES = ("flat", "chain")
RUN_TIMEOUT = 3600
PROXY_CONFIG = """
[proxy_plugins]
  [proxy_plugins.{name}]
    type = "snapshot"
    address = "{address}"
"""


@dataclass(frozen=True)
class Variant:
    snapshotter: str
    mode: str

    @property
    def name(self) -> str:
        return f"{self.snapshotter}-{self.mode}"

    @property
    def baseline(self) -> bool:
        return self.snapshotter == NATIVE_NAME


@dataclass
class Samples:
    runs: list[dict] = field(default_factory=list)  # the Go program's JSON, one per run

    def values(self, pick: Callable[[dict], float]) -> list[float]:
        return [pick(r) for r in self.runs]


@dataclass(frozen=True)
class Summary:
    name: str
    snapshotter: str
    mode: str
    iterations: int
    iterations_per_s: float  # median over runs
    min_iterations_per_s: float
    max_iterations_per_s: float
    # Median over runs of each run's percentile, in ms, by call: iteration (the three
    # calls together), prepare, mounts, commit.
    p50_ms: dict[str, float]
    p99_ms: dict[str, float]
    iteration_p50_ms_first_tenth: float
    iteration_p50_ms_last_tenth: float
    cpu_ms_per_iteration: dict[str, float]  # by process: client, containerd, service
    last_mount: str
    iterations_per_s_runs: list[float]


@dataclass
class Setup:
    binary: Path
    daemon: Containerd
    service: SnapshotterProcess
    native_dir: Path
    args: argparse.Namespace


# -- building and starting ----------------------------------------------------


def go_env(cache: Path) -> dict[str, str]:
    """Offline GOPATH-mode build against Debian's containerd 1.6 sources."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GO", "CGO_"))}
    env.update(GO111MODULE="off", GOPATH=GOPATH, GOPROXY="off", GOFLAGS="", GOENV="off",
               GOCACHE=str(cache), CGO_ENABLED="0")
    return env


def build_bench(workdir: Path) -> Path:
    go = shutil.which("go")
    if go is None:
        raise SystemExit("the Go toolchain is missing (Debian: golang-go)")
    if not Path(GOPATH, "src/github.com/containerd/containerd/client.go").is_file():
        raise SystemExit(f"containerd's Go sources are missing from {GOPATH} "
                         "(Debian: golang-github-containerd-containerd-dev)")
    binary = workdir / "snapshotter-bench"
    done = subprocess.run([go, "build", "-o", str(binary), "."], cwd=GO_SOURCE,
                          env=go_env(workdir / "gocache"), capture_output=True, text=True,
                          timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"go build in {GO_SOURCE} failed:\n{done.stdout}{done.stderr}")
    return binary


def start(workdir: Path, binary: Path, args: argparse.Namespace) -> Setup:
    """The service first (containerd connects to a proxy plugin lazily, but a socket
    that answers from the start keeps the first call honest), then containerd."""
    base = workdir / "sn"
    base.mkdir()
    service = SnapshotterProcess(root=base / "root", address=str(base / "s.sock"),
                                 log_path=base / "service.log",
                                 extra_args=("--log-level", "info"))  # the fixture's is debug
    service.start()
    try:
        daemon = start_containerd(workdir / "ctrd", PROXY_CONFIG.format(
            name=PROXY_NAME, address=service.address))
    except BaseException:
        service.stop()
        raise
    native_dir = daemon.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
    return Setup(binary, daemon, service, native_dir, args)


def stop(setup: Setup) -> None:
    """By PID: containerd first (it holds the proxy connection), then the service."""
    try:
        stop_containerd(setup.daemon)
    finally:
        setup.service.stop()


def check_plugins(daemon: Containerd) -> None:
    listed = daemon.ctr("plugins", "ls").stdout
    for name in (NATIVE_NAME, PROXY_NAME):
        rows = [line.split() for line in listed.splitlines()]
        if not any(len(r) >= 4 and r[0] == "io.containerd.snapshotter.v1" and r[1] == name
                   and r[-1] == "ok" for r in rows):
            raise SystemExit(f"containerd has no working snapshotter {name!r}:\n{listed}")


# -- measuring ----------------------------------------------------------------


def variants(modes: list[str]) -> list[Variant]:
    return [Variant(sn, mode) for mode in modes for sn in (NATIVE_NAME, PROXY_NAME)]


def schedule(found: list[Variant], repeat: int) -> Iterator[tuple[int, Variant]]:
    for rep in range(repeat):
        for variant in found if rep % 2 == 0 else found[::-1]:
            yield rep, variant


def leftovers(setup: Setup) -> dict[str, int]:
    """Snapshot directories still on disk: both must be empty between samples."""
    ours = Path(setup.service.root) / "snapshots"
    return {NATIVE_NAME: len(os.listdir(setup.native_dir)) if setup.native_dir.exists() else 0,
            PROXY_NAME: len(os.listdir(ours)) if ours.exists() else 0}


def run_once(setup: Setup, variant: Variant, rep: int) -> dict:
    args = setup.args
    assert setup.service.process is not None
    command = [
        str(setup.binary), "-address", setup.daemon.address, "-snapshotter", variant.snapshotter,
        "-mode", variant.mode, "-n", str(args.iterations), "-warmup", str(args.warmup),
        "-chain-depth", str(args.chain_depth), "-namespace", f"bench-{rep}-{variant.name}",
        "-cpu-pid", f"containerd={setup.daemon.process.pid}",
        "-cpu-pid", f"service={setup.service.process.pid}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n"
                           f"{done.stderr[-4000:]}\nservice log:\n{setup.service.log[-3000:]}")
    left = leftovers(setup)
    if any(left.values()):
        raise RuntimeError(f"snapshots left on disk after {variant.name}: {left}")
    return json.loads(done.stdout)


def measure(setup: Setup, found: list[Variant], repeat: int) -> dict[str, Samples]:
    samples = {v.name: Samples() for v in found}
    for rep, variant in schedule(found, repeat):
        run = run_once(setup, variant, rep)
        samples[variant.name].runs.append(run)
        it = run["ops"]["iteration"]
        print(f"  rep {rep + 1}/{repeat}  {variant.name:<16} {run['iterations_per_s']:8.1f} it/s"
              f"  p50 {it['p50_ms']:6.2f} ms  p99 {it['p99_ms']:6.2f} ms"
              f"  (cleanup {run['cleanup_s']:.1f} s)", file=sys.stderr)
    return samples


# -- summarizing --------------------------------------------------------------


def summarize(found: list[Variant], samples: dict[str, Samples]) -> list[Summary]:
    out = []
    for v in found:
        s = samples[v.name]
        ips = s.values(lambda r: r["iterations_per_s"])
        cpu_names = sorted(s.runs[0]["cpu_s"])
        last = s.runs[-1]
        out.append(Summary(
            name=v.name,
            snapshotter=v.snapshotter,
            mode=v.mode,
            iterations=last["iterations"],
            iterations_per_s=statistics.median(ips),
            min_iterations_per_s=min(ips),
            max_iterations_per_s=max(ips),
            p50_ms={op: statistics.median(s.values(lambda r, op=op: r["ops"][op]["p50_ms"]))
                    for op in OPS},
            p99_ms={op: statistics.median(s.values(lambda r, op=op: r["ops"][op]["p99_ms"]))
                    for op in OPS},
            iteration_p50_ms_first_tenth=statistics.median(
                s.values(lambda r: r["iteration_p50_ms_first_tenth"])),
            iteration_p50_ms_last_tenth=statistics.median(
                s.values(lambda r: r["iteration_p50_ms_last_tenth"])),
            cpu_ms_per_iteration={
                name: statistics.median(
                    s.values(lambda r, name=name: 1000 * r["cpu_s"][name] / r["iterations"]))
                for name in cpu_names},
            last_mount=f"{last['last_mount_type']} ({last['last_mount_options_bytes']} B options)",
            iterations_per_s_runs=ips,
        ))
    return out


def ratios(summaries: list[Summary]) -> dict[str, dict[str, float]]:
    """By mode: lazypull / overlayfs for throughput and for every latency percentile
    (throughput below 1 and latency above 1 both mean lazypull is slower)."""
    by = {(s.snapshotter, s.mode): s for s in summaries}
    out: dict[str, dict[str, float]] = {}
    for mode in dict.fromkeys(s.mode for s in summaries):
        ours, base = by[(PROXY_NAME, mode)], by[(NATIVE_NAME, mode)]
        r = {"iterations_per_s": ours.iterations_per_s / base.iterations_per_s}
        for op in OPS:
            r[f"{op}_p50"] = ours.p50_ms[op] / base.p50_ms[op]
            r[f"{op}_p99"] = ours.p99_ms[op] / base.p99_ms[op]
        out[mode] = r
    return out


def table(summaries: list[Summary], ratio: dict[str, dict[str, float]]) -> str:
    head = ["variant", "it/s", "min-max it/s"]
    for op in OPS:
        short = "iter" if op == "iteration" else op
        head += [f"{short} p50", f"{short} p99"]
    rows = [head]
    for s in summaries:
        row = [s.name, f"{s.iterations_per_s:.1f}",
               f"{s.min_iterations_per_s:.1f}-{s.max_iterations_per_s:.1f}"]
        for op in OPS:
            row += [f"{s.p50_ms[op]:.2f}", f"{s.p99_ms[op]:.2f}"]
        rows.append(row)
    lines = ["latencies in ms (median over runs of each run's percentile)", *text_table(rows), ""]

    names = sorted({n for s in summaries for n in s.cpu_ms_per_iteration})
    rows = [["variant", *[f"CPU ms/it {n}" for n in names], "iter p50 first 10%",
             "iter p50 last 10%", "last Mounts"]]
    for s in summaries:
        rows.append([s.name, *[f"{s.cpu_ms_per_iteration[n]:.2f}" for n in names],
                     f"{s.iteration_p50_ms_first_tenth:.2f}",
                     f"{s.iteration_p50_ms_last_tenth:.2f}", s.last_mount])
    lines += [*text_table(rows), ""]

    head = ["lazypull / overlayfs", "it/s"]
    for op in OPS:
        short = "iter" if op == "iteration" else op
        head += [f"{short} p50", f"{short} p99"]
    rows = [head]
    for mode, r in ratio.items():
        row = [mode, f"{r['iterations_per_s']:.2f}"]
        for op in OPS:
            row += [f"{r[f'{op}_p50']:.2f}", f"{r[f'{op}_p99']:.2f}"]
        rows.append(row)
    lines += text_table(rows)
    return "\n".join(lines)


# -- report -------------------------------------------------------------------


def environment() -> dict[str, object]:
    return describe("containerd", go=["go", "version"])


def report(args: argparse.Namespace, summaries: list[Summary], ratio: dict,
           samples: dict[str, Samples], filesystem: str | None,
           started_s: float) -> dict[str, object]:
    return {
        "benchmark": "snapshotter",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        "method": {
            "iterations": args.iterations,
            "warmup_iterations": args.warmup,
            "repeat": args.repeat,
            "modes": args.modes,
            "chain_depth": args.chain_depth or "one chain of all iterations",
            "iteration": "Prepare(active_i, parent) -> Mounts(active_i) -> "
                         "Commit(layer_i, active_i), one call at a time",
            "client": "perf/snapshotter-bench (containerd 1.6 Go client, "
                      "Client.SnapshotService), one lease per run",
            "path": {NATIVE_NAME: "containerd API -> metadata (bbolt) -> overlay in-process",
                     PROXY_NAME: "containerd API -> metadata (bbolt) -> proxy gRPC over a "
                                 "unix socket -> python -m cli.main snapshotter"},
            "order": "interleaved; forward on even repetitions, reversed on odd",
            "statistic": "median over runs of iterations/s and of each run's p50/p99",
            "cpu": "user+system CPU during the timed loop, /proc/PID/stat (10 ms ticks)",
            "cleanup": "untimed: removes children first, synchronous GC, namespace deleted",
            "filesystem": filesystem,
        },
        "variants": [asdict(s) for s in summaries],
        "lazypull_over_overlayfs": ratio,
        "runs": {name: s.runs for name, s in samples.items()},  # the Go program's output
        "wall_s": time.monotonic() - started_s,
    }


def print_report(args: argparse.Namespace, summaries: list[Summary], ratio: dict,
                 filesystem: str | None) -> None:
    print(f"{args.iterations} x Prepare -> Mounts -> Commit per run (after {args.warmup} "
          "untimed), one call at a time, through containerd's API")
    print(f"median of {args.repeat} runs per variant, interleaved in alternating order")
    chain = f"new chain every {args.chain_depth}" if args.chain_depth else "one chain"
    print(f"flat: no parents; chain: each parent is the previous layer ({chain}); "
          f"state on {filesystem or '?'}")
    print(f"{NATIVE_NAME}: containerd's native overlay snapshotter; {PROXY_NAME}: our service "
          "as a proxy plugin")
    print()
    print(table(summaries, ratio))
    print()
    print("ratio = lazypull / overlayfs: it/s below 1 and latency above 1 mean lazypull "
          "is slower")


def _filesystem(path: Path) -> str | None:
    out = first_line(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(path)])
    return " ".join(out.split()) if out else None


# -- entry point --------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m perf snapshotter",
        description="Prepare+Mounts+Commit through containerd: lazypull's proxy snapshotter "
                    "against containerd's native overlayfs, in the same run.")
    parser.add_argument("--iterations", "-n", type=int, default=1000,
                        help="timed iterations per run (default: 1000)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed iterations before each run (default: 10)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (default: 3)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="flat, chain or both (default: both)")
    parser.add_argument("--chain-depth", type=int, default=0,
                        help="chain mode: start a new chain every D iterations "
                             "(default 0: one chain of all iterations)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help=f"where to write the JSON results (default: {DEFAULT_JSON})")
    parser.add_argument("--tmpdir", type=Path, default=None,
                        help="where containerd's and the service's state goes "
                             "(default: the system temp dir; keep the path short)")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.repeat < 1 or args.warmup < 0 or args.chain_depth < 0:
        parser.error("--iterations and --repeat must be positive, --warmup and "
                     "--chain-depth not negative")
    args.modes = list(dict.fromkeys(args.modes))
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("containerd needs root: run as root", file=sys.stderr)
        return 2
    started = time.monotonic()
    found = variants(args.modes)
    with tempfile.TemporaryDirectory(prefix="lzp-sn-", dir=args.tmpdir) as tmp:
        workdir = Path(tmp)
        print(f"building perf/snapshotter-bench in {workdir} ...", file=sys.stderr)
        binary = build_bench(workdir)
        setup = start(workdir, binary, args)
        try:
            check_plugins(setup.daemon)
            filesystem = _filesystem(workdir)
            samples = measure(setup, found, args.repeat)
        finally:
            stop(setup)
    summaries = summarize(found, samples)
    ratio = ratios(summaries)
    data = report(args, summaries, ratio, samples, filesystem, started)
    print_report(args, summaries, ratio, filesystem)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nresults: {args.json}")
    return 0
