"""`lazypull index IMAGE`: publish seekable indexes of an image's gzip layers."""

import argparse
import asyncio
import json
import sys
from typing import Any

import gzindex
from indexer.image import IndexingError, IndexOptions, IndexReport, index_image
from indexer.lookup import find_layer_indexes
from oci import mediatypes as mt
from oci.access_profile import ProfileError, parse_profile
from oci.digest import DigestMismatchError
from oci.manifest import Index, ManifestError, parse_manifest
from oci.store import AuthError, NotFoundError, StoreError
from oci.transport import TransportError, parse_registry_reference, registry_client

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_INDEXING = 5

DESCRIPTION = """\
Read each gzip layer of an image once and publish a seekable index of it (file
table, gzip checkpoints, a sha256 per span) as an OCI artifact that refers to the
image manifest: through the OCI 1.1 referrers API, or the referrers tag schema
(tag sha256-<hex>) on registries without it. The image itself is not changed: its
manifests, layers, digest and tags stay as they are. lazypull's snapshotter finds
the indexes and starts containers before the layers are downloaded.

Every platform of a multi-platform image gets its own artifact (--platform picks
some). eStargz, zstd:chunked, zstd and uncompressed layers are left out.

exit codes:
  0 indexed   2 usage error   3 authentication failed   4 image or blob not found
  5 the image cannot be indexed (corrupt layer, bad manifest or config)   1 anything else

examples:
  lazypull index docker://reg.example/ws/python:3.11
  lazypull index reg.example/ws/app:latest --prefetch-profile profile.json --json
  lazypull index docker://reg.example/ws/app:latest --show
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "index", help="publish seekable indexes of an image's gzip layers",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", metavar="IMAGE", help="[docker://]HOST/REPO[:TAG|@DIGEST]")
    p.add_argument("--prefetch-profile", metavar="FILE",
                   help="mark the files of this access profile as hot "
                        "(schema: converter/access_profile.schema.json)")
    p.add_argument("--spacing", type=int, default=gzindex.DEFAULT_SPACING, metavar="BYTES",
                   help="uncompressed bytes between checkpoints (default "
                        f"{gzindex.DEFAULT_SPACING >> 20} MiB; smaller reads less per miss, "
                        "larger makes a smaller index)")
    p.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                   help="index only this platform of a multi-platform image (repeatable)")
    p.add_argument("--show", action="store_true",
                   help="index nothing: list the indexes already published for the image")
    p.add_argument("--hosts-dir", metavar="DIR",
                   help="containerd registry hosts directory (hosts.toml layout)")
    p.add_argument("--plain-http", action="store_true",
                   help="talk plain HTTP to the registry named in IMAGE")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST",
                   help="allow plain HTTP to this registry host (repeatable)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    out.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    p.set_defaults(run=run)


def _options(args: argparse.Namespace) -> IndexOptions:
    if not gzindex.MIN_SPACING <= args.spacing <= gzindex.MAX_SPACING:
        raise ValueError(f"--spacing must be between {gzindex.MIN_SPACING} and "
                         f"{gzindex.MAX_SPACING} bytes")
    profile = None
    if args.prefetch_profile:
        with open(args.prefetch_profile, "rb") as f:
            profile = parse_profile(f.read())
    return IndexOptions(spacing=args.spacing, profile=profile, platforms=tuple(args.platform))


def _print_summary(report: IndexReport) -> None:
    for manifest in report.manifests:
        print(f"{manifest.platform} {manifest.digest}")
        for layer in manifest.layers:
            if layer.skipped:
                print(f"  layer {layer.index}: skipped ({layer.skipped})")
                continue
            share = 100 * (layer.index_size or 0) / max(1, layer.size)
            print(f"  layer {layer.index}: {layer.size / 1e6:8.1f} MB, index "
                  f"{(layer.index_size or 0) / 1e3:.1f} kB ({share:.2f}%), {layer.spans} spans, "
                  f"{layer.files} files, {layer.hot_files} hot ({layer.seconds:.1f}s)")
        for missing in manifest.missing_hot_files:
            print(f"  hot file not in the image: {missing}")
        if manifest.artifact:
            how = (f"fallback tag {manifest.fallback_tag}" if manifest.fallback_tag
                   else "referrers API")
            print(f"  artifact {manifest.artifact} ({how})")
        else:
            print("  nothing to index")
    print(f"{report.image}: {report.digest} unchanged ({report.seconds:.1f}s)")


async def _index(args: argparse.Namespace, options: IndexOptions) -> IndexReport:
    reference = parse_registry_reference(args.image)
    async with registry_client(hosts_dir=args.hosts_dir, plain_http=args.plain_http,
                               insecure=args.insecure_registry) as client:
        return await index_image(client, reference, options)


async def _show(args: argparse.Namespace) -> dict[str, object]:
    reference = parse_registry_reference(args.image)
    async with registry_client(hosts_dir=args.hosts_dir, plain_http=args.plain_http,
                               insecure=args.insecure_registry) as client:
        data, media_type, digest = await client.get_manifest(reference)
        top = parse_manifest(data, media_type)
        subjects = [(d.digest, d.platform_string) for d in top.manifests
                    if d.media_type in mt.MANIFESTS] if isinstance(top, Index) else [(digest, "")]
        manifests = []
        for subject, platform in subjects:
            found = await find_layer_indexes(client, reference, subject)
            manifests.append({
                "digest": subject, "platform": platform,
                "layers": {layer: {"index": index.descriptor.digest,
                                   "size": index.descriptor.size, "artifact": index.artifact}
                           for layer, index in found.items()}})
        return {"image": str(reference), "digest": digest, "manifests": manifests}


def _print_found(result: dict[str, Any]) -> None:
    for manifest in result["manifests"]:
        print(f"{manifest['platform'] or 'image'} {manifest['digest']}")
        for layer, found in manifest["layers"].items():
            print(f"  layer {layer}: index {found['index']} ({found['size']} bytes)")
        if not manifest["layers"]:
            print("  no index published")


def _fail(message: str, code: int) -> int:
    print(f"lazypull index: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    try:
        options = _options(args)
    except (OSError, ValueError, ProfileError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        result: IndexReport | dict[str, object] = asyncio.run(
            _show(args) if args.show else _index(args, options))
    except TransportError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except AuthError as exc:
        return _fail(f"authentication failed: {exc}", EXIT_AUTH)
    except NotFoundError as exc:
        return _fail(f"not found: {exc}", EXIT_NOT_FOUND)
    except (IndexingError, ProfileError, DigestMismatchError) as exc:
        return _fail(f"cannot index: {exc}", EXIT_INDEXING)
    except (StoreError, ManifestError, gzindex.IndexFormatError, ValueError, OSError) as exc:
        return _fail(str(exc), EXIT_FAILURE)
    if isinstance(result, dict):
        if args.json:
            print(json.dumps(result, indent=2))
        elif not args.quiet:
            _print_found(result)
        return EXIT_OK
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    elif not args.quiet:
        _print_summary(result)
    return EXIT_OK
