"""Realistic workspace images built from Debian packages, cached between runs.

Each image has three layers, like a Dockerfile `FROM debian` + `RUN apt-get install`
+ `COPY workspace/`:

1. base: `debootstrap --variant=minbase bookworm` (no /dev nodes, apt lists or logs);
2. packages: a second debootstrap with `--include=PACKAGES`, committed on top of the
   base, so the layer holds what the packages added or changed (umoci diffs the trees
   by content and metadata, and writes whiteouts for what went away);
3. workspace: the workload's files, which print READY when the workload is done.

`umoci` writes the layers (gzip) into an OCI layout. The .debs come from the Debian
mirror this machine's apt uses and stay in CACHE/debs (debootstrap --cache-dir), so a
rebuild downloads only the mirror's index files; each built layout stays in
CACHE/images/NAME-KEY, KEY being a hash of the recipe (suite, packages, workload
files, BUILD_VERSION), and later runs reuse it as it is. Images are pushed with
`skopeo copy --preserve-digests`, so a registry serves the cached bytes unchanged.

Every layer is then rewritten so that each path's ancestor directories are entries
of their own (umoci leaves out the ones that did not change in that layer): stock
`ctr-remote image optimize` of stargz-snapshotter 0.12 rejects layers without them.
An added directory entry carries the metadata the directory has in a lower layer.

`node` is minbase + nodejs + a few npm packages that Debian ships (node-*), whose
workload `require`s them and prints READY. `tiny` is not Debian at all: busybox-static
from this machine and a small workspace, built in a second with no mirror, for tests
of the harness.

A further image, `bigfile`, has one layer holding one large file of pseudo-random
(incompressible) bytes from a fixed seed, for read-throughput measurements.
"""

import gzip
import hashlib
import json
import random
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/lazypull-perf")
SUITE = "bookworm"
TAG = "v1"
BUILD_VERSION = 2  # bump to rebuild every cached image
DEBOOTSTRAP_TIMEOUT = 1800
ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

PYTHON_WORKLOAD = b'''\
"""Start a Python workspace: import a handful of stdlib modules, use them a little."""
import argparse
import asyncio
import csv
import hashlib
import http.client
import io
import json
import logging
import pathlib
import re
import sqlite3
import subprocess
import tempfile

logging.basicConfig(level=logging.WARNING)
parser = argparse.ArgumentParser()
parser.add_argument("--name", default="workspace")
args = parser.parse_args()
db = sqlite3.connect(":memory:")
db.execute("create table t (k text, v text)")
db.execute("insert into t values (?, ?)", ("name", args.name))
rows = list(csv.reader(io.StringIO("a,b\\n1,2\\n")))
digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]
assert re.fullmatch(r"[0-9a-f]{12}", digest)
asyncio.run(asyncio.sleep(0))
assert pathlib.Path(tempfile.gettempdir()).is_dir() and http.client.OK == 200
assert subprocess.run(["true"]).returncode == 0
print("READY", args.name, digest, flush=True)
'''

HELLO_C = b"""\
#include <stdio.h>

int main(void)
{
    printf("hello, world\\n");
    return 0;
}
"""

GCC_WORKLOAD = b"""\
#!/bin/sh
set -e
gcc -O2 -o /tmp/hello /workspace/hello.c
/tmp/hello
echo READY
"""


NODE_WORKLOAD = b"""\
// Start a Node workspace: require a few packages, use them a little.
const path = require("path");
const semver = require("semver");
const yargs = require("yargs/yargs");
const _ = require("lodash");
const debug = require("debug")("workspace");
const argv = yargs(process.argv.slice(2)).option("name", { default: "workspace" }).parse();
if (!semver.satisfies(process.versions.node, ">=12")) throw new Error("node too old");
debug("starting %s", argv.name);
console.log("READY", argv.name, _.kebabCase(path.basename(__filename)));
"""

TINY_WORKLOAD = b"""\
#!/bin/sh
set -e
cat /workspace/config.txt > /dev/null
head -c 65536 /workspace/data.bin | wc -c > /dev/null
echo READY
"""


@dataclass(frozen=True)
class WorkspaceSpec:
    name: str
    packages: tuple[str, ...]
    files: dict[str, tuple[bytes, int]]  # path in the image -> (content, mode)
    command: tuple[str, ...]
    workload: str  # what the command does, for reports
    base: str = "debootstrap"  # or "busybox": busybox-static from this machine, no mirror

    def key(self) -> str:
        recipe = {
            "version": BUILD_VERSION,
            "suite": SUITE,
            "variant": "minbase" if self.base == "debootstrap" else self.base,
            "packages": list(self.packages),
            "files": {p: [hashlib.sha256(d).hexdigest(), m] for p, (d, m) in self.files.items()},
            "command": list(self.command),
        }
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


SPECS: dict[str, WorkspaceSpec] = {
    "python": WorkspaceSpec(
        "python",
        ("python3", "python3-numpy"),
        {"workspace/start.py": (PYTHON_WORKLOAD, 0o644)},
        ("/usr/bin/python3", "/workspace/start.py"),
        "python3 /workspace/start.py: imports 13 stdlib modules, prints READY",
    ),
    "gcc": WorkspaceSpec(
        "gcc",
        ("gcc", "libc6-dev"),
        {"workspace/hello.c": (HELLO_C, 0o644), "workspace/run.sh": (GCC_WORKLOAD, 0o755)},
        ("/bin/sh", "/workspace/run.sh"),
        "sh /workspace/run.sh: gcc -O2 hello.c, runs it, prints READY",
    ),
    "node": WorkspaceSpec(
        "node",
        ("nodejs", "node-semver", "node-yargs", "node-lodash", "node-debug"),
        {"workspace/start.js": (NODE_WORKLOAD, 0o644)},
        ("/usr/bin/node", "/workspace/start.js"),
        "node /workspace/start.js: requires semver, yargs, lodash, debug; prints READY",
    ),
    "tiny": WorkspaceSpec(
        "tiny",
        (),
        {"workspace/run.sh": (TINY_WORKLOAD, 0o755),
         "workspace/config.txt": (b"name = tiny\n" * 64, 0o644),
         "workspace/data.bin": (random.Random(2).randbytes(1 << 20), 0o644),
         "workspace/unread.bin": (random.Random(3).randbytes(2 << 20), 0o644)},
        ("/bin/sh", "/workspace/run.sh"),
        "sh /workspace/run.sh (busybox): reads 64 KiB of a 1 MiB file, prints READY",
        base="busybox",
    ),
}
BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "cat", "head", "wc", "echo", "true", "ls")


@dataclass
class Layer:
    digest: str
    size: int  # gzip blob
    created_by: str


@dataclass
class WorkspaceImage:
    name: str
    layout: Path
    tag: str
    manifest_digest: str
    layers: list[Layer] = field(default_factory=list)
    uncompressed_bytes: int = 0  # sum of the layer tars
    command: tuple[str, ...] = ()
    workload: str = ""
    built_now: bool = False

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "layout": str(self.layout),
            "manifest_digest": self.manifest_digest,
            "compressed_bytes": self.compressed_bytes,
            "uncompressed_bytes": self.uncompressed_bytes,
            "layers": [{"created_by": x.created_by, "digest": x.digest, "gzip_bytes": x.size}
                       for x in self.layers],
            "command": list(self.command),
            "workload": self.workload,
            "built_this_run": self.built_now,
        }


def run(*args: str | Path, timeout: float = 600) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-3000:]
        raise RuntimeError(f"{' '.join(map(str, args))} exited {done.returncode}: {tail}")
    return done.stdout


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for line in listing.read_text().splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and "security" not in words[1]:
                return next(w for w in words[1:] if "://" in w)
    return DEFAULT_MIRROR


def debootstrap(target: Path, packages: tuple[str, ...], cache: Path, mirror: str) -> None:
    (cache / "debs").mkdir(parents=True, exist_ok=True)
    include = [f"--include={','.join(packages)}"] if packages else []
    run("debootstrap", "--variant=minbase", f"--cache-dir={cache / 'debs'}", *include, SUITE,
        target, mirror, timeout=DEBOOTSTRAP_TIMEOUT)
    # What an image build leaves out: device nodes (the runtime mounts /dev), apt's
    # downloaded lists and archives, logs.
    for pattern in ("dev/*", "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*",
                    "var/log/*", "var/cache/apt/*.bin"):
        for path in target.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _replace_tree(rootfs: Path, source: Path) -> None:
    """Make `rootfs` hold exactly `source` (cp -a keeps modes, owners, times, xattrs)."""
    for child in rootfs.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    run("cp", "-a", f"{source}/.", f"{rootfs}/")


def _load(layout: Path, name: str, command: tuple[str, ...], workload: str) -> WorkspaceImage:
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"]
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == TAG)
    manifest_digest = entry["digest"]
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / manifest_digest.split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    history = [h.get("created_by", "") for h in config.get("history", [])
               if not h.get("empty_layer")]
    layers = [Layer(x["digest"], x["size"], history[i] if i < len(history) else "")
              for i, x in enumerate(manifest["layers"])]
    sizes = json.loads((layout / "lazypull-perf.json").read_text())["tar_bytes"]
    return WorkspaceImage(name, layout, TAG, manifest_digest, layers, sum(sizes), command,
                          workload)


def _tar_sizes(layout: Path) -> list[int]:
    """Uncompressed size of each layer (read through gzip once, at build time)."""
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    sizes = []
    for layer in manifest["layers"]:
        total = 0
        with gzip.open(blobs / layer["digest"].split(":")[1], "rb") as f:
            while block := f.read(1 << 20):
                total += len(block)
        sizes.append(total)
    return sizes


def _umoci_image(layout: Path, trees: list[tuple[str, Path | None, dict]],
                 command: tuple[str, ...], work: Path) -> None:
    """Commit each tree as one layer on top of the previous ones. A tree is (created_by,
    a directory to make the rootfs equal to or None, files to add on top)."""
    image = f"{layout}:{TAG}"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", image)
    bundle = work / "bundle"
    run("umoci", "unpack", "--image", image, bundle)
    rootfs = bundle / "rootfs"
    for created_by, tree, files in trees:
        if tree is not None:
            _replace_tree(rootfs, tree)
        for path, (data, mode) in files.items():
            target = rootfs / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(mode)
        run("umoci", "repack", "--refresh-bundle", "--history.created_by", created_by,
            "--image", image, bundle, timeout=1800)
    config = ["--config.env", ENV_PATH, "--config.workingdir", "/",
              "--history.created_by", "config"]
    for arg in command:
        config += ["--config.cmd", arg]
    run("umoci", "config", "--image", image, *config)
    run("umoci", "gc", "--layout", layout)
    shutil.rmtree(bundle)


def _ancestors(name: str) -> list[str]:
    parts = name.strip("/").split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _rewrite_layer(source: Path, target: Path, lower_dirs: dict[str, tarfile.TarInfo]) -> int:
    """Copy a gzip layer tar, adding an entry for every ancestor directory that has none
    before its first descendant; returns how many were added. `lower_dirs` (directory
    entries of the layers below, updated with this layer's) gives an added entry its
    metadata."""
    seen: set[str] = set()
    added_count = 0
    with gzip.open(source, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tin, \
            gzip.GzipFile(target, "wb", mtime=0) as packed, \
            tarfile.open(fileobj=packed, mode="w|", format=tarfile.PAX_FORMAT) as tout:
        for member in tin:
            name = member.name.removeprefix("./").rstrip("/")
            for parent in _ancestors(name):
                if parent in seen:
                    continue
                seen.add(parent)
                entry = lower_dirs.get(parent)
                added = tarfile.TarInfo(parent) if entry is None else _copy_info(entry)
                if entry is None:
                    added.mode = 0o755
                added.type = tarfile.DIRTYPE
                tout.addfile(added)
                added_count += 1
            seen.add(name)
            if member.isdir():
                lower_dirs[name] = _copy_info(member)
            data = tin.extractfile(member) if member.isreg() else None
            tout.addfile(member, data)
    return added_count


def _copy_info(member: tarfile.TarInfo) -> tarfile.TarInfo:
    info = tarfile.TarInfo(member.name.removeprefix("./").rstrip("/"))
    for attr in ("mode", "uid", "gid", "uname", "gname", "mtime", "pax_headers"):
        setattr(info, attr, getattr(member, attr))
    info.type = tarfile.DIRTYPE
    return info


def add_ancestor_entries(layout: Path) -> list[int]:
    """Rewrite each layer of the layout's TAG image so that every ancestor directory is
    an entry of its own; manifest, config (diff_ids) and index follow. Returns the
    number of entries added to each layer."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"]
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == TAG)
    manifest = json.loads((blobs / entry["digest"].split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    lower_dirs: dict[str, tarfile.TarInfo] = {}
    diff_ids = []
    added = []
    for layer in manifest["layers"]:
        staging = blobs / ".rewrite.tmp"
        added.append(_rewrite_layer(blobs / layer["digest"].split(":")[1], staging,
                                    lower_dirs))
        data = staging.read_bytes()
        staging.unlink()
        layer["digest"], layer["size"] = _write_json_blob(blobs, data)
        diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest())
    config["rootfs"]["diff_ids"] = diff_ids
    config_bytes = json.dumps(config).encode()
    manifest["config"]["digest"], manifest["config"]["size"] = _write_json_blob(blobs,
                                                                                config_bytes)
    entry["digest"], entry["size"] = _write_json_blob(blobs, json.dumps(manifest).encode())
    (layout / "index.json").write_text(json.dumps(index))
    run("umoci", "gc", "--layout", layout)
    return added


def _write_json_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def _finish(layout: Path, final: Path) -> None:
    added = add_ancestor_entries(layout)
    (layout / "lazypull-perf.json").write_text(json.dumps({
        "tar_bytes": _tar_sizes(layout), "ancestor_entries_added": added}))
    if final.exists():
        shutil.rmtree(final)
    layout.rename(final)


def ensure_image(spec: WorkspaceSpec, cache: Path, mirror: str, log=print) -> WorkspaceImage:
    final = cache / "images" / f"{spec.name}-{spec.key()}"
    if (final / "lazypull-perf.json").exists():
        return _load(final, spec.name, spec.command, spec.workload)
    (cache / "images").mkdir(parents=True, exist_ok=True)
    if spec.base == "busybox":
        return _busybox_image(spec, cache, final, log)
    with tempfile.TemporaryDirectory(prefix=f"build-{spec.name}-", dir=cache) as tmp:
        work = Path(tmp)
        log(f"building image {spec.name}: debootstrap minbase {SUITE} from {mirror} ...")
        debootstrap(work / "base", (), cache, mirror)
        log(f"building image {spec.name}: debootstrap +{','.join(spec.packages)} ...")
        debootstrap(work / "full", spec.packages, cache, mirror)
        layout = work / "layout"
        _umoci_image(layout, [
            (f"debootstrap --variant=minbase {SUITE}", work / "base", {}),
            (f"debootstrap --variant=minbase --include={','.join(spec.packages)} {SUITE}",
             work / "full", {}),
            ("COPY workspace/", None, spec.files),
        ], spec.command, work)
        _finish(layout, final)
    image = _load(final, spec.name, spec.command, spec.workload)
    image.built_now = True
    return image


def _busybox_image(spec: WorkspaceSpec, cache: Path, final: Path, log) -> WorkspaceImage:
    """Two layers: busybox-static with a few applet links, then the workspace files."""
    if not BUSYBOX.is_file():
        raise RuntimeError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    log(f"building image {spec.name} from {BUSYBOX} ...")
    with tempfile.TemporaryDirectory(prefix=f"build-{spec.name}-", dir=cache) as tmp:
        work = Path(tmp)
        base = work / "base"
        (base / "bin").mkdir(parents=True)
        (base / "tmp").mkdir(mode=0o1777)
        shutil.copy2(BUSYBOX, base / "bin" / "busybox")
        for applet in BUSYBOX_APPLETS:
            (base / "bin" / applet).symlink_to("busybox")
        layout = work / "layout"
        _umoci_image(layout, [("busybox-static", base, {}), ("COPY workspace/", None,
                                                           spec.files)], spec.command, work)
        _finish(layout, final)
    image = _load(final, spec.name, spec.command, spec.workload)
    image.built_now = True
    return image


def ensure_bigfile_image(size: int, cache: Path, log=print) -> WorkspaceImage:
    """One layer: /data/big.bin, `size` pseudo-random bytes (seed 1)."""
    key = hashlib.sha256(f"bigfile {size} seed 1 v{BUILD_VERSION}".encode()).hexdigest()[:12]
    final = cache / "images" / f"bigfile-{key}"
    command = ("/data/big.bin",)
    workload = f"/data/big.bin: {size} pseudo-random bytes"
    if (final / "lazypull-perf.json").exists():
        return _load(final, "bigfile", command, workload)
    (cache / "images").mkdir(parents=True, exist_ok=True)
    log(f"building image bigfile ({size >> 20} MiB) ...")
    with tempfile.TemporaryDirectory(prefix="build-bigfile-", dir=cache) as tmp:
        work = Path(tmp)
        tree = work / "tree"
        (tree / "data").mkdir(parents=True)
        rng = random.Random(1)
        with open(tree / "data" / "big.bin", "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 20)
                f.write(rng.randbytes(n))
                left -= n
        layout = work / "layout"
        _umoci_image(layout, [("big file", tree, {})], command, work)
        _finish(layout, final)
    image = _load(final, "bigfile", command, workload)
    image.built_now = True
    return image


def push(image: WorkspaceImage, registry: str, repository: str, tag: str = TAG) -> str:
    """skopeo copy to a plain-HTTP registry, digests kept; returns HOST/REPO:TAG."""
    run("skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", "--preserve-digests",
        f"oci:{image.layout}:{image.tag}", f"docker://{registry}/{repository}:{tag}",
        timeout=1800)
    return f"{registry}/{repository}:{tag}"
