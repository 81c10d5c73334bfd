"""Entry point of the `lazypull` command."""

import argparse
import sys

from estargz import FormatError

from . import (
    convert_command,
    estargz_commands,
    fuse_manager_command,
    profile_command,
    pull_command,
    snapshotter_command,
    warm_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazypull",
        description="Lazy pulling of container images: eStargz / zstd:chunked layers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert_command.register(commands)
    estargz_commands.register(commands)
    snapshotter_command.register(commands)
    fuse_manager_command.register(commands)
    pull_command.register(commands)
    profile_command.register(commands)
    warm_command.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
