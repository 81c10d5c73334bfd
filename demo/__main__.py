"""`make demo`: first the format (convert a realistic layer, this interpreter's
standard library, to eStargz and zstd:chunked with the files an interpreter start
reads placed first, verify both blobs, print what a build pipeline records), then
the main job end to end (demo/lazy_start.py). Needs no network beyond loopback."""

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time

from estargz import BlobReader, BuildOptions, Compression, FileSource, build
from estargz.verify import verify_blob

_WORKLOAD = "import json, logging, email.message, argparse, pathlib"


def hot_files(stdlib: str) -> list[str]:
    """Files a small workload imports, in import order, relative to the stdlib."""
    probe = (
        f"import sys; {_WORKLOAD}; "
        "print('\\n'.join(getattr(m, '__file__', None) or '' for m in sys.modules.values()))"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True).stdout
    root = os.path.realpath(stdlib) + os.sep
    paths = [os.path.realpath(p) for p in out.splitlines() if p]
    return [p[len(root):] for p in paths if p.startswith(root)]


def make_layer(stdlib: str, path: str) -> int:
    skip = {"__pycache__", "test", "idlelib", "site-packages", "tkinter", "turtledemo"}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if set(info.name.split("/")) & skip else info

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(stdlib, arcname=".", filter=keep)
    return os.path.getsize(path)


def main() -> int:
    stdlib = sysconfig.get_paths()["stdlib"]
    with tempfile.TemporaryDirectory(prefix="lazypull-demo-") as tmp:
        layer = os.path.join(tmp, "layer.tar")
        tar_size = make_layer(stdlib, layer)
        hot = hot_files(stdlib)
        print(f"layer: {stdlib} -> {tar_size / 1e6:.1f} MB tar; "
              f"{len(hot)} hot files from `{_WORKLOAD}`")
        for compression in Compression:
            blob = os.path.join(tmp, f"layer.{compression}")
            options = BuildOptions(compression=compression, prioritized_files=hot)
            started = time.perf_counter()
            with open(layer, "rb") as src, open(blob, "wb") as out:
                result = build(src, out, options)
            seconds = time.perf_counter() - started
            with FileSource.open(blob) as source:
                report = verify_blob(source, result.toc_digest)
                reader = BlobReader.open(source, result.toc_digest)
                # The first hot file must lie inside the prefetch region.
                first_hot = reader.lookup(hot[0])
                assert first_hot is not None
                assert first_hot.chunks[0].blob_offset < report.prefetch_size
            summary = {
                "format": "eStargz (gzip)" if compression is Compression.GZIP else "zstd:chunked",
                "blob_size": result.blob_size,
                "uncompressed_size": result.uncompressed_size,
                "compression_ratio": round(result.uncompressed_size / result.blob_size, 2),
                "prefetch_region_bytes": result.prefetch_size,
                "toc_digest": result.toc_digest,
                "diff_id": result.diff_id,
                "blob_digest": result.blob_digest,
                "throughput_MBps": round(tar_size / seconds / 1e6, 1),
                "verified": f"{report.regular_files} files, {report.chunks} chunks, "
                            f"{report.members} members",
                "missing_hot_files": result.missing_prioritized,
            }
            print(json.dumps(summary, indent=2))
    from demo import lazy_start

    print("\nlazy start of a workspace image, on this machine:")
    return lazy_start.main()


if __name__ == "__main__":
    sys.exit(main())
