"""`lazypull pull REF`: pull an image into containerd, unpacked lazily where possible."""

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING

from cli import asyncio_only  # noqa: F401  (before httpx: see there)
from oci.digest import DigestMismatchError
from oci.hosts import HostsConfig
from oci.reference import ReferenceError
from oci.registry import RegistryClient
from oci.store import AuthError, NotFoundError, StoreError

if TYPE_CHECKING:  # grpc loads only when pulling
    from snapshotter.containerd_client import LayerResult, PullPlan, PullProgress, PullResult

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_PULL = 5
EXIT_UNREACHABLE = 6

DESCRIPTION = """\
Pull an image into containerd and unpack it for a snapshotter, the way
stargz-snapshotter's `ctr-remote rpull` does: each layer is offered to the
snapshotter with the remote-snapshot labels (containerd.io/snapshot.ref, the CRI
and stargz label families), and a snapshotter that can serve the layer lazily
mounts it without a download ("remote"). Other layers are downloaded into
containerd's content store and applied by containerd ("fetched+applied").
The image is then listed by `ctr images ls` and runs with
`ctr run --snapshotter NAME`.

exit codes:
  0 pulled   2 usage error   3 authentication failed   4 image or platform not found
  5 containerd or the snapshotter failed the pull, or the image is invalid
  6 containerd cannot be reached   1 anything else

examples:
  lazypull pull reg.example/ws/python:3.11-esgz
  lazypull pull --plain-http 127.0.0.1:5000/ws/app:v1 --snapshotter overlayfs --json
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "pull", help="pull an image into containerd (lazily, through the snapshotter)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", metavar="REF",
                   help="image reference, HOST/REPO[:TAG|@DIGEST] (Docker Hub by default)")
    p.add_argument("--address", "-a", default="/run/containerd/containerd.sock",
                   metavar="SOCKET", help="containerd's socket (default: %(default)s)")
    p.add_argument("--namespace", "-n", default="default", metavar="NS",
                   help="containerd namespace (default: %(default)s)")
    p.add_argument("--snapshotter", default="lazypull", metavar="NAME",
                   help="snapshotter to unpack with (default: %(default)s)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform to pull from a multi-platform image (default: this host's)")
    p.add_argument("--plain-http", action="store_true",
                   help="talk plain HTTP to the registry")
    p.add_argument("--hosts-dir", metavar="DIR",
                   help="containerd registry hosts directory (hosts.toml layout)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    out.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    p.set_defaults(run=run)


def _progress_class() -> "type[PullProgress]":
    from snapshotter.containerd_client import PullProgress

    class LinePrinter(PullProgress):
        """One line per layer as it is done, on stdout."""

        def resolved(self, plan: "PullPlan") -> None:
            print(f"{plan.name}: {plan.top.digest} ({plan.platform}, {len(plan.layers)} "
                  f"layers)", flush=True)

        def layer_done(self, layer: "LayerResult") -> None:
            print(f"  layer {layer.index} {layer.digest[:19]} {layer.size / 1e6:8.2f} MB  "
                  f"{layer.source}  ({layer.seconds:.2f}s)", flush=True)

    return LinePrinter


async def _pull(args: argparse.Namespace) -> "PullResult":
    from snapshotter.containerd_client import ContainerdClient, PullProgress, pull

    progress = PullProgress() if args.json or args.quiet else _progress_class()()
    async with ContainerdClient(args.address, args.namespace) as containerd:
        await containerd.version()  # fails fast, and clearly, if nothing answers
        # not oci.transport's registry_client: its image layouts are not needed here
        async with RegistryClient(hosts=HostsConfig(args.hosts_dir,
                                                    plain_http=args.plain_http)) as registry:
            return await pull(containerd, registry, args.reference,
                              snapshotter=args.snapshotter, platform=args.platform,
                              progress=progress)


def _summary(result: "PullResult") -> str:
    from snapshotter.containerd_client import LayerSource

    counts = ", ".join(f"{result.count(source)} {source}" for source in LayerSource
                       if result.count(source))
    action = "created" if result.image_created else "updated"
    return (f"{result.name}: image {action}, unpacked for {result.snapshotter} "
            f"({counts or 'no layers'}) in {result.seconds:.1f}s")


def run(args: argparse.Namespace) -> int:
    from snapshotter.containerd_client import (
        ContainerdError,
        ContainerdUnreachable,
        Platform,
        PullError,
    )

    def fail(code: int, message: str) -> int:
        print(f"lazypull pull: {message}", file=sys.stderr)
        return code

    try:
        if args.platform:
            Platform.parse(args.platform)
        result = asyncio.run(_pull(args))
    except ReferenceError as exc:
        return fail(EXIT_USAGE, str(exc))
    except ValueError as exc:
        if isinstance(exc, DigestMismatchError):
            return fail(EXIT_PULL, str(exc))
        return fail(EXIT_USAGE, str(exc))
    except ContainerdUnreachable as exc:
        return fail(EXIT_UNREACHABLE, str(exc))
    except AuthError as exc:
        return fail(EXIT_AUTH, f"authentication failed: {exc}")
    except NotFoundError as exc:
        return fail(EXIT_NOT_FOUND, f"not found: {exc}")
    except (PullError, ContainerdError) as exc:
        return fail(EXIT_PULL, str(exc))
    except StoreError as exc:
        return fail(EXIT_FAILURE, str(exc))
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        print()
    elif not args.quiet:
        print(_summary(result))
    return EXIT_OK
