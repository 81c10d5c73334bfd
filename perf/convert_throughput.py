"""Conversion throughput: tar -> eStargz (gzip) and zstd:chunked, against plain gzip.

Every variant compresses the same layer tar and writes its output to a file in the
same temporary directory. The tar is read once before timing, so all variants read
it from a warm page cache and disk speed drops out; outputs land in the page cache
too (no fsync). Variants run interleaved, forward on even repetitions and reversed
on odd ones, so drift of the machine (heat, neighbours) spreads over all of them
instead of biasing whichever runs last. Only medians are reported, never asserted.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import zstandard

import estargz
from perf.corpus import LayerTar, Source, build_layer_tar, default_sources
from perf.machine import describe, text_table

MB = 1_000_000
READ_BLOCK = 1 << 20
DEFAULT_JSON = Path(__file__).parent / "results" / "convert-throughput.json"

# A variant compresses (tar, out) and returns the blob digest when it has one.
Runner = Callable[[Path, Path], str | None]


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    baseline: bool
    run: Runner


@dataclass
class Samples:
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    output_bytes: set[int] = field(default_factory=set)
    digests: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Timing:
    """The head of a variant's summary, shared by the conversion benchmarks; subclasses
    add their own figures after it (and end with wall_s, as their JSON always has)."""

    name: str
    label: str
    baseline: bool
    median_s: float
    min_s: float
    max_s: float
    median_cpu_s: float


def timing(name: str, label: str, baseline: bool, samples: Samples) -> dict[str, Any]:
    """Timing's fields from a variant's samples, to pass on to a summary's constructor."""
    return {
        "name": name,
        "label": label,
        "baseline": baseline,
        "median_s": statistics.median(samples.wall_s),
        "min_s": min(samples.wall_s),
        "max_s": max(samples.wall_s),
        "median_cpu_s": statistics.median(samples.cpu_s),
    }


@dataclass(frozen=True)
class Summary(Timing):
    mb_per_s: float
    output_bytes: int
    compression_ratio: float
    vs_baseline: dict[str, float]  # our throughput / the baseline's, by baseline name
    wall_s: list[float]


# -- variants ---------------------------------------------------------------


def zlib_gzip(tar: Path, out: Path) -> str | None:
    """One gzip stream at level 6: the cost of an ordinary, non-seekable layer."""
    deflater = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    with open(tar, "rb") as src, open(out, "wb") as dst:
        while block := src.read(READ_BLOCK):
            dst.write(deflater.compress(block))
        dst.write(deflater.flush())
    return None


def gzip_command(tar: Path, out: Path) -> str | None:
    with open(out, "wb") as dst:
        subprocess.run(["gzip", "-6", "-c", str(tar)], stdout=dst, check=True)
    return None


def convert(tar: Path, out: Path, options: estargz.BuildOptions) -> str | None:
    # A seekable input file: the writer reads payloads in place instead of spooling.
    with open(tar, "rb") as src, open(out, "wb") as dst:
        return estargz.build(src, dst, options).blob_digest


def variants(workers: int) -> list[Variant]:
    gz, zstd = estargz.Compression.GZIP, estargz.Compression.ZSTD
    found: list[Variant] = [
        Variant("zlib-6", "Python zlib, one gzip stream, level 6", True, zlib_gzip),
    ]
    if shutil.which("gzip"):
        found.append(Variant("gzip-6", "gzip -6 -c (system command)", True, gzip_command))
    ours = [
        ("estargz-gzip", f"estargz gzip, level 6, {workers} workers (default)", gz, None),
        ("zstd-chunked", f"zstd:chunked, level 3, {workers} workers (default)", zstd, None),
        ("estargz-gzip-w1", "estargz gzip, level 6, workers=1", gz, 1),
    ]
    for name, label, compression, count in ours:
        options = estargz.BuildOptions(compression=compression, workers=count)
        found.append(Variant(name, label, False, partial(convert, options=options)))
    return found


# -- measuring --------------------------------------------------------------


def warm(path: Path) -> None:
    """Read the whole file once so every timed run reads it from the page cache."""
    with open(path, "rb") as src:
        while src.read(READ_BLOCK):
            pass


def cpu_seconds() -> float:
    # process_time() counts all our threads; RUSAGE_CHILDREN adds the gzip command.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def schedule(found: list[Variant], repeat: int) -> Iterator[tuple[int, Variant]]:
    for rep in range(repeat):
        for variant in found if rep % 2 == 0 else found[::-1]:
            yield rep, variant


def time_once(variant: Variant, tar: Path, out: Path, samples: Samples) -> float:
    out.unlink(missing_ok=True)
    cpu0, start = cpu_seconds(), time.perf_counter()
    digest = variant.run(tar, out)
    wall = time.perf_counter() - start
    samples.cpu_s.append(cpu_seconds() - cpu0)
    samples.wall_s.append(wall)
    samples.output_bytes.add(out.stat().st_size)
    if digest is not None:
        samples.digests.add(digest)
    out.unlink()
    return wall


def measure(found: list[Variant], tar: Path, workdir: Path, repeat: int) -> dict[str, Samples]:
    samples = {v.name: Samples() for v in found}
    for rep, variant in schedule(found, repeat):
        wall = time_once(variant, tar, workdir / f"out-{variant.name}", samples[variant.name])
        print(f"  rep {rep + 1}/{repeat}  {variant.name:<16} {wall:7.2f} s", file=sys.stderr)
    return samples


# -- summarizing ------------------------------------------------------------


def summarize(found: list[Variant], samples: dict[str, Samples], input_bytes: int) -> list[Summary]:
    medians = {name: statistics.median(s.wall_s) for name, s in samples.items()}
    baselines = [v.name for v in found if v.baseline]
    summaries = []
    for v in found:
        s, median = samples[v.name], medians[v.name]
        size = max(s.output_bytes)  # the same every run; max() just picks the one value
        vs = {} if v.baseline else {b: medians[b] / median for b in baselines}
        summaries.append(
            Summary(
                **timing(v.name, v.label, v.baseline, s),
                mb_per_s=input_bytes / MB / median,
                output_bytes=size,
                compression_ratio=input_bytes / size,
                vs_baseline=vs,
                wall_s=s.wall_s,
            )
        )
    return summaries


def deterministic(samples: dict[str, Samples]) -> bool:
    """The gzip blob must not depend on the worker count (nor differ between runs)."""
    digests = samples["estargz-gzip"].digests | samples["estargz-gzip-w1"].digests
    return len(digests) == 1


def table(summaries: list[Summary]) -> str:
    baselines = [s.name for s in summaries if s.baseline]
    head = ["variant", "median s", "min-max s", "MB/s", "CPU s", "out MB", "ratio"]
    head += [f"x {b}" for b in baselines]
    rows = [head]
    for s in summaries:
        row = [
            s.name,
            f"{s.median_s:.2f}",
            f"{s.min_s:.2f}-{s.max_s:.2f}",
            f"{s.mb_per_s:.1f}",
            f"{s.median_cpu_s:.2f}",
            f"{s.output_bytes / MB:.1f}",
            f"{s.compression_ratio:.2f}",
        ]
        row += [f"{s.vs_baseline[b]:.2f}" if b in s.vs_baseline else "-" for b in baselines]
        rows.append(row)
    lines = text_table(rows)
    lines.append("")
    lines += [f"{s.name:<16} {s.label}" for s in summaries]
    return "\n".join(lines)


# -- report -----------------------------------------------------------------


def environment(workers: int) -> dict[str, object]:
    return describe("gzip") | {
        "estargz_default_workers": workers,
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "zstandard": zstandard.__version__,
        "libzstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
    }


def report(
    args: argparse.Namespace,
    layer: LayerTar,
    summaries: list[Summary],
    same_blob: bool,
    env: dict[str, object],
) -> dict[str, object]:
    by_name = {s.name: s for s in summaries}
    return {
        "benchmark": "convert-throughput",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": env,
        "input": {
            "sources": layer.roots,
            "target_bytes": int(args.size_mb * MB),
            "tar_bytes": layer.size,
            "entries": layer.entries,
            "regular_files": layer.regular_files,
            "short_of_target": layer.short,
            "page_cache": "warm: read once in full before timing",
        },
        "method": {
            "repeat": args.repeat,
            "order": "interleaved; forward on even repetitions, reversed on odd",
            "statistic": "median wall time",
            "mb": "10^6 bytes of uncompressed input tar",
            "output": "written to a file in the temporary directory, no fsync",
        },
        "variants": [asdict(s) for s in summaries],
        "parallel_speedup": by_name["estargz-gzip-w1"].median_s / by_name["estargz-gzip"].median_s,
        "gzip_blob_same_for_any_workers": same_blob,
    }


def print_report(
    repeat: int, layer: LayerTar, summaries: list[Summary], data: dict[str, object]
) -> None:
    print(
        f"input: {layer.size / MB:.1f} MB tar, {layer.entries} entries "
        f"({layer.regular_files} regular files) from {', '.join(layer.roots)}"
    )
    print("input read once before timing: every run reads it from a warm page cache")
    print(
        f"median of {repeat} runs per variant, interleaved in alternating order; "
        "MB = 10^6 bytes of input tar; x B = our MB/s / baseline B's MB/s"
    )
    print()
    print(table(summaries))
    print()
    print(f"parallel speedup, estargz-gzip over workers=1: {data['parallel_speedup']:.2f}x")
    same = "yes" if data["gzip_blob_same_for_any_workers"] else "NO (a determinism bug)"
    print(f"gzip blob identical for default workers and workers=1: {same}")


# -- entry point ------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m perf convert",
        description="Throughput of tar -> eStargz / zstd:chunked against plain gzip -6.",
    )
    parser.add_argument(
        "--size-mb",
        type=float,
        default=200.0,
        help="size of the input tar in MB of 10^6 bytes (default: 200)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        action="append",
        metavar="DIR",
        help="directory tree to build the tar from, repeatable "
        "(default: the Python stdlib, then Perl and /usr/lib trees if needed)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs per variant (default: 5)")
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help=f"where to write the JSON results (default: {DEFAULT_JSON})",
    )
    parser.add_argument(
        "--tmpdir",
        type=Path,
        default=None,
        help="where the tar and outputs go (default: the system temp dir)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size_mb <= 0:
        parser.error("--repeat and --size-mb must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sources = [Source(p) for p in args.source] if args.source else default_sources()
    workers = os.cpu_count() or 1  # what BuildOptions(workers=None) resolves to
    found = variants(workers)
    with tempfile.TemporaryDirectory(prefix="lazypull-perf-", dir=args.tmpdir) as tmp:
        workdir = Path(tmp)
        print(f"building the input tar in {workdir} ...", file=sys.stderr)
        layer = build_layer_tar(workdir / "layer.tar", sources, int(args.size_mb * MB))
        if layer.short:
            print(f"warning: sources hold only {layer.size / MB:.1f} MB", file=sys.stderr)
        warm(layer.path)
        samples = measure(found, layer.path, workdir, args.repeat)
    summaries = summarize(found, samples, layer.size)
    data = report(args, layer, summaries, deterministic(samples), environment(workers))
    print_report(args.repeat, layer, summaries, data)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nresults: {args.json}")
    return 0
