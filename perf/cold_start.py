"""Cold start of workspace images: pull + run to a READY line over a shaped link, with
lazypull, stargz-snapshotter and a full pull side by side in one interleaved run.

Images (perf/workspace_images.py, built once and cached): Debian bookworm minbase +
python3 + python3-numpy, whose workload imports a handful of stdlib modules; minbase +
gcc + libc6-dev, whose workload compiles and runs hello.c; minbase + nodejs + a few npm
packages Debian ships, whose workload `require`s them; and `tiny` (busybox, for tests).
Each prints READY when its work is done.

Links (--link): 100mbit-40ms (100 Mbit, 40 ms round trip) and 1gbit-4ms. The registry
(docker-registry) runs in its own network namespace, reached over veth pairs through a
userspace forwarder that holds every frame half the round trip each way, with tbf at
the rate on both sides (perf/netem.py). Every node reaches it that way.

Set-up, untimed and before the link is shaped (perf/cold_setup.py): push each image
(`ws/NAME:v1`); `lazypull convert` it without a prefetch list (`v1-lazy`; zstd:chunked
at level 19 unless --lazy-format/--lazy-level say otherwise);
record the files its workload opens (strace in a chroot of the fully pulled image: the
bytes the workload read are their sizes); record an access profile of one lazy run on a
node (`--prefetch-source profile`, the default where `lazypull profile export` exists,
else the strace list) and convert again with those files first (`v1-lazy-prefetch`).
With --with-stargz, the stargz-snapshotter comparator (perf/stargz.py) is built once
into the cache, and its images made as its users make them: stock `ctr-remote image
optimize --oci --no-optimize` (`v1-stargz-noopt`) and `ctr-remote image optimize --oci`
with the same workload (`v1-stargz-opt`).

Timed modes (perf/cold_modes.py), each sample on a fresh node: a new containerd (own
root and state, CRI off) and, for lazy modes, a new snapshotter service (own root, so an
empty chunk cache; its defaults plus hosts_dir), for stargz modes a new stargz-anchor
(own root; upstream defaults), then `sync` and `echo 3 > /proc/sys/vm/drop_caches`:

- full-overlayfs: `ctr images pull` (fetch and unpack into overlayfs), then `ctr run`;
  on its node afterwards local-cold (the fully local floor: `ctr run` again after
  dropping the page cache) and local-warm (once more, page cache warm);
- stargz-noopt, stargz-opt: `rpull-anchor` (as `ctr-remote rpull`), then
  `ctr run --snapshotter stargz`;
- lazy: `lazypull pull v1-lazy`, then `ctr run --snapshotter lazypull`;
- lazy-prefetch: the same with `v1-lazy-prefetch`; on its node afterwards
  lazy-prefetch-second (the warm second start on the lazy mounts);
- lazy-warm-set: a node whose service's warm set holds `v1-lazy-prefetch` with policy
  full (every byte cached, the layers written out as plain directories), booted and
  ready before the clock; page cache dropped; the clock starts with `ctr run`;
- lazy-nobg, lazy-prefetch-nobg (on request): the service's background fetch off;
- index-lazy-prefetch-noahead (on request): index-lazy-prefetch with the service's
  gzip_index_ahead off (each mount fetches its own index; docs/gzip-index.md);
- index-lazy, index-lazy-prefetch (on request): the unmodified image (`ws/NAME-index`,
  `ws/NAME-index-prefetch`, pushed and indexed with `lazypull index` at set-up, the
  second with the same profile or list as v1-lazy-prefetch), `lazypull pull` then
  `ctr run --snapshotter lazypull`: its layers are read through their gzip index.

The clock starts when the pull command starts and stops when READY arrives on
`ctr run`'s stdout. Phases (client start, resolve, TOC + mounts, fetch + unpack,
container start, run to READY) come from each pull's own figures and containerd's
/tasks/start event. Bytes on the wire are tbf's counter on the registry's side (frames
with their headers) up to READY and to the exit; each system's own counters are read at
READY. Samples run interleaved: repetitions outermost, then links, images, and modes in
forward order on even repetitions and reversed on odd ones.

Report (perf/cold_report.py, perf/cold_charts.py): per link, image and mode the median
and spread of time to READY, median phases, bytes on the wire, the physical limit and
the issue's target ratios, as JSON, a Markdown table and two PNG charts (`--out`).
Ratios are medians from the same run; nothing is asserted. A read-throughput check of
one large file through FUSE against overlayfs (--bigfile-mib, perf/read_throughput.py)
runs with the link unshaped. Everything is torn down at the end: processes stopped by
PID, namespaces deleted.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from perf import cold_charts, cold_report
from perf.cold_modes import (
    DEFAULT_TIMED,
    INDEX_MODES,
    MODES,
    STARGZ_MODES,
    TIMED,
    Sample,
    cold_sample,
    describe,
)
from perf.cold_setup import (
    LAZY_FORMATS,
    LINKS,
    Link,
    Setup,
    add_shaped_link_arguments,
    prefetch_source,
    prepare,
    shaped_registry,
)
from perf.harness import MIB, environment, log, machine_problem
from perf.read_throughput import measure_throughput, throughput_report
from perf.stargz import DEFAULT_SOURCE, ensure_built
from perf.workspace_images import SPECS

DEFAULT_OUT = Path(__file__).parent / "results" / "cold-start"
BOTH = "both"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m perf cold-start",
        description="Cold start (pull + run to READY) of Debian workspace images over "
                    "shaped links: full pull, stargz-snapshotter (--with-stargz) and "
                    "lazypull side by side, interleaved in one run.")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (default: 3)")
    parser.add_argument("--images", default="python,gcc,node",
                        help=f"comma-separated, of {', '.join(SPECS)} "
                             "(default: python,gcc,node)")
    parser.add_argument("--link", default=BOTH,
                        help=f"comma-separated, of {', '.join(LINKS)}, or {BOTH} "
                             f"(default: {BOTH})")
    parser.add_argument("--modes", "--variants", dest="modes", default=None,
                        help=f"comma-separated, of {', '.join(TIMED)} (default: "
                             f"{', '.join(DEFAULT_TIMED)}; stargz modes only with "
                             "--with-stargz). local-cold/-warm come with full-overlayfs, "
                             "lazy-prefetch-second with lazy-prefetch")
    parser.add_argument("--with-stargz", action="store_true",
                        help="build the stargz-snapshotter comparator (needs golang-go and "
                             "Debian's Go sources, see perf/stargz.py) and run its modes")
    parser.add_argument("--stargz-source", type=Path, default=DEFAULT_SOURCE,
                        help=f"the comparator's sources (default: {DEFAULT_SOURCE})")
    parser.add_argument("--index-spacing", type=int, default=0, metavar="BYTES",
                        help="checkpoint spacing of the gzip indexes the index-* modes read "
                             "through (default: 0 = lazypull index's default)")
    parser.add_argument("--bigfile-mib", type=int, default=0,
                        help="size of the file for the read-throughput check; 0 skips it "
                             "(default: 0)")
    parser.add_argument("--warm-reads", type=int, default=5,
                        help="warm reads per path in the throughput check (default: 5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where the report goes: OUT.json, OUT.md, OUT-ready.png, "
                             f"OUT-phases.png (default: {DEFAULT_OUT})")
    parser.add_argument("--lazy-format", choices=sorted(LAZY_FORMATS), default="zstdchunked",
                        help="layer format of the lazy modes' images (default: zstdchunked)")
    parser.add_argument("--lazy-level", type=int, default=None, metavar="N",
                        help="their compression level (default: "
                             + ", ".join(f"{level} for {name}"
                                         for name, level in LAZY_FORMATS.items()) + ")")
    add_shaped_link_arguments(parser, default_json=None)
    args = parser.parse_args(argv)
    if args.lazy_level is None:
        args.lazy_level = LAZY_FORMATS[args.lazy_format]
    args.image_names = _names(parser, args.images, SPECS, "image")
    args.links = [LINKS[n] for n in _names(parser, ",".join(LINKS) if args.link == BOTH
                                           else args.link, LINKS, "link")]
    default = [m for m in DEFAULT_TIMED if args.with_stargz or m not in STARGZ_MODES]
    args.mode_names = _names(parser, args.modes, TIMED, "mode") if args.modes else default
    if not args.with_stargz and any(m in STARGZ_MODES for m in args.mode_names):
        parser.error("stargz modes need --with-stargz")
    if args.repeat < 1 or args.warm_reads < 1 or args.bigfile_mib < 0:
        parser.error("--repeat and --warm-reads must be positive, --bigfile-mib not negative")
    # the path is opened at the first link; samples reshape it as they go
    args.rate, args.delay_ms = args.links[0].rate, args.links[0].one_way_delay_ms
    return args


def _names(parser: argparse.ArgumentParser, text: str, known, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"unknown {what}(s) {', '.join(unknown) or '(none given)'}; "
                     f"known: {', '.join(known)}")
    return names


def charts_problem() -> str | None:
    """The report's charts need matplotlib: say so before a long run, not after it."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is missing: pip install -e '.[test]' (or matplotlib)"
    return None


def use_link(setup: Setup, link: Link) -> None:
    path = setup.path
    if path.shaped and (path.rate, path.delay_ms) == (link.rate, link.one_way_delay_ms):
        return
    path.rate, path.delay_ms = link.rate, link.one_way_delay_ms
    path.shape()


def measure(setup: Setup, args: argparse.Namespace) -> list[Sample]:
    samples: list[Sample] = []
    for rep in range(args.repeat):
        order = args.mode_names if rep % 2 == 0 else args.mode_names[::-1]
        for link in args.links:
            use_link(setup, link)
            for name in args.image_names:
                for mode in order:
                    for sample in cold_sample(setup, link, setup.images[name], mode, rep):
                        samples.append(sample)
                        log(f"  rep {rep + 1}/{args.repeat} {link.name:<12} {name:<6} "
                            f"{sample.mode:<20} {describe(sample)}")
    return samples


def write_report(args: argparse.Namespace, data: dict) -> list[Path]:
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    env = data["environment"]
    title = (f"cold start, {data['time_utc'][:10]}, {env['cpu_model']} x{env['cpu_count']}, "
             f"median of {args.repeat}")
    header = (f"Cold start to READY, {data['time_utc']} on {env['cpu_model']} "
              f"({env['cpu_count']} cores), commit {str(env['git_commit'])[:12]}; median of "
              f"{args.repeat} interleaved runs; lazypull's images {args.lazy_format} "
              f"level {args.lazy_level}; MB = 10^6 bytes; spread = max - min.")
    paths = [out.with_suffix(".json"), out.with_suffix(".md"),
             out.with_name(out.name + "-ready.png"), out.with_name(out.name + "-phases.png")]
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    paths[1].write_text(cold_report.markdown(data["results"], header))
    cold_charts.ready_chart(data["results"], paths[2], title)
    cold_charts.phases_chart(data["results"], paths[3], title)
    return paths


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    problem = machine_problem("cold-start") or charts_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    source = prefetch_source(args.prefetch_source)
    started = time.monotonic()
    load_before = os.getloadavg()  # other work on the machine shows up in the figures
    tools = ensure_built(args.cache_dir, args.stargz_source, log) if args.with_stargz else None
    with tempfile.TemporaryDirectory(prefix="lazypull-perf-cold-", dir=args.tmpdir) as tmp, \
            shaped_registry(args, Path(tmp)) as setup:
        setup.stargz = tools
        setup.lazy_convert = ["--format", args.lazy_format,
                              "--compression-level", str(args.lazy_level)]
        prepare(setup, args.image_names, args.bigfile_mib * MIB, source,
                indexes=any(m in INDEX_MODES for m in args.mode_names))
        setup_s = time.monotonic() - started
        log(f"set-up done in {setup_s:.0f} s; links: "
            f"{', '.join(link.name for link in args.links)}")
        samples = measure(setup, args)
        throughput = None
        if args.bigfile_mib:
            log("warm read throughput (link unshaped) ...")
            throughput = measure_throughput(setup, args.warm_reads)
        service_config = setup.service_config.read_text()
        images = {n: setup.images[n].to_json() for n in args.image_names}
    data = {
        "benchmark": "cold-start",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": {**environment(), "stargz_comparator": tools and {
            "version": "stargz-snapshotter 0.12 (Debian Go sources)",
            "sources_key": tools.version}},
        "method": {
            "repeat": args.repeat,
            "links": {link.name: {"rate": link.rate, "rtt_ms": link.rtt_s * 1000}
                      for link in args.links},
            "modes": {m: MODES[m].label for m in args.mode_names},
            "per_sample": "fresh containerd root/state (and snapshotter service or "
                          "stargz-anchor root) per sample; sync + drop_caches before the "
                          "clock",
            "timing": "from the start of the pull command (warm set: of ctr run) to the "
                      "READY line on ctr run's stdout",
            "order": "interleaved: repetitions, links, images, modes (forward on even "
                     "repetitions, reversed on odd)",
            "prefetch_source": source,
            "lazypull_images": {"format": args.lazy_format, "level": args.lazy_level},
            "service_config": service_config,
            "wire_bytes": "tbf 'Sent' counter on the registry side's veth (frames)",
            "physical_limit": cold_report.__doc__.split("Physical limit of a start: ")[1]
            .split("\n\n")[0].replace("\n", " "),
            "setup_seconds": round(setup_s, 1),
            "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        },
        "images": images,
        "conversions": setup.conversions,
        "prefetch": setup.prefetch,
        "reads": setup.reads,
        "results": cold_report.summarize(samples, images, setup.reads),
        "samples": [s.to_json() for s in samples],
        "throughput": throughput,
    }
    paths = write_report(args, data)
    print(paths[1].read_text())
    if throughput:
        print(throughput_report(throughput, args.warm_reads))
    for s in samples:
        if s.error:
            print(f"\nFAILED {s.link} {s.image} {s.mode}:\n{s.error[:2000]}")
    print(f"\nresults: {', '.join(map(str, paths))} "
          f"(whole run {time.monotonic() - started:.0f} s)")
    return 0
