"""`python -m perf load`: many containers at once from lazy images on one node.

Generates IMAGES small runnable images (busybox, a few hundred files of varied sizes,
a checksum list, and a cold file the workload never reads), pushes them to a
docker-registry on 127.0.0.1, converts them with `lazypull convert` and pulls them
lazily on a fresh containerd + snapshotter service. Then WAVES waves of CONTAINERS
`ctr run --rm --snapshotter lazypull` started at once, image i % IMAGES for container
i, each running `sha256sum -c` over every listed file and printing READY: so every
byte a container reads is checked against the generated data. The service's
background fetch (its rate is per layer) is slowed down so that it runs through the
waves, and the first wave starts once it has begun (it starts after half a second
without container reads, which the gaps between waves need not leave); it yields to
containers' misses, so it runs mostly once they are served.

Reported per wave: containers READY, failed and their messages, time to READY
(median, max), RSS and open file descriptors of the service and of the FUSE manager,
FUSE operation latency (p50/p99 bucket bounds from the manager's histogram) and the
error counters (chunks refused, prefetch failures, ERROR lines in the service log);
zero errors are expected. Nothing here is asserted: tests/test_load.py runs it small
and checks the outcome.
"""

import argparse
import concurrent.futures
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from perf.harness import (
    Node,
    environment,
    lazy_pull,
    lazypull_argv,
    log,
    run,
    start_node,
    stop_node,
    write_hosts,
)
from perf.scale import histogram_delta, memory, metrics_text
from tests.fixtures.registry import RegistryServer, start_registry
from tests.images import File, Symlink, build_layout_image

KIB, MIB = 1 << 10, 1 << 20
BUSYBOX = Path("/bin/busybox")
CHECKS = "/check.sha256"
READY = "READY"
WAVE_TIMEOUT = 900.0
BACKGROUND_START_TIMEOUT = 30.0  # seconds the waves wait for the background fetch
ERROR_COUNTERS = ("lazypull_fetch_verification_failures_total",
                  "lazypull_prefetch_failures_total")
# Counters some versions also have: every failed lazy read, by layer.
ERROR_COUNTER_PREFIXES = ("lazypull_fuse_read_errors_total", "lazypull_read_failures_total")


@dataclass(frozen=True)
class Sizes:
    images: int
    containers: int
    waves: int
    files: int  # small files per image
    cold_bytes: int  # the file no container reads: work for the background fetch
    background_bytes_per_second: int  # per lazy layer


FULL = Sizes(images=6, containers=30, waves=2, files=300, cold_bytes=24 * MIB,
             background_bytes_per_second=256 * KIB)


def image_files(index: int, sizes: Sizes) -> tuple[dict[str, object], str]:
    """The image's files (busybox and data) and its checksum list."""
    rng = random.Random(index)
    files: dict[str, object] = {
        "bin/busybox": File(BUSYBOX.read_bytes(), 0o755),
        "bin/sh": Symlink("busybox"), "bin/sha256sum": Symlink("busybox"),
    }
    listed: list[str] = []
    for n in range(sizes.files):
        size = rng.choice((0, 1, 700, 4 * KIB, 12 * KIB, 40 * KIB, 100 * KIB))
        name = f"data/{index}/d{n % 17}/f{n}"
        files[name] = File(rng.randbytes(size), 0o644)
        listed.append(name)
    for n in range(4):  # several chunks each
        name = f"data/{index}/big/b{n}"
        files[name] = File(rng.randbytes(rng.randint(1 * MIB, 6 * MIB)), 0o644)
        listed.append(name)
    files[f"data/{index}/cold"] = File(rng.randbytes(sizes.cold_bytes), 0o644)
    checks = "".join(f"{hashlib.sha256(files[name].data).hexdigest()}  /{name}\n"  # type: ignore[attr-defined]
                     for name in listed)
    return files, checks


def build_images(registry: RegistryServer, sizes: Sizes, workdir: Path) -> list[str]:
    """Push and convert the images; the lazy references."""
    refs = []
    for index in range(sizes.images):
        files, checks = image_files(index, sizes)
        layout = workdir / f"layout-{index}"
        base = {k: v for k, v in files.items() if k.startswith("bin/")}
        data = {k: v for k, v in files.items() if not k.startswith("bin/")}
        data[CHECKS.lstrip("/")] = checks.encode()
        build_layout_image(layout, "v1", [base, data],  # type: ignore[list-item]
                           cmd=["/bin/sh", "-c", f"sha256sum -c -s {CHECKS} && echo {READY}"])
        source = f"{registry.host}/load/ws{index}"
        run(["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
             f"oci:{layout}:v1", f"docker://{source}:v1"], what=f"push {source}")
        run(lazypull_argv("convert", f"docker://{source}:v1", f"docker://{source}:esgz",
                          "--plain-http", "--no-cache"), what=f"convert {source}")
        refs.append(f"{source}:esgz")
        shutil.rmtree(layout)
    return refs


def open_fds(pid: int | None) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd")) if pid else None
    except OSError:
        return None


def counters(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ERROR_COUNTERS or name.startswith(ERROR_COUNTER_PREFIXES):
            found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def start_container(node: Node, ref: str, cid: str) -> subprocess.Popen:
    argv = node.ctr("run", "--rm", "--snapshotter", "lazypull", ref, cid)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_wave(node: Node, refs: list[str], sizes: Sizes, wave: int) -> dict:
    started = time.monotonic()
    processes = [start_container(node, refs[i % len(refs)], f"load-{wave}-{i}")
                 for i in range(sizes.containers)]

    def finish(process: subprocess.Popen) -> dict:
        try:
            out, err = process.communicate(timeout=max(1.0, started + WAVE_TIMEOUT
                                                       - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            return {"ready": False, "seconds": None, "error": "timed out (a hang?)"}
        ready = READY in out.split()
        return {"ready": ready and process.returncode == 0,
                "seconds": round(time.monotonic() - started, 3),
                "error": "" if ready and process.returncode == 0 else
                f"exit {process.returncode}: {(out + err).strip()[-500:]}"}

    with concurrent.futures.ThreadPoolExecutor(len(processes)) as pool:
        outcomes = list(pool.map(finish, processes))
    times = [o["seconds"] for o in outcomes if o["ready"]]
    return {"wave": wave, "containers": len(outcomes),
            "ready": sum(o["ready"] for o in outcomes),
            "failed": [o["error"] for o in outcomes if not o["ready"]][:10],
            "seconds_median": round(statistics.median(times), 3) if times else None,
            "seconds_max": max(times) if times else None,
            "wall_seconds": round(time.monotonic() - started, 3)}


def node_state(node: Node) -> dict:
    assert node.service is not None and node.service.process is not None
    return {"memory": memory(node),
            "open_fds": {"service": open_fds(node.service.process.pid),
                         "fuse_manager": open_fds(node.service.fuse_manager_pid)}}


def run_load(sizes: Sizes, workdir: Path, registry: RegistryServer | None = None) -> dict:
    started = time.monotonic()
    run_dir = Path(tempfile.mkdtemp(prefix="load-", dir=workdir))
    own_registry = registry is None
    if registry is None:
        registry = start_registry(run_dir / "registry")
    node = None
    try:
        log(f"building {sizes.images} images")
        refs = build_images(registry, sizes, run_dir)
        hosts_dir = run_dir / "hosts"
        write_hosts(hosts_dir, registry.host)
        config = run_dir / "service.toml"
        config.write_text(f'hosts_dir = "{hosts_dir}"\nbackground_quiet_seconds = 0.5\n'
                          f"background_bytes_per_second = {sizes.background_bytes_per_second}\n")
        node = start_node(run_dir / "node", True, config)
        assert node.service is not None
        setup = argparse.Namespace(hosts_dir=hosts_dir)
        pulls = []
        for ref in refs:
            t = time.monotonic()
            result = lazy_pull(setup, node, ref)  # type: ignore[arg-type]
            sources = {layer["source"] for layer in result["layers"]}
            pulls.append({"ref": ref, "seconds": round(time.monotonic() - t, 3),
                          "lazy": "remote" in sources})
        background_started = _wait_for_background(node)
        before = metrics_text(node)
        waves = []
        for wave in range(1, sizes.waves + 1):
            start_text = metrics_text(node)
            result = run_wave(node, refs, sizes, wave)
            end_text = metrics_text(node)
            result.update(node_state(node))
            result["fuse_latency"] = histogram_delta(start_text, end_text)
            result["background_bytes_during_wave"] = (_background_bytes(end_text)
                                                      - _background_bytes(start_text))
            waves.append(result)
            log(f"wave {wave}: {result['ready']}/{result['containers']} READY, median "
                f"{result['seconds_median']} s, max {result['seconds_max']} s, RSS "
                f"{(result['memory']['total_rss_bytes'] or 0) / 1e6:.1f} MB, fds "
                f"{result['open_fds']}")
        after = metrics_text(node)
        errors = {name: value - counters(before).get(name, 0.0)
                  for name, value in counters(after).items()}
        error_lines = [line[:300] for line in node.service.log.splitlines()
                       if re.search(r"\bERROR\b", line)]
        return {
            "benchmark": "load",
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": environment(),
            "sizes": sizes.__dict__,
            "pulls": pulls,
            "background_started_seconds": background_started,
            "waves": waves,
            "error_counters": errors,
            "service_error_lines": error_lines[-20:],
            "total_errors": sum(errors.values()) + len(error_lines)
            + sum(w["containers"] - w["ready"] for w in waves),
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        if node is not None:
            stop_node(node)
        if own_registry:
            registry.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _wait_for_background(node: Node) -> float | None:
    """Seconds until the background fetch had fetched its first bytes, None if it had
    not within BACKGROUND_START_TIMEOUT (the waves then start all the same)."""
    started = time.monotonic()
    while time.monotonic() - started < BACKGROUND_START_TIMEOUT:
        if _background_bytes(metrics_text(node)) > 0:
            return round(time.monotonic() - started, 3)
        time.sleep(0.1)
    log(f"the background fetch had not begun after {BACKGROUND_START_TIMEOUT:.0f} s")
    return None


def _background_bytes(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('lazypull_fetch_bytes_total{kind="background"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def report(data: dict) -> str:
    rows = ["| wave | READY | median / max to READY | RSS service + manager | open fds "
            "service / manager | FUSE read p50 / p99 (bucket) | lookup p99 | background "
            "fetch during the wave |", "|---|---|---|---|---|---|---|---|"]
    for w in data["waves"]:
        mem = w["memory"]
        read = w["fuse_latency"].get("read", {})
        lookup = w["fuse_latency"].get("lookup", {})
        rows.append(
            f"| {w['wave']} | {w['ready']}/{w['containers']} | {w['seconds_median']} / "
            f"{w['seconds_max']} s | {(mem['total_rss_bytes'] or 0) / 1e6:.1f} MB | "
            f"{w['open_fds']['service']} / {w['open_fds']['fuse_manager']} | "
            f"≤ {read.get('p50_le_ms')} / ≤ {read.get('p99_le_ms')} ms | "
            f"≤ {lookup.get('p99_le_ms')} ms | "
            f"{w['background_bytes_during_wave'] / MIB:.1f} MiB |")
    rows.append("")
    rows.append(f"errors: {data['total_errors']} (counters {data['error_counters']}, "
                f"{len(data['service_error_lines'])} ERROR lines)")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=FULL.images)
    parser.add_argument("--containers", type=int, default=FULL.containers,
                        help="containers per wave")
    parser.add_argument("--waves", type=int, default=FULL.waves)
    parser.add_argument("--files", type=int, default=FULL.files, help="small files per image")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, default=Path("perf/results/load.json"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("load needs root (containerd, FUSE)")
    sizes = Sizes(args.images, args.containers, args.waves, args.files, FULL.cold_bytes,
                  FULL.background_bytes_per_second)
    data = run_load(sizes, args.workdir)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2))
    print(report(data))
    print(f"results: {args.json} (whole run {data['seconds']} s)")
    return 0 if data["total_errors"] == 0 else 1
