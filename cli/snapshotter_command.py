"""`lazypull snapshotter`: run the node service containerd loads as a proxy plugin."""

import argparse
import sys

from snapshotter.config import FUSE_MANAGER_MODES, LOG_LEVELS, ConfigError, load_config


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "snapshotter", help="run the snapshotter service for containerd",
        description="Serve containerd's snapshots API on a unix socket (a proxy plugin). "
                    "Flags override the TOML config; every option has a default.")
    p.add_argument("--config", metavar="FILE",
                   help="TOML config (default /etc/lazypull/config.toml if present)")
    p.add_argument("--address", metavar="SOCKET",
                   help="unix socket to serve on (default /run/lazypull/snapshotter.sock)")
    p.add_argument("--root", metavar="DIR", help="state directory (default /var/lib/lazypull)")
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve /metrics, /healthz and /readyz here (default: off)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="default: info")
    p.add_argument("--fuse-manager", choices=FUSE_MANAGER_MODES,
                   help="start the FUSE manager if none runs (spawn, the default), or wait "
                        "for one started otherwise (external)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config).with_overrides(
            address=args.address, root=args.root, metrics_address=args.metrics_address,
            log_level=args.log_level, fuse_manager=args.fuse_manager).validate()
    except ConfigError as exc:
        print(f"lazypull snapshotter: {exc}", file=sys.stderr)
        return 2
    from snapshotter.server import run as serve  # grpc loads only for the service

    return serve(config, args.config)
