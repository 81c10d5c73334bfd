"""Warm boot: how long a node takes to warm a workspace image through the snapshotter
service's warm set, against a full pull of the same image, and how the first workspace
start on the warmed node compares with one where the image is fully local.

Network, registry and images as in perf/cold_start.py (set-up in perf/cold_setup.py): the
registry in its own network namespace behind tbf at RATE and a forwarder that holds
every frame DELAY ms each way. Untimed set-up before the link is shaped: push IMAGE
(default gcc, the largest workspace image) as `ws/IMAGE:v1`, convert it to eStargz,
record which files its workload reads (an access profile of one lazy run, or strace),
and convert it again with those files first: `ws/IMAGE:v1-lazy-prefetch` (eStargz).

Timed samples, each on a fresh node (new containerd root and state; for the warm set
a new service root, so an empty chunk cache), with `sync` + `drop_caches` before the
clock starts:

- warm-boot: containerd is started first, configured with the service as its proxy
  snapshotter (as on a Kubernetes node, where the service's DaemonSet pod comes up on
  a running containerd). The clock starts when the service process is spawned, with a
  config whose `warm_set` holds the eStargz image (policy "prefetch", namespace the one
  ctr uses here), and stops at the first 200 from its `/readyz`, polled every 50 ms.
  Then, page cache dropped again, the first start: `ctr run --snapshotter lazypull`
  of the warmed image, timed from the command's start to the workload's READY line.
- full-pull: `ctr images pull` of the unconverted image into overlayfs (fetch and
  unpack). Then, page cache dropped again, the first start from the local image:
  `ctr run`, timed the same way.

The page cache is dropped before both first starts so that neither is helped by what
the boot or pull left in memory: the warmed node reads its chunk cache from disk, the
local node its unpacked layers. Samples are interleaved, the two variants forward on
even repetitions and reversed on odd ones. Bytes on the wire are tbf's counter on the
registry's side (frames with their headers) across each timed span. The service's
own counters (its /metrics) and its warm-set status (GET /warm) are read at readiness
and after the first start. Only medians and ratios of medians from the same run are
reported; nothing is asserted. Everything started is stopped by PID at the end.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from perf import harness
from perf.cold_setup import (
    LAZY_PREFETCH_TAG,
    Setup,
    add_shaped_link_arguments,
    network_method,
    prefetch_source,
    prepare,
    shaped_registry,
)
from perf.harness import (
    MB,
    NAMESPACE,
    PROXY_CONFIG,
    Node,
    _delta,
    _f,
    drop_caches,
    environment,
    fetch_metrics,
    fetch_summary,
    log,
    machine_problem,
    run,
    run_to_ready,
    schedule,
)
from perf.machine import text_table
from perf.workspace_images import SPECS, WorkspaceImage
from tests.fixtures.containerd import start_containerd
from tests.fixtures.snapshotter import SnapshotterProcess, free_tcp_port

DEFAULT_JSON = Path(__file__).parent / "results" / "warm-boot.json"
DEFAULT_IMAGE = "gcc"
PLAIN_TAG = "v1"
WARM_TAG = LAZY_PREFETCH_TAG
VARIANTS = ("warm-boot", "full-pull")
READY_POLL_SECONDS = 0.05
READY_TIMEOUT = 900.0
FAILURES_METRIC = "lazypull_warm_refresh_failures_total"


@dataclass
class Samples:
    boot_s: list[float] = field(default_factory=list)  # warm-boot: service start to 200
    socket_s: list[float] = field(default_factory=list)  # service start to its socket
    service_boot_s: list[float] = field(default_factory=list)  # the service's own figure
    pull_s: list[float] = field(default_factory=list)  # full-pull: ctr images pull
    first_start_s: list[float] = field(default_factory=list)  # ctr run to READY
    wire_bytes: list[int] = field(default_factory=list)  # boot or pull
    first_start_wire_bytes: list[int] = field(default_factory=list)
    counters_at_ready: list[dict[str, float]] = field(default_factory=list)
    counters_first_start: list[dict[str, float]] = field(default_factory=list)
    warm_status: list[dict] = field(default_factory=list)
    failed_attempts: list[int] = field(default_factory=list)  # before /readyz said 200
    warnings: list[list[str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# -- the service's HTTP endpoint -------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, bytes]:
    """(status, body); 0 when the endpoint does not answer yet. No proxies: loopback."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def wait_ready(service: SnapshotterProcess, started: float) -> float:
    """Seconds from `started` to the first 200 from /readyz."""
    assert service.metrics_port is not None and service.process is not None
    deadline = time.monotonic() + READY_TIMEOUT
    body = b""
    while time.monotonic() < deadline:
        status, body = _get(service.metrics_port, "/readyz")
        if status == 200:
            return time.perf_counter() - started
        if service.process.poll() is not None:
            raise RuntimeError(f"the service exited {service.process.returncode}")
        time.sleep(READY_POLL_SECONDS)
    raise RuntimeError(f"/readyz not 200 within {READY_TIMEOUT:g}s: {body.decode()[:500]}")


def warm_status(service: SnapshotterProcess) -> dict:
    assert service.metrics_port is not None
    status, body = _get(service.metrics_port, "/warm")
    return json.loads(body) if status == 200 else {"http_status": status}


def failed_attempts(service: SnapshotterProcess) -> tuple[int, list[str]]:
    """Warm attempts that failed so far (the service's counter), and the warm set's
    warnings in its log, which say why."""
    assert service.metrics_port is not None
    _, body = _get(service.metrics_port, "/metrics")
    count = sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                if line.startswith(FAILURES_METRIC + "{"))
    warnings = [line[:400] for line in service.log.splitlines()
                if " WARNING snapshotter.warm" in line]
    return int(count), warnings


# -- samples ----------------------------------------------------------------------------


def warm_config(setup: Setup, ref: str, containerd_address: str,
                policy: str = "prefetch") -> Path:
    """The base service config plus where containerd is and the one warm-set entry."""
    path = setup.workdir / f"warm-{setup.seq}.toml"
    path.write_text(setup.service_config.read_text()
                    + f'containerd_address = "{containerd_address}"\n'
                    + f'[[warm_set]]\nref = "{ref}"\npolicy = "{policy}"\n'
                    + f'namespace = "{NAMESPACE}"\n')
    return path


def start_warm_node(setup: Setup, ref: str, policy: str = "prefetch") -> Node:
    """containerd up with the service as its proxy snapshotter; the service not yet."""
    base = setup.next_base("wb")
    base.mkdir(parents=True)
    service = SnapshotterProcess(root=base / "sn", address=str(base / "s.sock"),
                                 log_path=base / "service.log", metrics_port=free_tcp_port())
    daemon = start_containerd(base / "c", PROXY_CONFIG.format(address=service.address))
    daemon.namespace = NAMESPACE
    service.extra_args = ("--config", str(warm_config(setup, ref, daemon.address, policy)),
                          "--log-level", "info")
    return Node(base, daemon, service)


def warm_boot_sample(setup: Setup, image: WorkspaceImage, s: Samples) -> str:
    ref = f"{setup.registry.host}/ws/{image.name}:{WARM_TAG}"
    node = start_warm_node(setup, ref)
    service = node.service
    assert service is not None
    try:
        drop_caches()
        wire0 = setup.path.bytes_to_host()
        started = time.perf_counter()
        service.start()
        socket_s = time.perf_counter() - started
        boot = wait_ready(service, started)
        wire = setup.path.bytes_to_host() - wire0
        at_ready = {k: v for k, v in fetch_metrics(node).items() if v}
        status = warm_status(service)
        failures, warnings = failed_attempts(service)
        drop_caches()
        wire1 = setup.path.bytes_to_host()
        first, _, _ = run_to_ready(node, ref, f"wb{setup.seq}", image.command, "lazypull",
                                   time.perf_counter())
        first_wire = setup.path.bytes_to_host() - wire1
        during = _delta(fetch_metrics(node), at_ready)
        s.boot_s.append(boot)
        s.socket_s.append(socket_s)
        if status.get("boot_seconds") is not None:
            s.service_boot_s.append(status["boot_seconds"])
        s.wire_bytes.append(wire)
        s.counters_at_ready.append(at_ready)
        s.warm_status.append(status)
        s.failed_attempts.append(failures)
        s.warnings.append(warnings)
        s.first_start_s.append(first)
        s.first_start_wire_bytes.append(first_wire)
        s.counters_first_start.append(during)
        return (f"/readyz {boot:6.2f} s ({wire / MB:5.1f} MB; {fetch_summary(at_ready)}; "
                f"{failures} failed attempt(s)); "
                f"first start {first:5.2f} s ({first_wire / MB:.1f} MB; "
                f"{fetch_summary(during) or 'nothing fetched'})")
    except Exception as exc:
        s.errors.append(f"{exc}\n-- containerd log tail --\n{node.daemon.log[-2000:]}"
                        f"\n-- service log tail --\n{service.log[-3000:]}")
        return f"FAILED: {str(exc).splitlines()[0][:200]}"
    finally:
        if service.process is None:  # never spawned: nothing of it to stop
            node.service = None
        stop_node(node, setup.args.logs)


def full_pull_sample(setup: Setup, image: WorkspaceImage, s: Samples) -> str:
    ref = f"{setup.registry.host}/ws/{image.name}:{PLAIN_TAG}"
    base = setup.next_base("fp")
    base.mkdir(parents=True)
    daemon = start_containerd(base / "c")
    daemon.namespace = NAMESPACE
    node = Node(base, daemon, None)
    try:
        drop_caches()
        wire0 = setup.path.bytes_to_host()
        started = time.perf_counter()
        run(node.ctr("images", "pull", "--plain-http", ref), what=f"ctr images pull {ref}")
        pulled = time.perf_counter() - started
        wire = setup.path.bytes_to_host() - wire0
        drop_caches()
        first, _, _ = run_to_ready(node, ref, f"fp{setup.seq}", image.command, None,
                                   time.perf_counter())
        s.pull_s.append(pulled)
        s.wire_bytes.append(wire)
        s.first_start_s.append(first)
        return f"pull {pulled:6.2f} s ({wire / MB:5.1f} MB); first start {first:5.2f} s"
    except Exception as exc:
        s.errors.append(f"{exc}\n-- containerd log tail --\n{daemon.log[-2000:]}")
        return f"FAILED: {str(exc).splitlines()[0][:200]}"
    finally:
        stop_node(node, setup.args.logs)


def stop_node(node: Node, logs: Path | None) -> None:
    """harness.stop_node, keeping the node's logs in `logs` first if asked to."""
    try:
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            sources = {"containerd": node.daemon.base / "containerd.log"}
            if node.service is not None:
                sources["service"] = node.service.log_path
            for name, source in sources.items():
                if source.exists():
                    shutil.copyfile(source, logs / f"{node.base.name}-{name}.log")
    finally:
        harness.stop_node(node)


def measure(setup: Setup, image: WorkspaceImage, repeat: int) -> dict[str, Samples]:
    samples = {v: Samples() for v in VARIANTS}
    sample = {"warm-boot": warm_boot_sample, "full-pull": full_pull_sample}
    for rep, _, variant in schedule([image.name], list(VARIANTS), repeat):
        line = sample[variant](setup, image, samples[variant])
        log(f"  rep {rep + 1}/{repeat}  {variant:<9} {line}")
    return samples


# -- report ------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(samples: dict[str, Samples]) -> dict[str, object]:
    warm, full = samples["warm-boot"], samples["full-pull"]
    rows = {
        "warm_boot_to_ready_s": _stats(warm.boot_s),
        "full_pull_s": _stats(full.pull_s),
        "first_start_warmed_s": _stats(warm.first_start_s),
        "first_start_local_s": _stats(full.first_start_s),
        "service_socket_s": _stats(warm.socket_s),
        "service_reported_boot_s": _stats(warm.service_boot_s),
        "warm_boot_wire_bytes": _stats([float(b) for b in warm.wire_bytes]),
        "full_pull_wire_bytes": _stats([float(b) for b in full.wire_bytes]),
        "first_start_warmed_wire_bytes": _stats([float(b) for b in warm.first_start_wire_bytes]),
        "failed_warm_attempts_before_ready": _stats([float(n) for n in warm.failed_attempts]),
        "boot_plus_first_start_s": _stats([a + b for a, b in zip(warm.boot_s,
                                                                  warm.first_start_s,
                                                                  strict=True)]),
        "pull_plus_first_start_s": _stats([a + b for a, b in zip(full.pull_s,
                                                                  full.first_start_s,
                                                                  strict=True)]),
    }
    med = {k: v["median"] for k, v in rows.items()}
    return {
        "runs": {"warm-boot": len(warm.boot_s), "full-pull": len(full.pull_s)},
        "failed": {"warm-boot": len(warm.errors), "full-pull": len(full.errors)},
        "medians": rows,
        "ratios": {
            "warm_boot_to_ready_over_full_pull": _ratio(med["warm_boot_to_ready_s"],
                                                        med["full_pull_s"]),
            "first_start_warmed_over_local": _ratio(med["first_start_warmed_s"],
                                                    med["first_start_local_s"]),
            "warm_boot_wire_over_full_pull_wire": _ratio(med["warm_boot_wire_bytes"],
                                                         med["full_pull_wire_bytes"]),
        },
        "samples": {
            "warm-boot": {"boot_s": warm.boot_s, "socket_s": warm.socket_s,
                          "service_reported_boot_s": warm.service_boot_s,
                          "first_start_s": warm.first_start_s, "wire_bytes": warm.wire_bytes,
                          "first_start_wire_bytes": warm.first_start_wire_bytes,
                          "service_counters_at_ready": warm.counters_at_ready,
                          "service_counters_during_first_start": warm.counters_first_start,
                          "warm_status_at_ready": warm.warm_status,
                          "failed_warm_attempts_before_ready": warm.failed_attempts,
                          "warm_set_warnings_before_ready": warm.warnings,
                          "errors": warm.errors},
            "full-pull": {"pull_s": full.pull_s, "first_start_s": full.first_start_s,
                          "wire_bytes": full.wire_bytes, "errors": full.errors},
        },
    }


def table(summary: dict) -> str:
    med, runs = summary["medians"], summary["runs"]
    lines = [
        ("warm boot: service start -> /readyz 200", "warm_boot_to_ready_s",
         "warm_boot_wire_bytes", "warm-boot"),
        ("  of which service start -> its socket", "service_socket_s", None, "warm-boot"),
        ("  the service's own boot_seconds", "service_reported_boot_s", None, "warm-boot"),
        ("full pull: ctr images pull (overlayfs)", "full_pull_s", "full_pull_wire_bytes",
         "full-pull"),
        ("first start, warmed node (lazypull)", "first_start_warmed_s",
         "first_start_warmed_wire_bytes", "warm-boot"),
        ("first start, image local (overlayfs)", "first_start_local_s", None, "full-pull"),
        ("warm boot + first start", "boot_plus_first_start_s", None, "warm-boot"),
        ("full pull + first start", "pull_plus_first_start_s", None, "full-pull"),
    ]
    rows = [["measure", "median s", "min-max s", "MB wire", "runs"]]
    for label, key, wire_key, variant in lines:
        s = med[key]
        wire = med[wire_key]["median"] if wire_key else None
        rows.append([label, _f(s["median"], ".2f"),
                     f"{_f(s['min'], '.2f')}-{_f(s['max'], '.2f')}",
                     _f(wire / MB if wire is not None else None, ".1f"), str(runs[variant])])
    ratios = summary["ratios"]
    return "\n".join([
        *text_table(rows), "",
        f"warm-boot-to-ready / full-pull:       "
        f"{_f(ratios['warm_boot_to_ready_over_full_pull'], '.3f')}",
        f"first-start-warmed / first-start-local: "
        f"{_f(ratios['first_start_warmed_over_local'], '.2f')}",
        f"wire bytes, warm boot / full pull:     "
        f"{_f(ratios['warm_boot_wire_over_full_pull_wire'], '.3f')}",
        f"failed warm attempts before /readyz 200 (median): "
        f"{_f(med['failed_warm_attempts_before_ready']['median'], 'g')}",
    ])


def print_report(setup: Setup, image: WorkspaceImage, summary: dict, repeat: int) -> None:
    args = setup.args
    c = setup.conversions[f"{image.name}:{WARM_TAG}"]
    print(f"registry behind {args.rate} (tbf, both ways) + {args.delay_ms:g} ms one-way delay "
          "(AF_PACKET forwarder); fresh containerd (+ service root) and dropped page cache "
          "per sample, dropped again before each first start")
    print(f"{image.name}: {len(image.layers)} layers, {image.compressed_bytes / MB:.1f} MB "
          f"gzip, {image.uncompressed_bytes / MB:.1f} MB tar; {image.workload}")
    print(f"  warm set: {WARM_TAG} (policy prefetch), {c['compressed_bytes'] / MB:.1f} MB, "
          f"{c['hot_files']} hot files, prefetch region {c['prefetch_bytes'] / MB:.1f} MB "
          f"(files from {setup.prefetch[image.name]['source']})")
    print(f"median of {repeat} runs, interleaved; MB wire = bytes the registry side sent "
          "(with headers); MB = 10^6 bytes")
    print()
    print(table(summary))
    for variant, s in summary["samples"].items():
        for error in s["errors"]:
            print(f"\nFAILED {variant}:\n{error[:3000]}")


# -- entry point -------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m perf warm-boot",
        description="Snapshotter service start to /readyz with a warm set (the eStargz "
                    "image, policy prefetch) against a full `ctr images pull`, over a "
                    "shaped link; then the first workspace start on each node.")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (default: 3)")
    parser.add_argument("--image", choices=sorted(SPECS), default=DEFAULT_IMAGE,
                        help=f"workspace image (default: {DEFAULT_IMAGE}, the largest)")
    parser.add_argument("--logs", type=Path, default=None, metavar="DIR",
                        help="keep each sample's service and containerd logs in DIR")
    add_shaped_link_arguments(parser, DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.delay_ms < 0:
        parser.error("--repeat must be positive and --delay-ms not negative")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    problem = machine_problem("warm-boot")
    if problem:
        print(problem, file=sys.stderr)
        return 1
    source = prefetch_source(args.prefetch_source)
    started = time.monotonic()
    load_before = os.getloadavg()  # other work on the machine shows up in the figures
    with tempfile.TemporaryDirectory(prefix="lazypull-perf-warm-", dir=args.tmpdir) as tmp, \
            shaped_registry(args, Path(tmp)) as setup:
        prepare(setup, [args.image], 0, source)
        image = setup.images[args.image]
        setup_s = time.monotonic() - started
        log(f"set-up done in {setup_s:.0f} s; shaping the link: {args.rate}, "
            f"{args.delay_ms:g} ms one way")
        setup.path.shape()
        samples = measure(setup, image, args.repeat)
        service_config = setup.service_config.read_text()
    summary = summarize(samples)
    data = {
        "benchmark": "warm-boot",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        "method": {
            "repeat": args.repeat,
            "network": network_method(args),
            "per_run": "fresh containerd root/state (warm-boot: and service root, chunk "
                       "cache) per sample; sync + drop_caches before the timed span and "
                       "again before the first start",
            "warm_boot": "containerd started first with the service as proxy snapshotter; "
                         "clock from spawning the service to the first 200 from /readyz "
                         f"(polled every {READY_POLL_SECONDS * 1000:g} ms); warm_set = "
                         f"[{{ref = ws/{args.image}:{WARM_TAG}, policy = prefetch, "
                         f"namespace = {NAMESPACE}}}]",
            "full_pull": f"ctr images pull --plain-http ws/{args.image}:{PLAIN_TAG} "
                         "(fetch + unpack into overlayfs)",
            "first_start": "ctr run --rm [--snapshotter lazypull], from the command's start "
                           "to the READY line on its stdout",
            "order": "interleaved; variants forward on even repetitions, reversed on odd",
            "prefetch_source": source,
            "service_config": service_config,
            "service": "python -m cli.main snapshotter --config FILE --log-level info "
                       "--metrics-address 127.0.0.1:PORT; options not in service_config "
                       "(plus containerd_address and warm_set) at their defaults",
            "wire_bytes": "tbf 'Sent' counter on the registry side's veth (frames)",
            "setup_seconds": round(setup_s, 1),
            "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        },
        "image": image.to_json(),
        "conversions": setup.conversions,
        "prefetch": setup.prefetch,
        "results": summary,
    }
    print_report(setup, image, summary, args.repeat)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nresults: {args.json} (whole run {time.monotonic() - started:.0f} s)")
    return 0
