"""`lazypull estargz build|verify|toc`: the format library on the command line."""

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict

from estargz import TOC, BlobReader, BuildOptions, Compression, FileSource, FormatError, build
from estargz.verify import verify_blob


def register(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("estargz", help="build, inspect and verify eStargz blobs")
    sub = group.add_subparsers(dest="estargz_command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="convert an uncompressed tar into an eStargz blob")
    p.add_argument("input", metavar="IN.tar", help="uncompressed tar ('-' for stdin)")
    p.add_argument("output", metavar="OUT", help="blob to write")
    p.add_argument("--prioritize-file", metavar="F",
                   help="file listing paths to place first, one per line, in priority order")
    p.add_argument("--zstd", action="store_true", help="write zstd:chunked instead of gzip")
    p.add_argument("--chunk-size", type=_chunk_size, default=4 << 20, metavar="N",
                   help="split files into chunks of N bytes (at least 512; default 4 MiB)")
    p.add_argument("--level", type=int, metavar="N",
                   help="compression level (default 6 for gzip, 3 for zstd)")
    p.add_argument("--workers", type=_positive, metavar="N", help="compression threads")
    p.set_defaults(run=_build)

    p = sub.add_parser("verify", help="fully check a blob against its TOC")
    p.add_argument("blob", metavar="BLOB")
    p.add_argument("--toc-digest", metavar="D", help="expected TOC digest (layer annotation)")
    p.set_defaults(run=_verify)

    p = sub.add_parser("toc", help="print a blob's TOC as JSON")
    p.add_argument("blob", metavar="BLOB")
    p.add_argument("--toc-digest", metavar="D", help="expected TOC digest (layer annotation)")
    p.set_defaults(run=_toc)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _chunk_size(text: str) -> int:
    value = _positive(text)
    if value < 512:
        raise argparse.ArgumentTypeError(f"{text} is smaller than a tar block (512)")
    return value


def _read_priority_list(path: str) -> list[str]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        lines = [line.strip() for line in data.decode("utf-8").splitlines()]
    except UnicodeDecodeError:
        raise FormatError(f"{path}: the prioritized file list is not UTF-8 text") from None
    return [line for line in lines if line and not line.startswith("#")]


def _build(args: argparse.Namespace) -> int:
    prioritized = _read_priority_list(args.prioritize_file) if args.prioritize_file else []
    options = BuildOptions(
        compression=Compression.ZSTD if args.zstd else Compression.GZIP,
        chunk_size=args.chunk_size,
        level=args.level,
        prioritized_files=prioritized,
        workers=args.workers,
    )
    started = time.monotonic()
    try:
        with open(args.output, "wb") as out:
            if args.input == "-":
                result = build(sys.stdin.buffer, out, options)
            else:
                with open(args.input, "rb") as tar:
                    result = build(tar, out, options)
    except BaseException:
        # A half-written blob must not look like a result.
        with contextlib.suppress(OSError):
            os.unlink(args.output)
        raise
    report = asdict(result)
    report["seconds"] = round(time.monotonic() - started, 3)
    for name in result.missing_prioritized:
        print(f"lazypull: prioritized file not in the layer: {name}", file=sys.stderr)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


def _verify(args: argparse.Namespace) -> int:
    with FileSource.open(args.blob) as source:
        report = verify_blob(source, args.toc_digest)
    json.dump(asdict(report), sys.stdout, indent=2)
    print()
    if args.toc_digest is None:
        print("lazypull: no --toc-digest given: the TOC was checked against the stream only",
              file=sys.stderr)
    return 0


def _toc(args: argparse.Namespace) -> int:
    with FileSource.open(args.blob) as source:
        reader = BlobReader.open(source, args.toc_digest)
        with reader.layer:
            toc = TOC(entries=list(reader.toc_entries()))
    sys.stdout.buffer.write(toc.to_json_bytes() + b"\n")
    return 0
