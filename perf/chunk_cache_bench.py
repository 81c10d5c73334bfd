"""Chunk cache: throughput, warm reads during a fill, memory and disk use, against an
older design.

The older design is the chunk cache of a git revision (--old, default the one before
the SQLite index: a file per chunk and an index of Python objects), loaded from
`git show`. Each case runs in a child process, a fresh interpreter: the child
reports its own figures.

- throughput: put then get (from disk) of 4 KiB and 1 MiB chunks, one at a time,
  and put_many by 256 where the design has it (the fetcher stores a request so);
- warm: reads of 4000 chunks read before (64 MiB memory tier), idle and while
  another thread stores 20000 more;
- tiny: 10^5 and 10^6 tiny chunks, shaped like the files of `perf scale`'s
  10^6-file layer (18 to 130 bytes), with the memory tier off and at the config's
  default: time, RSS, disk, files, a restart; and, in a second child, the peak of
  Python allocations (tracemalloc slows the run and adds memory of its own);
- protect: a million digests protected at once, then released.

Rates are the best of --repeat runs (the machines are shared). Figures are
reported, never asserted.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

DEFAULT_JSON = Path(__file__).parent / "results" / "chunk-cache.json"
OLD_REF = "9d6c533"
MIB = 1 << 20


def tiny(i: int) -> bytes:
    return f"many file {i:07d}\n".encode() * (1 + i % 7)


def sized(i: int, base: bytes) -> bytes:
    return i.to_bytes(8, "little") + base[8:]


def load_cache_class(impl: str) -> type:
    if impl == "new":
        from snapshotter.lazy.chunk_cache import ChunkCache
        return ChunkCache
    spec = importlib.util.spec_from_file_location("snapshotter.lazy._chunk_cache_old", impl)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ChunkCache


def disk_use(root: str) -> dict[str, int]:
    used = files = 0
    for directory, _, names in os.walk(root):
        for name in names:
            used += os.lstat(os.path.join(directory, name)).st_blocks * 512
            files += 1
    return {"disk_bytes": used, "files": files}


def rss_now() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def run_throughput(cache_class: type, root: str, size: int, count: int) -> dict:
    base = os.urandom(size)
    digests = ["sha256:" + hashlib.sha256(sized(i, base)).hexdigest() for i in range(count)]
    cache = cache_class(root, max_bytes=1 << 40, memory_bytes=0)
    start = time.perf_counter()
    for i, digest in enumerate(digests):
        cache.put(digest, sized(i, base))
    put_s = time.perf_counter() - start
    start = time.perf_counter()
    for digest in digests:
        assert cache.get(digest) is not None
    get_s = time.perf_counter() - start
    figures = {"put_per_s": count / put_s, "get_per_s": count / get_s,
               "put_mb_s": count * size / put_s / 1e6, "get_mb_s": count * size / get_s / 1e6}
    if hasattr(cache, "put_many"):  # as the fetcher stores a request's chunks
        batched = cache_class(root + "-batched", max_bytes=1 << 40, memory_bytes=0)
        start = time.perf_counter()
        for first in range(0, count, 256):
            batched.put_many((digests[i], sized(i, base))
                             for i in range(first, min(count, first + 256)))
        figures["put_many_per_s"] = count / (time.perf_counter() - start)
    return figures


def run_tiny(cache_class: type, root: str, count: int, memory_mib: int, traced: bool) -> dict:
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    cache = cache_class(root, max_bytes=1 << 40, memory_bytes=memory_mib * MIB)
    for i in range(count):
        data = tiny(i)
        cache.put("sha256:" + hashlib.sha256(data).hexdigest(), data)
    figures: dict = {"seconds": time.perf_counter() - start}
    if traced:
        return {"traced_peak_bytes": tracemalloc.get_traced_memory()[1],
                "traced_seconds": figures["seconds"]}
    figures["rss_bytes"] = rss_now()
    figures["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    cache_class(root, max_bytes=1 << 40, memory_bytes=0)  # a restart
    figures["reopen_seconds"] = time.perf_counter() - start
    return {**figures, **disk_use(root)}


def run_protect(cache_class: type, root: str, count: int, traced: bool) -> dict:
    """Protect `count` digests (a warm image's layer of that many chunks), release."""
    cache = cache_class(root, max_bytes=1 << 40, memory_bytes=0)
    digests = ("sha256:" + hashlib.sha256(tiny(i)).hexdigest() for i in range(count))
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    cache.protect(digests, "image")
    figures = {"protect_seconds": time.perf_counter() - start}
    if traced:
        return {"traced_peak_bytes": tracemalloc.get_traced_memory()[1]}
    figures["rss_bytes"] = rss_now()
    start = time.perf_counter()
    cache.release("image")
    return {**figures, "release_seconds": time.perf_counter() - start}


def run_warm(cache_class: type, root: str, warm: int, fill: int, memory_mib: int) -> dict:
    """Reads of `warm` 4 KiB chunks, read once before, while another thread stores
    `fill` more (as a background fetch does, a request's chunks at a time)."""
    base = os.urandom(4096)
    chunks = [(f"sha256:{hashlib.sha256(sized(i, base)).hexdigest()}", i)
              for i in range(warm + fill)]
    cache = cache_class(root, max_bytes=1 << 40, memory_bytes=memory_mib * MIB)
    for digest, i in chunks[:warm]:
        cache.put(digest, sized(i, base))
        cache.get(digest)

    def reads_per_s(until: Callable[[], bool]) -> float:
        done, start = 0, time.perf_counter()
        while not until():
            for digest, _ in chunks[:warm:7]:
                assert cache.get(digest) is not None
            done += len(chunks[:warm:7])
        return done / (time.perf_counter() - start)

    idle_until = time.perf_counter() + 2
    idle = reads_per_s(lambda: time.perf_counter() > idle_until)
    filled = threading.Event()

    def fill_cache() -> None:
        batch = hasattr(cache, "put_many")
        for first in range(warm, warm + fill, 256):
            part = [(digest, sized(i, base)) for digest, i in chunks[first:first + 256]]
            if batch:
                cache.put_many(part)
            else:
                for digest, data in part:
                    cache.put(digest, data)
        filled.set()

    start = time.perf_counter()
    filler = threading.Thread(target=fill_cache)
    filler.start()
    during = reads_per_s(filled.is_set)
    filler.join()
    return {"warm_reads_idle_per_s": idle, "warm_reads_during_fill_per_s": during,
            "fill_puts_per_s": fill / (time.perf_counter() - start)}


def child(impl: str, case: str, root: str, a: int, b: int, traced: bool) -> dict:
    cache_class = load_cache_class(impl)
    if case == "throughput":
        return run_throughput(cache_class, root, a, b)
    if case == "protect":
        return run_protect(cache_class, root, a, traced)
    if case == "warm":
        return run_warm(cache_class, root, a, b, 64)
    return run_tiny(cache_class, root, a, b, traced)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf chunk-cache", description=__doc__)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/lazypull-perf-chunk-cache"),
                   help="where the caches are written (emptied first)")
    p.add_argument("--old", default=OLD_REF, help="git revision of the design to compare")
    p.add_argument("--tiny", type=int, nargs="+", default=[100_000, 1_000_000],
                   help="counts of tiny chunks (default: %(default)s)")
    p.add_argument("--memory-mib", type=int, nargs="+", default=[0, 256],
                   help="memory tier sizes for the tiny cases (256: the config default)")
    p.add_argument("--cases", nargs="+", default=["throughput", "warm", "tiny", "protect"],
                   choices=["throughput", "warm", "tiny", "protect"])
    p.add_argument("--impl", nargs="+", default=["old", "new"], choices=["old", "new"])
    p.add_argument("--protect", type=int, default=1_000_000, help="digests protected at once")
    p.add_argument("--repeat", type=int, default=3, help="runs of each throughput case")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        impl, case, root, a, b, traced = args.child
        print(json.dumps(child(impl, case, root, int(a), int(b), traced == "1")))
        return 0
    subprocess.run(["rm", "-rf", str(args.workdir)], check=True)
    args.workdir.mkdir(parents=True)
    old = args.workdir / "old_chunk_cache.py"
    old.write_text(subprocess.run(["git", "show", f"{args.old}:snapshotter/lazy/chunk_cache.py"],
                                  check=True, capture_output=True, text=True,
                                  cwd=Path(__file__).parent).stdout)
    groups = {"throughput": [("throughput", 4096, 20_000), ("throughput", MIB, 256)],
              "tiny": [("tiny", n, mib) for n in args.tiny for mib in args.memory_mib],
              "protect": [("protect", args.protect, 0)],
              "warm": [("warm", 4000, 20_000)]}
    cases = [case for group in args.cases for case in groups[group]]
    results = []
    for case, a, b in cases:
        for name in args.impl:
            impl = str(old) if name == "old" else "new"
            figures = {"impl": name, "case": case, "a": a, "b": b}
            runs = [False] * args.repeat if case in ("throughput", "warm") else [False, True]
            for traced in runs:
                root = args.workdir / f"{figures['impl']}-{case}-{a}-{b}-{int(traced)}"
                done = subprocess.run(
                    [sys.executable, "-m", "perf", "chunk-cache", "--child", impl, case,
                     str(root), str(a), str(b), str(int(traced))],
                    check=True, capture_output=True, text=True)
                for name, value in json.loads(done.stdout).items():  # rates: the best run
                    figures[name] = max(value, figures.get(name, value)) \
                        if name.endswith("_s") else value
                subprocess.run(["rm", "-rf", str(root), f"{root}-batched"], check=True)
            results.append(figures)
            print(json.dumps(figures), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {args.json}")
    return 0
