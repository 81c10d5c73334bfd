"""`lazypull profile`: the access profiles the node service recorded.

`export IMAGE` writes the profile of one image in the schema that
`lazypull convert --prefetch-profile` reads; `list` shows what was recorded.
"""

import argparse
import sys

from oci.access_profile import AccessProfile, ProfileError
from snapshotter.config import ConfigError, load_config
from snapshotter.lazy.profiles import PROFILES_DIR, find_profile, list_profiles

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2

DESCRIPTION = """\
The snapshotter service records, per image, which files a container read in the
first seconds after it started on freshly pulled lazy layers, in the order it
first read them (and which parts of large files). Profiles are kept under
ROOT/profiles; `export` writes one in the access-profile schema
(docs/access-profile.md), ready for `lazypull convert --prefetch-profile`.

examples:
  lazypull profile list
  lazypull profile export reg.example/ws/app:v1 -o app.profile.json
  lazypull convert reg.example/ws/app:v1 reg.example/ws/app:v1-esgz \\
      --prefetch-profile app.profile.json
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "profile", help="export the access profiles the snapshotter recorded",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="write the profile recorded for an image",
                                description="Write the access profile recorded for IMAGE "
                                            "(to stdout by default).")
    export.add_argument("image", metavar="IMAGE",
                        help="image reference as pulled (normalized like HOST/REPO:TAG)")
    export.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    listing = actions.add_parser("list", help="list the images that have a profile",
                                 description="List the recorded access profiles.")
    for sub in (export, listing):
        sub.add_argument("--root", metavar="DIR",
                         help="the service's state directory (default: root of "
                              "/etc/lazypull/config.toml, else /var/lib/lazypull)")
    export.set_defaults(run=run_export)
    listing.set_defaults(run=run_list)


def _profiles_dir(args: argparse.Namespace) -> str:
    root = args.root or load_config(None).root
    return f"{root.rstrip('/')}/{PROFILES_DIR}"


def run_export(args: argparse.Namespace) -> int:
    try:
        directory = _profiles_dir(args)
    except ConfigError as exc:
        print(f"lazypull profile: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        found = find_profile(directory, args.image)
    except ProfileError as exc:
        print(f"lazypull profile: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if found is None:
        print(f"lazypull profile: no access profile recorded for {args.image} in {directory}",
              file=sys.stderr)
        return EXIT_NOT_FOUND
    _, profile = found
    data = AccessProfile(profile.images).to_json_bytes() + b"\n"
    if args.output:
        with open(args.output, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    try:
        directory = _profiles_dir(args)
    except ConfigError as exc:
        print(f"lazypull profile: {exc}", file=sys.stderr)
        return EXIT_USAGE
    rows = [(image.reference or "?", str(len(image.files)), image.recorded_at or "-",
             f"{image.window_seconds:g}s" if image.window_seconds is not None else "-")
            for _, profile in list_profiles(directory) for image in profile.images]
    if not rows:
        print(f"lazypull profile: no access profiles in {directory}", file=sys.stderr)
        return EXIT_OK
    header = ("IMAGE", "FILES", "RECORDED", "WINDOW")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    return EXIT_OK
