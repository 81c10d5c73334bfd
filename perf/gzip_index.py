"""gzindex on a real-ish layer: index size against the layer, indexing and read
throughput, and the two ways of resuming inflation at a checkpoint.

The layer is a tar of /usr/lib/python3* gzipped at level 6 (or --layer FILE, any
gzip tar). For each spacing the index is built in a child process, which reports
its wall time and peak RSS; reads go through `LayerReader` over the local file:
the whole layer in order, and random 4 KiB reads (each inflates a whole span).
Figures are reported, never asserted.
"""

import argparse
import glob
import gzip
import json
import random
import resource
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import gzindex
from gzindex.reader import Span, inflate_span

DEFAULT_JSON = Path(__file__).parent / "results" / "gzip-index.json"
DEFAULT_WORKDIR = Path("/tmp/lazypull-perf-gzip-index")


def python_lib_layer(workdir: Path) -> Path:
    """A tar of /usr/lib/python3*, gzipped at level 6; kept for later runs."""
    layer = workdir / "python-lib.tar.gz"
    if layer.exists():
        return layer
    workdir.mkdir(parents=True, exist_ok=True)
    partial = layer.with_suffix(".part")
    with open(partial, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6,
                                                   mtime=0) as out, \
            tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for root in sorted(glob.glob("/usr/lib/python3*")):
            tar.add(root, arcname=root.lstrip("/"))
    partial.rename(layer)
    return layer


def _child_build(layer: str, spacing: int, out: str) -> None:
    started = time.perf_counter()
    with open(layer, "rb") as blob, open(out, "wb") as index:
        result = gzindex.build_index(blob, index, spacing=spacing)
    print(json.dumps({"seconds": time.perf_counter() - started,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "spans": result.span_count, "files": result.file_count,
                      "uncompressed": result.uncompressed_size}))


def _shift_resume(span: Span, window: bytes, compressed: bytes) -> bytes:
    """Resume by shifting the compressed bytes right by the skipped bits (Python's
    zlib has no inflatePrime)."""
    if span.skip_bits:
        value = int.from_bytes(compressed, "little") >> span.skip_bits
        compressed = value.to_bytes(len(compressed), "little")
    inflater = zlib.decompressobj(-15, zdict=window) if window else zlib.decompressobj(-15)
    return inflater.decompress(compressed, span.uncompressed_size)


def _prime_resume(span: Span, window: bytes, compressed: bytes) -> bytes:
    """Resume with zlib's inflatePrime and inflateSetDictionary (what gzindex does)."""
    return inflate_span(span, window, compressed)[0]


def measure(layer: Path, spacing: int, workdir: Path, random_reads: int) -> dict[str, object]:
    index_path = workdir / f"index-{spacing}"
    done = subprocess.run([sys.executable, "-m", "perf.gzip_index", "--child-build", str(layer),
                           str(spacing), str(index_path)], capture_output=True, text=True,
                          check=True)
    build = json.loads(done.stdout)
    layer_size = layer.stat().st_size
    index = gzindex.GzipIndex.open(index_path)
    sections = index.header.sections
    blob = layer.open("rb")
    reader = gzindex.LayerReader(index, gzindex.file_fetcher(blob), cache_spans=0)
    started = time.perf_counter()
    for _ in reader.iter_range(0, index.uncompressed_size):
        pass
    sequential = time.perf_counter() - started
    rng = random.Random(1)
    started = time.perf_counter()
    for _ in range(random_reads):
        offset = rng.randrange(max(1, index.uncompressed_size - 4096))
        reader.read(offset, offset + 4096)
    random_seconds = (time.perf_counter() - started) / random_reads
    resume: dict[str, float] = {}
    for name, method in (("shift", _shift_resume), ("inflatePrime", _prime_resume)):
        started = time.perf_counter()
        for span in index.spans():
            offset, length = span.compressed_range
            blob.seek(offset)
            method(span, index.window(span), blob.read(length))
        resume[name] = round(index.uncompressed_size / (time.perf_counter() - started) / 1e6, 1)
    blob.close()
    index.close()
    return {
        "spacing": spacing,
        "layer_bytes": layer_size,
        "uncompressed_bytes": build["uncompressed"],
        "index_bytes": index_path.stat().st_size,
        "index_percent_of_layer": round(100 * index_path.stat().st_size / layer_size, 3),
        "windows_bytes": sections["windows"].length,
        "file_table_bytes": sections["files"].length,
        "spans": build["spans"],
        "files": build["files"],
        "index_seconds": round(build["seconds"], 3),
        "index_mb_per_s_uncompressed": round(build["uncompressed"] / build["seconds"] / 1e6, 1),
        "index_peak_rss_mib": round(build["peak_rss_mib"], 1),
        "sequential_read_mb_per_s": round(build["uncompressed"] / sequential / 1e6, 1),
        "random_4k_read_ms": round(random_seconds * 1000, 2),
        "resume_mb_per_s": resume,
    }


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child-build":
        _child_build(argv[1], int(argv[2]), argv[3])
        return 0
    parser = argparse.ArgumentParser(prog="python -m perf gzip-index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=Path, help="a gzip tar (default: python-lib layer)")
    parser.add_argument("--spacing", type=int, action="append",
                        help="bytes between checkpoints (repeatable; default 1, 2, 4, 8 MiB)")
    parser.add_argument("--random-reads", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    layer = args.layer or python_lib_layer(args.workdir)
    spacings = args.spacing or [1 << 20, 2 << 20, 4 << 20, 8 << 20]
    results = [measure(layer, s, args.workdir, args.random_reads) for s in spacings]
    started = time.perf_counter()
    with open(layer, "rb") as blob:
        inflater = zlib.decompressobj(31)
        while piece := blob.read(1 << 20):
            inflater.decompress(piece)
    baseline = round(results[0]["uncompressed_bytes"] / (time.perf_counter() - started) / 1e6, 1)
    print(f"layer {layer}: {layer.stat().st_size / 1e6:.1f} MB gzip, "
          f"{results[0]['uncompressed_bytes'] / 1e6:.1f} MB tar; plain gunzip {baseline} MB/s")
    for r in results:
        print(f"spacing {r['spacing'] >> 10:>5} KiB: index {r['index_bytes'] / 1e3:7.1f} kB "
              f"({r['index_percent_of_layer']:.2f}% of the layer), {r['spans']} spans; "
              f"indexing {r['index_mb_per_s_uncompressed']} MB/s, peak RSS "
              f"{r['index_peak_rss_mib']} MiB; sequential read {r['sequential_read_mb_per_s']} "
              f"MB/s; random 4 KiB read {r['random_4k_read_ms']} ms; resume "
              f"{r['resume_mb_per_s']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"gunzip_mb_per_s": baseline, "results": results},
                                    indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
