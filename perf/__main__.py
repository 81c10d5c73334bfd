"""Dispatch `python -m perf [BENCHMARK] [options]` to a named benchmark.

Each benchmark is a module with `main(argv: list[str]) -> int`. Modules are
imported only when chosen, so one benchmark's imports never slow down or break
another. To add a benchmark, add a line to BENCHMARKS.
"""

import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    module: str
    summary: str


BENCHMARKS: dict[str, Benchmark] = {
    "convert": Benchmark(
        "perf.convert_throughput",
        "tar -> eStargz / zstd:chunked conversion throughput against plain gzip",
    ),
    "convert-e2e": Benchmark("perf.convert_e2e", "lazypull convert via registries vs skopeo copy"),
    "snapshotter": Benchmark("perf.snapshotter_bench", "lazypull snapshotter vs native overlayfs"),
    "cold-start": Benchmark("perf.cold_start", "pull + run to READY: lazypull, stargz, full pull"),
    "warm-boot": Benchmark("perf.warm_boot", "service start to /readyz (warm set) vs full pull"),
    "scale": Benchmark("perf.scale", "memory and latency with huge layers and many images"),
    "load": Benchmark("perf.load", "waves of containers at once from lazy images on one node"),
    "gzip-index": Benchmark(
        "perf.gzip_index", "gzip layer index: size vs layer, index and read throughput"
    ),
    "gzip-hot-spans": Benchmark(
        "perf.gzip_hot_spans", "gzip index: prefetch bytes and index size with hot checkpoints"
    ),
    "writer-memory": Benchmark(
        "perf.writer_memory", "peak RSS and time converting many small files or one big file"
    ),
    "fetch-memory": Benchmark(
        "perf.fetch_memory", "a huge layer's background fetch in process: memory, loop lateness"
    ),
    "chunk-cache": Benchmark(
        "perf.chunk_cache_bench", "chunk cache put/get, memory and disk use against an older one"
    ),
}
DEFAULT = "convert"


def usage() -> str:
    lines = ["usage: python -m perf [BENCHMARK] [options]", "", "benchmarks:"]
    for name, bench in BENCHMARKS.items():
        default = " (default)" if name == DEFAULT else ""
        lines.append(f"  {name:<10} {bench.summary}{default}")
    lines += ["", "`python -m perf BENCHMARK --help` lists a benchmark's options."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help", "list"):
        print(usage())
        return 0
    # Options without a name go to the default benchmark: `python -m perf --repeat 3`.
    name, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else (DEFAULT, argv)
    bench = BENCHMARKS.get(name)
    if bench is None:
        print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(bench.module).main(rest))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
