"""`lazypull convert SRC DST`: publish a lazily pullable twin of an image."""

import argparse
import asyncio
import json
import sys

from converter.access_profile import ProfileError, parse_profile
from converter.cache import default_cache_dir
from converter.image import ConversionError, ConvertOptions, ImageConverter
from converter.progress import NoProgress, TerminalProgress
from estargz import Compression
from oci.digest import DigestMismatchError
from oci.store import AuthError, NotFoundError, StoreError
from oci.transport import TransportError, open_store, registry_client, same_registry_repository

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_CONVERSION = 5

DESCRIPTION = """\
Convert every layer of an image to eStargz (gzip) or zstd:chunked, with the files
a workspace reads first placed at the front of each layer, and push the result.
The converted image stays pullable by any containerd or Docker client; lazypull's
snapshotter and stargz-snapshotter can start containers from it before it is
downloaded.

references (skopeo style):
  docker://HOST/REPO[:TAG|@DIGEST]   an image in a registry
  oci:DIR[:TAG]                      an OCI image layout on disk

exit codes:
  0 converted   2 usage error   3 authentication failed   4 image or blob not found
  5 the image cannot be converted (bad layer, manifest or config)   1 anything else

examples:
  lazypull convert docker://reg.example/ws/python:3.11 docker://reg.example/ws/python:3.11-esgz \\
      --prefetch-list hot-files.txt
  lazypull convert oci:./build:latest docker://reg.example/ws/app:latest --format zstdchunked \\
      --prefetch-profile profile.json --json
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "convert", help="convert an image into a lazily pullable one",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC", help="image to convert")
    p.add_argument("destination", metavar="DST", help="where to push the converted image")
    p.add_argument("--format", choices=["estargz", "zstdchunked"], default="estargz",
                   help="layer format (default: estargz)")
    p.add_argument("--prefetch-list", metavar="FILE",
                   help="hot files: one path or glob pattern per line, in priority order "
                        "(`*` within a path component, `**` across them; # comments)")
    p.add_argument("--prefetch-profile", metavar="FILE",
                   help="hot files from an access profile recorded on a node "
                        "(schema: converter/access_profile.schema.json)")
    p.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                   help="convert only this platform of a multi-platform image (repeatable)")
    p.add_argument("--chunk-size", type=int, default=4 << 20, metavar="BYTES",
                   help="split files into chunks of this size (default 4 MiB)")
    p.add_argument("--compression-level", type=int, metavar="N",
                   help="gzip 1-9 (default 6) or zstd 1-22 (default 3)")
    p.add_argument("--jobs", type=int, default=2, metavar="N",
                   help="layers converted at the same time (default 2)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help=f"conversion cache (default {default_cache_dir()})")
    p.add_argument("--no-cache", action="store_true", help="do not use the conversion cache")
    p.add_argument("--hosts-dir", metavar="DIR",
                   help="containerd registry hosts directory (hosts.toml layout)")
    p.add_argument("--plain-http", action="store_true",
                   help="talk plain HTTP to the registries named in SRC and DST")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST",
                   help="allow plain HTTP to this registry host (repeatable)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up on a registry connection silent this long and retry the "
                        "request (default 60)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="print the result as JSON on stdout (digests, sizes, TOC digests)")
    out.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    p.set_defaults(run=run)


def _read_list(path: str) -> tuple[str, ...]:
    with open(path, encoding="utf-8") as f:
        lines = (line.strip() for line in f)
        return tuple(line for line in lines if line and not line.startswith("#"))


def _options(args: argparse.Namespace) -> ConvertOptions:
    profile = None
    if args.prefetch_profile:
        with open(args.prefetch_profile, "rb") as f:
            profile = parse_profile(f.read())
    if args.chunk_size < 4096:
        raise ValueError("--chunk-size must be at least 4096")
    if args.timeout <= 0:
        raise ValueError("--timeout must be positive")
    return ConvertOptions(
        compression=Compression.ZSTD if args.format == "zstdchunked" else Compression.GZIP,
        chunk_size=args.chunk_size,
        level=args.compression_level,
        prefetch_patterns=_read_list(args.prefetch_list) if args.prefetch_list else (),
        profile=profile,
        platforms=tuple(args.platform),
        jobs=max(1, args.jobs),
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
    )


def _print_summary(report_json: dict) -> None:
    for manifest in report_json["manifests"]:
        print(f"{manifest['platform']}: {manifest['source_digest']} -> {manifest['digest']}")
        for layer in manifest["layers"]:
            how = "passed through" if layer["passthrough"] else (
                "from cache" if layer["cached"] else f"{layer['seconds']:.1f}s")
            print(f"  layer {layer['index']}: {layer['size'] / 1e6:8.1f} MB, "
                  f"{layer['hot_files']} hot files, prefetch {layer['prefetch_size'] or 0} B "
                  f"({how})")
        for missing in manifest["missing_hot_files"]:
            print(f"  hot file not in the image: {missing}")
    print(f"{report_json['destination']}: {report_json['digest']} "
          f"({report_json['seconds']:.1f}s)")


async def _convert(args: argparse.Namespace, options: ConvertOptions) -> dict:
    async with registry_client(hosts_dir=args.hosts_dir, plain_http=args.plain_http,
                               insecure=args.insecure_registry, timeout=args.timeout) as client:
        source = open_store(args.source, client)
        shared = same_registry_repository(args.source, args.destination)
        destination = open_store(args.destination, client, mount_from=[shared] if shared else [])
        progress = TerminalProgress() if sys.stderr.isatty() and not (
            args.quiet or args.json) else NoProgress()
        report = await ImageConverter(source, destination, options, progress).run()
        return report.to_json()


def run(args: argparse.Namespace) -> int:
    try:
        options = _options(args)
    except (OSError, ValueError, ProfileError) as exc:
        print(f"lazypull convert: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = asyncio.run(_convert(args, options))
    except TransportError as exc:
        print(f"lazypull convert: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AuthError as exc:
        print(f"lazypull convert: authentication failed: {exc}", file=sys.stderr)
        return EXIT_AUTH
    except NotFoundError as exc:
        print(f"lazypull convert: not found: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (ConversionError, ProfileError, DigestMismatchError) as exc:
        print(f"lazypull convert: cannot convert: {exc}", file=sys.stderr)
        return EXIT_CONVERSION
    except (StoreError, ValueError, OSError) as exc:
        print(f"lazypull convert: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    elif not args.quiet:
        _print_summary(report)
    for manifest in report["manifests"]:
        for missing in manifest["missing_hot_files"]:
            if args.quiet or args.json:
                print(f"lazypull convert: hot file not in the image: {missing}", file=sys.stderr)
    return EXIT_OK
