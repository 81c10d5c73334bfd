"""Entry point of the `lazypull` command."""

import argparse
import importlib
import sys

from estargz import FormatError

# Subcommand -> the module that defines it. Only the module of the command being run
# is imported: the node service and the FUSE manager stay small, and the converter's
# dependencies load only for conversions.
COMMANDS = {
    "convert": "convert_command",
    "index": "index_command",
    "estargz": "estargz_commands",
    "snapshotter": "snapshotter_command",
    "fuse-manager": "fuse_manager_command",
    "pull": "pull_command",
    "profile": "profile_command",
    "warm": "warm_command",
    "check": "check_command",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazypull",
        description="Lazy pulling of container images: eStargz / zstd:chunked layers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        if only in (None, name):
            importlib.import_module(f"{__package__}.{module}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except FormatError as exc:
        print(f"lazypull: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"lazypull: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
