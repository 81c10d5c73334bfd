"""Peak memory and time of the eStargz writer on a layer of many small files and on
a layer of one big file.

Each conversion runs in a child process, a fresh interpreter, so one case's heap
never carries into the next; the child reports its own peak RSS and wall time.
The generated tars are kept in the work directory and reused by later runs (the
one of a million files takes about a minute to write). Figures are reported,
never asserted.
"""

import argparse
import io
import json
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from estargz import BuildOptions, Compression, build

DEFAULT_JSON = Path(__file__).parent / "results" / "writer-memory.json"
GIB = 1 << 30


def many_files_tar(path: Path, files: int) -> None:
    """`files` small files, a thousand to a directory, as a PAX tar."""
    with open(path, "wb") as out, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(files):
            if i % 1000 == 0:
                info = tarfile.TarInfo(f"d{i // 1000:04d}")
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tar.addfile(info)
            data = f"file {i}\n".encode()
            info = tarfile.TarInfo(f"d{i // 1000:04d}/f{i:07d}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
            tar.members.clear()  # tarfile would keep every member it wrote


class _MostlyZeros(io.RawIOBase):
    """Zeros with a few bytes of text every MiB, so chunks are not all alike."""

    def __init__(self, size: int):
        self.left = size
        self.done = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left, 1 << 20)
        buffer[:n] = bytes(n)
        mark = b"MiB %d" % (self.done >> 20)
        buffer[: min(n, len(mark))] = mark[:n]
        self.left -= n
        self.done += n
        return n


def big_file_tar(path: Path, size: int) -> None:
    with open(path, "wb") as out, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big.bin")
        info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
        tar.addfile(info, io.BufferedReader(_MostlyZeros(size), 1 << 20))


def convert(tar: Path, blob: Path, compression: str) -> dict[str, object]:
    """Runs in the child: converts and reports its own figures."""
    start = time.monotonic()
    with open(tar, "rb") as src, open(blob, "wb") as out:
        result = build(src, out, BuildOptions(compression=Compression(compression)))
    return {
        "seconds": round(time.monotonic() - start, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "entries": result.entry_count,
        "blob_bytes": result.blob_size,
        "blob_digest": result.blob_digest,
        "toc_digest": result.toc_digest,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf writer-memory", description=__doc__)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/lazypull-perf-writer"),
                   help="where the tars are generated and kept, and blobs are written")
    p.add_argument("--files", type=int, nargs="+", default=[100_000, 1_000_000],
                   help="file counts of the many-files layers (default: %(default)s)")
    p.add_argument("--big-gib", type=float, default=2.0,
                   help="size of the one-file layer in GiB, 0 to leave it out")
    p.add_argument("--compression", nargs="+", default=["gzip"], choices=["gzip", "zstd"])
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--child", nargs=3, metavar=("TAR", "BLOB", "COMPRESSION"),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        tar, blob, compression = args.child
        print(json.dumps(convert(Path(tar), Path(blob), compression)))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    layers = {f"{n}-files": (many_files_tar, n) for n in args.files}
    if args.big_gib:
        layers[f"{args.big_gib:g}-gib-file"] = (big_file_tar, int(args.big_gib * GIB))
    results = []
    for name, (make, param) in layers.items():
        tar = args.workdir / f"{name}.tar"
        if not tar.exists():
            print(f"writing {tar} ...", file=sys.stderr)
            partial = tar.with_suffix(".partial")
            make(partial, param)
            partial.rename(tar)
        for compression in args.compression:
            blob = args.workdir / f"{name}.{compression}.blob"
            child = subprocess.run(
                [sys.executable, "-m", "perf", "writer-memory", "--child", str(tar), str(blob),
                 compression], check=True, capture_output=True, text=True)
            figures = {"layer": name, "tar_bytes": tar.stat().st_size,
                       "compression": compression, **json.loads(child.stdout)}
            blob.unlink()
            results.append(figures)
            print(f"{name:>16} {compression:<5} peak RSS {figures['peak_rss_mib']:>8} MiB"
                  f"  {figures['seconds']:>7} s  {figures['entries']} TOC entries")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {args.json}")
    return 0
