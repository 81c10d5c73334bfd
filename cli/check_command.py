"""`lazypull check`: whether the node service's state agrees with itself, and repairs."""

import argparse
import json
import socket
import sys

from snapshotter.config import ConfigError, load_config

EXIT_CONSISTENT = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2

DESCRIPTION = """\
Compare the snapshot metadata with the snapshot directories, the lazy layers' files
and the FUSE mount under the service's root, hash every chunk in the chunk cache, and
report every disagreement a crash or a hand could have left. With --repair, remove
what nothing names (directories of interrupted operations, stale layer indexes, a
disconnected FUSE mount) and chunks whose bytes do not match their digest (only while
no FUSE manager runs on the root); what cannot be repaired is reported. Repairs are
refused while the service answers on its socket.
Exit status: 0 consistent (after repairs), 1 problems remain, 2 usage error.
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("check", help="check (and repair) the node service's state",
                            description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="the service's TOML config (default /etc/lazypull/config.toml "
                        "if present)")
    p.add_argument("--root", metavar="DIR", help="state directory (default /var/lib/lazypull)")
    p.add_argument("--address", metavar="SOCKET", help="the service's socket, to tell "
                   "whether it runs (default: the config's)")
    p.add_argument("--repair", action="store_true", help="repair what can be repaired")
    p.add_argument("--json", action="store_true", help="findings as JSON")
    p.set_defaults(run=run)


def _answers(address: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(address)
        except OSError:
            return False
    return True


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config).with_overrides(root=args.root,
                                                         address=args.address).validate()
    except ConfigError as exc:
        print(f"lazypull check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.repair and _answers(config.address):
        print(f"lazypull check: the service answers on {config.address}: stop it before "
              "repairing its state", file=sys.stderr)
        return EXIT_USAGE
    from snapshotter.check import check

    findings = check(config.root, repair=args.repair)
    remaining = [f for f in findings if not f.repaired]
    if args.json:
        print(json.dumps({"root": config.root, "findings": [f.to_json() for f in findings],
                          "consistent": not remaining}, indent=2))
    else:
        for f in findings:
            state = "repaired" if f.repaired else "repairable" if f.repairable else "NOT repairable"
            print(f"{f.problem}: {f.path}: {f.detail} ({state})")
        print(f"{config.root}: " + ("consistent" if not remaining else
                                    f"{len(remaining)} problem(s) remain"))
    return EXIT_CONSISTENT if not remaining else EXIT_PROBLEMS
