"""The cold-start report: medians and spreads per link, image and mode, the phase
breakdown, bytes on the wire against bytes the workload read, the physical limit, the
issue's target ratios (each from one run), and the Markdown table people read.

Physical limit of a start: the bytes the workload needs, as they travel (what it read
of the files it opened, in pages, scaled by the image's gzip ratio), at the link's
rate, plus MIN_ROUND_TRIPS round trips (TCP connect, manifest, config and TOC, data),
plus the fully local floor (local-cold: the same start with the image already
unpacked). What it read is measured on a local run (perf/cold_setup.py), so the block
device's readahead is in it: an upper bound where that readahead is large.
"""

import statistics
from collections.abc import Iterable

from perf.cold_modes import MODES, PHASES, Sample
from perf.cold_setup import LINKS
from perf.harness import MB, _f

MIN_ROUND_TRIPS = 4
# (name, numerator mode, denominator mode or "bytes read", target, applies to images)
TARGETS = (
    ("lazypull with profile / stargz opt", "lazy-prefetch", "stargz-opt",
     {"python": 0.6, "gcc": 0.7, "node": 0.7}),
    ("lazypull without profile / stargz noopt", "lazy", "stargz-noopt", 0.4),
    ("first start on a warm-set node / fully local", "lazy-warm-set", "local-cold", 1.2),
    ("bytes on the wire before READY / bytes read (with profile)", "lazy-prefetch",
     "bytes read", 1.3),
    ("bytes on the wire before READY / bytes read (without profile)", "lazy",
     "bytes read", 1.3),
    ("warm second start on lazy mounts / fully local, page cache warm",
     "lazy-prefetch-second", "local-warm", 1.2),
    ("unmodified image through its gzip index / converted, with profile",
     "index-lazy-prefetch", "lazy-prefetch", 1.3),
    ("unmodified image through its gzip index / converted, without profile",
     "index-lazy", "lazy", 1.3),
)


def _median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None and v == v]  # drop None and NaN
    return statistics.median(values) if values else None


def mode_summary(samples: list[Sample]) -> dict[str, object]:
    ok = [s for s in samples if s.error is None and s.ready_s is not None]
    ready = [s.ready_s for s in ok if s.ready_s is not None]
    return {
        "label": MODES[samples[0].mode].label,
        "runs": len(ok),
        "failed": len(samples) - len(ok),
        "median_ready_s": _median(ready),
        "min_ready_s": min(ready) if ready else None,
        "max_ready_s": max(ready) if ready else None,
        "spread_s": max(ready) - min(ready) if ready else None,
        "median_phases_s": {p: _median(s.phases.get(p) for s in ok if p in s.phases)
                            for p in PHASES if any(p in s.phases for s in ok)},
        "median_wire_bytes_at_ready": _median(s.wire_bytes_at_ready for s in ok),
        "median_wire_bytes": _median(s.wire_bytes for s in ok),
        # the snapshotter's processes (lazypull: service + FUSE manager) at READY
        "median_rss_bytes_at_ready": _median(s.memory_at_ready.get("total_rss_bytes")
                                             for s in ok),
        "median_pss_bytes_at_ready": _median(s.memory_at_ready.get("total_pss_bytes")
                                             for s in ok),
        "ready_s": [round(x, 3) for x in ready],
        "errors": [s.error for s in samples if s.error],
    }


def physical_limit(link_name: str, image: dict, reads: dict,
                   floor_s: float | None) -> dict[str, object]:
    link = LINKS[link_name]
    ratio = image["compressed_bytes"] / image["uncompressed_bytes"]
    needed = reads["bytes"] * ratio
    transfer = needed / link.bytes_per_s
    return {
        "bytes_read": reads["bytes"],
        "files_read": reads["files"],
        "file_bytes": reads["file_bytes"],
        "read_ahead_kb": reads.get("read_ahead_kb"),
        "bytes_needed_on_wire": round(needed),
        "transfer_s": transfer,
        "round_trips_s": MIN_ROUND_TRIPS * link.rtt_s,
        "local_floor_s": floor_s,
        "limit_s": transfer + MIN_ROUND_TRIPS * link.rtt_s + floor_s
        if floor_s is not None else None,
    }


def _target_value(by_mode: dict[str, dict], limit: dict, numerator: str,
                  denominator: str) -> float | None:
    top = by_mode.get(numerator)
    if top is None:
        return None
    if denominator == "bytes read":
        wire = top["median_wire_bytes_at_ready"]
        return wire / limit["bytes_read"] if wire is not None and limit["bytes_read"] else None
    bottom = by_mode.get(denominator)
    if bottom is None or not bottom["median_ready_s"] or top["median_ready_s"] is None:
        return None
    return top["median_ready_s"] / bottom["median_ready_s"]


def summarize(samples: list[Sample], images: dict[str, dict],
              reads: dict[str, dict]) -> dict[str, dict]:
    """results[link][image] = {"modes": {mode: summary}, "limit": ..., "targets": [...]}"""
    out: dict[str, dict] = {}
    keys = dict.fromkeys((s.link, s.image, s.mode) for s in samples)
    for link, image, mode in keys:
        group = [s for s in samples if (s.link, s.image, s.mode) == (link, image, mode)]
        entry = out.setdefault(link, {}).setdefault(image, {"modes": {}})
        entry["modes"][mode] = mode_summary(group)
    for link, by_image in out.items():
        for image, entry in by_image.items():
            modes = entry["modes"]
            floor = modes.get("local-cold", {}).get("median_ready_s")
            entry["limit"] = physical_limit(link, images[image], reads[image], floor)
            for mode in modes.values():
                ready = mode["median_ready_s"]
                limit = entry["limit"]["limit_s"]
                mode["times_physical_limit"] = ready / limit if ready and limit else None
            entry["targets"] = []
            for name, numerator, denominator, target in TARGETS:
                goal = target.get(image) if isinstance(target, dict) else target
                value = _target_value(modes, entry["limit"], numerator, denominator)
                if goal is None or value is None:
                    continue
                entry["targets"].append({"target": name, "value": round(value, 3),
                                         "at_most": goal, "met": value <= goal})
    return out


# -- Markdown -------------------------------------------------------------------------------


def markdown(results: dict[str, dict], header: str) -> str:
    lines = [header, ""]
    for link, by_image in results.items():
        lines += [f"### {link}", "",
                  "| image | mode | READY s (median) | spread s | phases s (median) | "
                  "MB on the wire to READY | x physical limit | snapshotter RSS / PSS MB "
                  "at READY | runs |",
                  "|---|---|---:|---:|---|---:|---:|---:|---:|"]
        for image, entry in by_image.items():
            for mode, s in entry["modes"].items():
                wire = s["median_wire_bytes_at_ready"]
                phases = ", ".join(f"{k} {v:.2f}" for k, v in s["median_phases_s"].items()
                                   if v is not None)
                runs = f"{s['runs']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
                rss, pss = s["median_rss_bytes_at_ready"], s["median_pss_bytes_at_ready"]
                memory = f"{rss / MB:.1f} / {pss / MB:.1f}" if rss and pss else "-"
                lines.append(
                    f"| {image} | {mode} | {_f(s['median_ready_s'], '.2f')} | "
                    f"{_f(s['spread_s'], '.2f')} | {phases} | "
                    f"{_f(wire / MB if wire is not None else None, '.1f')} | "
                    f"{_f(s['times_physical_limit'], '.2f')} | {memory} | {runs} |")
        lines += ["", "| image | bytes read: pages of the files opened, local run, with "
                  "readahead | needed on the wire (est.) | physical limit s | of which local "
                  "floor s |", "|---|---:|---:|---:|---:|"]
        for image, entry in by_image.items():
            limit = entry["limit"]
            lines.append(f"| {image} | {limit['bytes_read'] / MB:.1f} MB (of "
                         f"{limit['file_bytes'] / MB:.1f} MB in {limit['files_read']} files; "
                         f"readahead {limit['read_ahead_kb']} KiB) | "
                         f"{limit['bytes_needed_on_wire'] / MB:.1f} MB | "
                         f"{_f(limit['limit_s'], '.2f')} | {_f(limit['local_floor_s'], '.2f')} |")
        lines += ["", "| image | target | value | at most | met |", "|---|---|---:|---:|---|"]
        for image, entry in by_image.items():
            for t in entry["targets"]:
                lines.append(f"| {image} | {t['target']} | {t['value']:.2f} | {t['at_most']:g} "
                             f"| {'yes' if t['met'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)
