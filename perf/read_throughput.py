"""Read throughput of one large file through lazypull's FUSE layers against overlayfs,
with the link unshaped (see perf/cold_start.py)."""

import statistics
import time
from pathlib import Path

from perf.cold_setup import LAZY_TAG, Setup, chain_id_of
from perf.harness import (
    MB,
    MIB,
    Node,
    _delta,
    drop_caches,
    fetch_metrics,
    lazy_pull,
    log,
    run,
    start_node,
    stop_node,
)
from perf.machine import text_table


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
        lazy_ref = setup.ref("bigfile", LAZY_TAG)
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




def throughput_report(throughput: dict, warm_reads: int) -> str:
    first, warm = throughput["first_read"], throughput["warm_median_mb_per_s"]
    reread = throughput["reread_page_cache_dropped"]
    rows = [["path", "warm MB/s", "first read MB/s", "reread, cache dropped MB/s"]]
    for name in warm:
        rows.append([name, f"{warm[name]:.1f}", f"{first[name]['mb_per_s']:.1f}",
                     f"{reread[name]['mb_per_s']:.1f}"])
    return "\n".join([
        f"read of a {throughput['file_bytes'] / MIB:.0f} MiB file through the image's overlay "
        f"view, link unshaped: warm page cache (median of {warm_reads}); first read (page "
        "cache cold, lazy: fetched); reread with the page cache dropped (lazy: from the "
        "service's chunk cache)",
        *text_table(rows),
        f"lazy-fuse / native-overlayfs (warm): {throughput['warm_ratio_lazy_over_native']:.3f}"])
