"""`lazypull pull REF`: pull an image into containerd, unpacked lazily where possible."""

import argparse
import json
import socket
import sys
from typing import TYPE_CHECKING, Any

from snapshotter.pull_protocol import (
    EXIT_FAILURE,
    EXIT_OK,
    MAX_LINE,
    SOCKET_NAME,
    ProtocolError,
    classify,
    decode,
    encode,
)

if TYPE_CHECKING:  # loaded only when the pull runs in this process
    from snapshotter.containerd_client import LayerResult, PullPlan, PullProgress, PullResult

DEFAULT_SERVICE_SOCKET = f"/run/lazypull/{SOCKET_NAME}"

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

When the snapshotter service runs (its pull socket, --service-socket, exists), the pull
is handed to it: it has the registry and containerd clients loaded and its registry
connections open, and pulls with this command's settings and Docker config file.
Otherwise (or with --no-service) this command pulls by itself.
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
    p.add_argument("--service-socket", default=DEFAULT_SERVICE_SOCKET, metavar="SOCKET",
                   help="the snapshotter service's pull socket (default: %(default)s)")
    p.add_argument("--no-service", action="store_true",
                   help="pull in this process even if the service takes pulls")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    out.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    p.set_defaults(run=run)


# -- output: the same lines whoever pulled ------------------------------------------------


def resolved_line(plan: dict[str, Any]) -> str:
    return f"{plan['name']}: {plan['digest']} ({plan['platform']}, {plan['layers']} layers)"


def layer_line(layer: dict[str, Any]) -> str:
    return (f"  layer {layer['index']} {layer['digest'][:19]} {layer['size'] / 1e6:8.2f} MB  "
            f"{layer['source']}  ({layer['seconds']:.2f}s)")


def summary_line(result: dict[str, Any]) -> str:
    sources: dict[str, int] = {}
    for layer in result["layers"]:
        sources[layer["source"]] = sources.get(layer["source"], 0) + 1
    counts = ", ".join(f"{n} {source}" for source, n in sources.items())
    action = "created" if result["image_created"] else "updated"
    return (f"{result['name']}: image {action}, unpacked for {result['snapshotter']} "
            f"({counts or 'no layers'}) in {result['seconds']:.1f}s")


def fail(code: int, message: str) -> int:
    print(f"lazypull pull: {message}", file=sys.stderr)
    return code


def finish(args: argparse.Namespace, result: dict[str, Any]) -> int:
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    elif not args.quiet:
        print(summary_line(result))
    return EXIT_OK


# -- handed to the service ----------------------------------------------------------------


def _docker_config() -> str:
    from oci.docker_config_path import default_config_path

    return default_config_path()


def handed_over(args: argparse.Namespace) -> int | None:
    """The pull done by the service; None if no service takes pulls here (or not from
    this user: the socket is root's, and this user may still reach containerd)."""
    connection = socket.socket(socket.AF_UNIX)
    try:
        connection.connect(args.service_socket)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError, PermissionError):
        connection.close()
        return None
    with connection, connection.makefile("rb") as answers:
        connection.sendall(encode({
            "reference": args.reference, "address": args.address,
            "namespace": args.namespace, "snapshotter": args.snapshotter,
            "platform": args.platform, "plain_http": args.plain_http,
            "hosts_dir": args.hosts_dir, "docker_config": _docker_config()}))
        while line := answers.readline(MAX_LINE):
            try:
                answer = decode(line)
            except ProtocolError as exc:
                return fail(EXIT_FAILURE, f"the service answered badly: {exc}")
            if "error" in answer:
                return fail(int(answer["error"]["code"]), str(answer["error"]["message"]))
            if "result" in answer:
                return finish(args, answer["result"])
            if not (args.json or args.quiet):
                if "resolved" in answer:
                    print(resolved_line(answer["resolved"]), flush=True)
                elif "layer" in answer:
                    print(layer_line(answer["layer"]), flush=True)
    return fail(EXIT_FAILURE, f"the service ({args.service_socket}) closed the connection "
                              "before the pull ended: see its log")


# -- in this process ----------------------------------------------------------------------


def _progress_class() -> "type[PullProgress]":
    from snapshotter.containerd_client import PullProgress

    class LinePrinter(PullProgress):
        """One line per layer as it is done, on stdout."""

        def resolved(self, plan: "PullPlan") -> None:
            print(resolved_line({"name": plan.name, "digest": plan.top.digest,
                                 "platform": plan.platform, "layers": len(plan.layers)}),
                  flush=True)

        def layer_done(self, layer: "LayerResult") -> None:
            print(layer_line(layer.to_json()), flush=True)

    return LinePrinter


async def _pull(args: argparse.Namespace) -> "PullResult":
    from oci.hosts import HostsConfig
    from oci.registry import RegistryClient
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


def pulled_here(args: argparse.Namespace) -> int:
    import asyncio

    from oci import asyncio_only  # noqa: F401  (before httpx: see there)
    from snapshotter.containerd_client import Platform

    try:
        if args.platform:
            Platform.parse(args.platform)
        result = asyncio.run(_pull(args))
    except Exception as exc:
        known = classify(exc)
        if known is None:
            raise
        return fail(*known)
    return finish(args, result.to_json())


def run(args: argparse.Namespace) -> int:
    if not args.no_service:
        code = handed_over(args)
        if code is not None:
            return code
    return pulled_here(args)
