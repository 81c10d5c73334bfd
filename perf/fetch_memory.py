"""Fetch memory: what a layer's background fetch leaves in the process, in process.

Builds (once, cached under --workdir) an eStargz layer of --files tiny distinct files,
1000 to a directory, opens its index as the FUSE manager does and runs
LayerFetcher.fetch_all over it with reads from the blob file (no registry: the fetch
path's own memory is measured). While it runs, a task on the same event loop wakes
every --tick ms and records how late it woke: what a FUSE operation would wait behind
background work. Reported:

- RSS (VmRSS of /proc/self/status) before and after, and VmHWM;
- tracemalloc's peak and what had grown halfway through the fetch, with the
  top allocation sites of that growth (--top);
- the loop's wake-up lateness p50/p99/max during fetch_all (late), and first for
  --idle-seconds with nothing else running (idle: the machine's own noise); and the
  time of a path lookup in the layer's index made on the loop at each tick, as a FUSE
  lookup makes it (lookups, idle_lookups).

`python -m perf fetch-memory --files 100000`; --no-tracemalloc for RSS and lateness
without tracemalloc's own overhead.
"""

import argparse
import asyncio
import ctypes
import gc
import io
import os
import random
import sys
import tarfile
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import estargz
from snapshotter.lazy.chunk_cache import ChunkCache
from snapshotter.lazy.fetcher import LayerFetcher

MB = 1e6


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def trimmed_rss() -> int:
    """VmRSS once glibc has returned its free pages (what fragmentation held)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status("VmRSS")


def file_bytes(i: int) -> bytes:
    return f"file {i}\n".encode() * (1 + i % 7)


def tar_of(files: int) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(files):
            if i % 1000 == 0:
                info = tarfile.TarInfo(f"many/d{i // 1000:05d}")
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            data = file_bytes(i)
            info = tarfile.TarInfo(f"many/d{i // 1000:05d}/f{i:07d}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def ensure_blob(files: int, workdir: Path) -> tuple[Path, str]:
    blob = workdir / f"many-{files}.blob"
    digest_file = blob.with_suffix(".toc")
    if not blob.exists() or not digest_file.exists():
        with open(blob, "wb") as out:
            result = estargz.build(tar_of(files), out, estargz.BuildOptions(workers=2))
        digest_file.write_text(result.toc_digest)
    return blob, digest_file.read_text()


async def lateness(tick: float, stop: asyncio.Event, out: list[float],
                   halfway: Callable[[], bool], midway: dict,
                   lookup: Callable[[], object], lookups: list[float]) -> None:
    """Wake-up lateness every `tick` s, and the time of one `lookup` in the index as a
    FUSE lookup makes it; RSS and a tracemalloc snapshot once `halfway`."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        planned = loop.time() + tick
        await asyncio.sleep(tick)
        out.append(loop.time() - planned)
        started = time.perf_counter()
        lookup()
        lookups.append(time.perf_counter() - started)
        if not midway and halfway():
            midway["rss"] = status("VmRSS")
            if tracemalloc.is_tracing():
                midway["snapshot"] = tracemalloc.take_snapshot()


def summary(seconds: list[float]) -> str:
    return (f"n {len(seconds)}, p50 {pct(seconds, 0.5) * 1000:.3f}, "
            f"p99 {pct(seconds, 0.99) * 1000:.3f}, max {max(seconds, default=0) * 1000:.3f}")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def measure(layer: estargz.Layer, blob: Path, cache: ChunkCache, args) -> dict:
    fd = os.open(blob, os.O_RDONLY)

    async def read_range(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    last_lookup = [0.0]  # as LazyFilesystem.last_request_at
    fetcher = LayerFetcher(layer, read_range, cache, foreground_idle=(
        (lambda: time.monotonic() - last_lookup[0]) if args.give_way else None))
    # The same probe with nothing else to do: what the machine's other work costs.
    rng = random.Random(1)

    probe_layer = args.probe_layer or layer

    def lookup() -> object:
        i = rng.randrange(args.files)
        found = probe_layer.lookup(f"many/d{i // 1000:05d}/f{i:07d}")
        last_lookup[0] = time.monotonic()
        return found

    stop, idle, idle_lookups = asyncio.Event(), [], []
    ticker = asyncio.create_task(lateness(args.tick / 1000, stop, idle, lambda: False, {},
                                          lookup, idle_lookups))
    await asyncio.sleep(args.idle_seconds)
    stop.set()
    await ticker
    stop, late, midway, lookups = asyncio.Event(), [], {}, []
    size = blob.stat().st_size
    ticker = asyncio.create_task(lateness(
        args.tick / 1000, stop, late,
        lambda: fetcher.stats.background_bytes >= size // 2, midway, lookup, lookups))
    started = time.monotonic()
    fetched = await fetcher.fetch_all()
    seconds = time.monotonic() - started
    stop.set()
    await ticker
    os.close(fd)
    return {"fetched": fetched, "seconds": seconds, "late": late, "idle": idle,
            "lookups": lookups, "idle_lookups": idle_lookups,
            "fetcher": fetcher,
            "midway": midway}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf fetch-memory")
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir())
                        / "lazypull-perf-fetch-memory")
    parser.add_argument("--tick", type=float, default=1.0, help="lateness probe period (ms)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--idle-seconds", type=float, default=3.0,
                        help="lateness probe alone first, for how noisy the machine is")
    parser.add_argument("--no-tracemalloc", action="store_true")
    parser.add_argument("--give-way", action="store_true",
                        help="background requests give way to the probe's lookups, as they "
                             "do to FUSE requests in the FUSE manager")
    parser.add_argument("--separate-probe-index", action="store_true",
                        help="look paths up in an index of their own (no shared lock)")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval in ms (default: Python's, 5 ms)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval / 1000)
    blob, toc_digest = ensure_blob(args.files, args.workdir)
    with estargz.FileSource.open(str(blob)) as source:  # its index: a temporary file
        layer = estargz.BlobReader.open(source, toc_digest).layer
        args.probe_layer = estargz.BlobReader.open(source, toc_digest).layer \
            if args.separate_probe_index else None
    with tempfile.TemporaryDirectory(dir=args.workdir) as cache_dir:
        cache = ChunkCache(cache_dir, max_bytes=4 << 30)
        gc.collect()
        rss_before = status("VmRSS")
        if not args.no_tracemalloc:
            tracemalloc.start(8)
            before = tracemalloc.take_snapshot()
        result = asyncio.run(measure(layer, blob, cache, args))
        fetcher, midway = result.pop("fetcher"), result.pop("midway")
        gc.collect()
        out = {"files": args.files, "spans": layer.span_count,
               "fetched_bytes": result["fetched"], "seconds": round(result["seconds"], 1),
               "rss_before_mb": rss_before / MB,
               "rss_halfway_mb": midway.get("rss", 0) / MB, "rss_after_mb": status("VmRSS") / MB,
               "hwm_mb": status("VmHWM") / MB,
               "inflight_after": len(fetcher._inflight), "refused_after": len(fetcher._refused),
               **{f"{key}_ms": summary(result[key]) for key in
                  ("idle", "late", "idle_lookups", "lookups")}}
        out["rss_after_trim_mb"] = trimmed_rss() / MB
        if not args.no_tracemalloc:
            current, peak = tracemalloc.get_traced_memory()
            out["traced_current_mb"], out["traced_peak_mb"] = current / MB, peak / MB
            diff = midway.get("snapshot", tracemalloc.take_snapshot()).compare_to(
                before, "traceback")
            out["top_growth"] = [f"{s.size_diff / MB:.1f} MB in {s.count_diff} blocks at "
                                 + " <- ".join(f"{Path(f.filename).name}:{f.lineno}"
                                               for f in list(s.traceback)[::-1][:4])
                                 for s in diff[:args.top]]
            tracemalloc.stop()
        cache.close()
        del fetcher
    for key, value in out.items():
        if isinstance(value, list):
            print(f"{key}:")
            for line in value:
                print(f"  {line}")
        else:
            print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
