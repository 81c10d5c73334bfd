"""`lazypull fuse-manager`: run the process that owns the FUSE mount of lazy layers."""

import argparse
import sys

from snapshotter.config import LOG_LEVELS, ConfigError, load_config

DESCRIPTION = """\
Serve the lazy layers of a snapshotter service through FUSE, in a process of its own,
so the service can restart while containers keep reading their lazy files. The
service starts one itself when none runs (fuse_manager = "spawn"); run this command
instead where something else should own it (a second container of the DaemonSet's
pod, a systemd unit). It takes the service's config file and root. Stopping it
unmounts the lazy layers: containers still running on them lose their files.
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "fuse-manager", help="run the FUSE manager the snapshotter service talks to",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="the service's TOML config (default /etc/lazypull/config.toml "
                        "if present)")
    p.add_argument("--root", metavar="DIR", help="state directory (default /var/lib/lazypull)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="default: info")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config).with_overrides(
            root=args.root, log_level=args.log_level).validate()
    except ConfigError as exc:
        print(f"lazypull fuse-manager: {exc}", file=sys.stderr)
        return 2
    from snapshotter.fusemanager.server import run as serve  # pyfuse3 loads only here

    return serve(config)
