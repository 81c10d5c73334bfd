"""Set-up of the cold-start benchmarks, untimed and before the link is shaped: the
registry behind the shaped path, workspace images pushed, converted with `lazypull
convert` (without and with the workload's files first), the workload's files recorded
(an access profile of one lazy run, or strace), and for stargz-snapshotter its own
conversions with stock `ctr-remote image optimize`. perf/cold_start.py describes the
method.
"""

import argparse
import contextlib
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from perf import stargz
from perf.harness import (
    MB,
    NAMESPACE,
    REPO_ROOT,
    Registry,
    drop_caches,
    lazy_pull,
    lazypull_argv,
    log,
    remove_cgroups,
    run,
    run_to_ready,
    start_node,
    start_registry_in_namespace,
    stop_node,
    write_hosts,
)
from perf.netem import ShapedPath
from perf.page_cache import read_ahead_kb, resident_bytes
from perf.stargz import StargzTools
from perf.workspace_images import (
    DEFAULT_CACHE,
    SPECS,
    WorkspaceImage,
    apt_mirror,
    ensure_bigfile_image,
    ensure_image,
    push,
)

# The lazy modes' layer formats and the compression level each gets by default: the
# smallest standard zstd level (fewest bytes on the wire; zstd decodes as fast at any
# level), gzip's usual one.
LAZY_FORMATS = {"zstdchunked": 19, "estargz": 6}
PLAIN_TAG = "v1"  # the image as built: gzip layers
LAZY_TAG = "v1-lazy"  # lazypull convert, no prefetch
LAZY_PREFETCH_TAG = "v1-lazy-prefetch"  # lazypull convert, the workload's files first
STARGZ_NOOPT_TAG = "v1-stargz-noopt"  # ctr-remote image optimize --no-optimize
STARGZ_OPT_TAG = "v1-stargz-opt"  # ctr-remote image optimize with the workload
# The unmodified image (PLAIN_TAG) in repositories of its own, with its gzip index
# published beside it by `lazypull index` (referrers are per repository): without a
# profile, and with the workload's.
INDEX_REPO_SUFFIX = "-index"
INDEX_PREFETCH_REPO_SUFFIX = "-index-prefetch"


@dataclass(frozen=True)
class Link:
    """A shaped link between the nodes and the registry."""
    name: str
    rate: str  # tbf rate
    one_way_delay_ms: float

    @property
    def rtt_s(self) -> float:
        return 2 * self.one_way_delay_ms / 1000

    @property
    def bytes_per_s(self) -> float:
        number, unit = self.rate.rstrip("bit").rstrip("kmg"), self.rate.rstrip("bit")[-1]
        return float(number) * {"k": 1e3, "m": 1e6, "g": 1e9}.get(unit, 1.0) / 8


LINKS: dict[str, Link] = {link.name: link for link in (
    Link("100mbit-40ms", "100mbit", 20.0),
    Link("1gbit-4ms", "1gbit", 2.0),
)}


@dataclass
class Setup:
    args: argparse.Namespace
    workdir: Path
    path: ShapedPath
    registry: Registry
    hosts_dir: Path
    service_config: Path  # the service's defaults, plus hosts_dir and --service-option
    images: dict[str, WorkspaceImage] = field(default_factory=dict)
    conversions: dict[str, dict] = field(default_factory=dict)
    prefetch: dict[str, dict] = field(default_factory=dict)
    reads: dict[str, dict] = field(default_factory=dict)  # what each workload opened
    stargz: StargzTools | None = None
    seq: int = 0
    # `lazypull convert` options of the lazy modes' images (format, compression level)
    lazy_convert: list[str] = field(default_factory=list)

    def ref(self, image: str, tag: str) -> str:
        return f"{self.registry.host}/ws/{image}:{tag}"

    def nobg_config(self) -> Path:
        """The service's config with its background fetch off."""
        path = self.service_config.with_name("service-nobg.toml")
        if not path.exists():
            path.write_text(self.service_config.read_text() + "background_fetch = false\n")
        return path

    def noahead_config(self) -> Path:
        """The service's config with the gzip indexes fetched per mount, none ahead."""
        path = self.service_config.with_name("service-noahead.toml")
        if not path.exists():
            path.write_text(self.service_config.read_text() + "gzip_index_ahead = false\n")
        return path

    def next_base(self, prefix: str) -> Path:
        self.seq += 1
        return self.workdir / f"{prefix}{self.seq}"


def convert(setup: Setup, image: str, tag: str, extra: list[str]) -> dict:
    source = f"docker://{setup.registry.host}/ws/{image}:v1"
    destination = f"docker://{setup.registry.host}/ws/{image}:{tag}"
    started = time.perf_counter()
    out = run(lazypull_argv("convert", source, destination, "--plain-http", "--no-cache",
                            "--json", *extra), what=f"lazypull convert -> {tag}")
    report = json.loads(out)
    manifest = report["manifests"][0]
    return {
        "tag": tag,
        "seconds": round(time.perf_counter() - started, 2),
        "manifest_digest": manifest["digest"],
        "compressed_bytes": sum(layer["size"] for layer in manifest["layers"]),
        "hot_files": sum(layer.get("hot_files", 0) for layer in manifest["layers"]),
        "prefetch_bytes": sum(layer.get("prefetch_size") or 0 for layer in manifest["layers"]),
        "missing_hot_files": len(manifest.get("missing_hot_files", [])),
        "layers": [{k: layer.get(k) for k in ("size", "media_type", "hot_files",
                                              "prefetch_size")}
                   for layer in manifest["layers"]],
    }


def profile_export_available() -> bool:
    done = subprocess.run(lazypull_argv("profile", "export", "--help"), capture_output=True,
                          cwd=REPO_ROOT, timeout=120)
    return done.returncode == 0


def record_profile(setup: Setup, image: WorkspaceImage) -> tuple[Path, dict]:
    """Run the workload once lazily; the service records what it read; export that."""
    ref = setup.ref(image.name, LAZY_TAG)
    node = start_node(setup.next_base("rec"), True, setup.service_config)
    out = setup.workdir / f"{image.name}.profile.json"
    try:
        lazy_pull(setup, node, ref)
        run_to_ready(node, ref, f"rec-{image.name}", image.command, "lazypull",
                     time.perf_counter())
        assert node.service is not None
        node.service.stop()  # profiles are written at shutdown at the latest
        run(lazypull_argv("profile", "export", ref, "--root", str(node.service.root),
                          "-o", str(out)), what=f"lazypull profile export {ref}")
    finally:
        stop_node(node)
    doc = json.loads(out.read_text())
    files = [f for entry in doc.get("images", []) for f in entry.get("files", [])]
    return out, {"source": "profile", "file": str(out), "files": len(files),
                 "first_files": [f.get("path") for f in files[:10]]}


def _resolve_in(rootfs: Path, path: str, depth: int = 0) -> str | None:
    """`path` as the image sees it, symlinks followed inside `rootfs`; None if it is
    not a regular file there."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = rootfs.joinpath(*done, part)
        if here.is_symlink():
            if depth > 40:
                return None
            target = os.readlink(here)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                done = []
            depth += 1
            continue
        done.append(part)
    final = rootfs.joinpath(*done)
    return "/" + "/".join(done) if final.is_file() and not final.is_symlink() else None


def strace_prefetch_list(setup: Setup, image: WorkspaceImage) -> tuple[Path, dict]:
    """Run the workload under strace in a chroot of the fully pulled image, page cache
    dropped first: the regular files it opened or executed, in first-access order; their
    total size (`file_bytes`); and what of them the run brought into the page cache
    (`bytes`: what the workload read, in pages, with the kernel's readahead, as a start
    from a local disk reads it; a workload maps or reads only parts of large files)."""
    ref = setup.ref(image.name, PLAIN_TAG)
    node = start_node(setup.next_base("strace"), False, setup.service_config)
    out = setup.workdir / f"{image.name}.prefetch.txt"
    rootfs = node.base / "rootfs"
    mounted: list[Path] = []
    try:
        run(node.ctr("images", "pull", "--plain-http", ref))
        chain = chain_id_of(image)
        run(node.ctr("snapshots", "prepare", "strace-rw", chain))
        rootfs.mkdir()
        run(["sh", "-e", "-c", run(node.ctr("snapshots", "mounts", str(rootfs), "strace-rw"))])
        mounted.append(rootfs)
        for name, how in (("proc", ["-t", "proc", "proc"]), ("dev", ["--rbind", "/dev"])):
            (rootfs / name).mkdir(exist_ok=True)
            run(["mount", *how, str(rootfs / name)])
            mounted.append(rootfs / name)
        trace = node.base / "strace.txt"
        drop_caches()
        run(["strace", "-f", "-qq", "-e", "trace=openat,execve", "-o", str(trace),
             "chroot", str(rootfs), *image.command], what="strace of the workload")
        seen: dict[str, None] = {}
        started = False  # chroot's own start-up reads the host's files: skip it
        for line in trace.read_text(errors="replace").splitlines():
            if "= -1" in line or '"' not in line or ("openat(" not in line
                                                     and "execve(" not in line):
                continue
            path = line.split('"', 2)[1]
            started = started or ("execve(" in line and path == image.command[0])
            if not started:
                continue
            if not path.startswith("/") or path.startswith(("/proc", "/dev", "/sys")):
                continue
            real = _resolve_in(rootfs, path)
            if real is not None:
                seen.setdefault(real, None)
        sizes = {p: os.stat(rootfs / p.lstrip("/")).st_size for p in seen}
        resident = {p: resident_bytes(rootfs / p.lstrip("/")) for p in seen}
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        stop_node(node)
    files = [p for p in seen if not p.startswith("/tmp/")]
    out.write_text(f"# files `{' '.join(image.command)}` opened or executed, first access "
                   "order (strace -f -e trace=openat,execve)\n" + "\n".join(files) + "\n")
    return out, {"source": "strace", "file": str(out), "files": len(files),
                 "bytes": sum(resident[p] for p in files),
                 "file_bytes": sum(sizes[p] for p in files),
                 "read_ahead_kb": read_ahead_kb(setup.workdir), "first_files": files[:10]}


def chain_id_of(image: WorkspaceImage) -> str:
    import hashlib
    blobs = image.layout / "blobs" / "sha256"
    manifest = json.loads((blobs / image.manifest_digest.split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    chain = ""
    for diff_id in config["rootfs"]["diff_ids"]:
        chain = diff_id if not chain else \
            "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


def profile_of_list(path: Path) -> Path:
    """A prefetch list (one path a line) as an access profile, for `lazypull index`."""
    files = [line.strip() for line in path.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    out = path.with_suffix(".profile.json")
    out.write_text(json.dumps({"schemaVersion": 1, "images": [
        {"files": [{"path": p} for p in files]}]}))
    return out


def index(setup: Setup, repository: str, extra: list[str]) -> dict:
    """`lazypull index` of ws/REPOSITORY:v1; the index and layer sizes."""
    reference = f"docker://{setup.registry.host}/ws/{repository}:{PLAIN_TAG}"
    spacing = getattr(setup.args, "index_spacing", 0)
    if spacing:
        extra = [*extra, "--spacing", str(spacing)]
    started = time.perf_counter()
    out = run(lazypull_argv("index", reference, "--plain-http", "--json", *extra),
              what=f"lazypull index {reference}")
    manifest = json.loads(out)["manifests"][0]
    layers = [{k: layer.get(k) for k in ("size", "index_size", "hot_files", "files", "spans")}
              for layer in manifest["layers"]]
    layer_bytes = sum(layer["size"] or 0 for layer in layers)
    index_bytes = sum(layer["index_size"] or 0 for layer in layers)
    return {"tool": "lazypull index", "seconds": round(time.perf_counter() - started, 2),
            "manifest_digest": manifest["digest"], "compressed_bytes": layer_bytes,
            "index_bytes": index_bytes,
            "index_share": round(index_bytes / layer_bytes, 5) if layer_bytes else None,
            "spacing": spacing or "default",
            "hot_files": sum(layer["hot_files"] or 0 for layer in layers),
            "missing_hot_files": len(manifest.get("missing_hot_files", [])),
            "layers": layers}


def prepare(setup: Setup, names: list[str], bigfile_bytes: int, source: str,
            indexes: bool = False) -> None:
    """Push, convert and (with `indexes`) index the images, record their workloads."""
    cache = setup.args.cache_dir
    mirror = apt_mirror()
    for name in names:
        setup.images[name] = ensure_image(SPECS[name], cache, mirror, log)
    if bigfile_bytes:
        setup.images["bigfile"] = ensure_bigfile_image(bigfile_bytes, cache, log)
    for name, image in setup.images.items():
        log(f"pushing {name} ({image.compressed_bytes / MB:.1f} MB gzip) ...")
        push(image, setup.registry.host, f"ws/{name}", PLAIN_TAG)
        log(f"converting {name} -> {LAZY_TAG} ...")
        setup.conversions[f"{name}:{LAZY_TAG}"] = convert(setup, name, LAZY_TAG,
                                                          setup.lazy_convert)
    for name in names:
        image = setup.images[name]
        log(f"recording the files {name}'s workload opens (strace) ...")
        strace_list, setup.reads[name] = strace_prefetch_list(setup, image)
        if source == "profile":
            log(f"recording an access profile of {name} (one lazy run) ...")
            path, info = record_profile(setup, image)
            extra = ["--prefetch-profile", str(path)]
        else:
            path, info = strace_list, setup.reads[name]
            extra = ["--prefetch-list", str(path)]
        setup.prefetch[name] = info
        log(f"converting {name} -> {LAZY_PREFETCH_TAG} ({info['files']} files from {source}) ...")
        setup.conversions[f"{name}:{LAZY_PREFETCH_TAG}"] = convert(
            setup, name, LAZY_PREFETCH_TAG, extra + setup.lazy_convert)
        if indexes:
            profile = path if source == "profile" else profile_of_list(path)
            for suffix, options in ((INDEX_REPO_SUFFIX, []),
                                    (INDEX_PREFETCH_REPO_SUFFIX,
                                     ["--prefetch-profile", str(profile)])):
                log(f"pushing {name} unmodified as ws/{name}{suffix} and indexing it ...")
                push(image, setup.registry.host, f"ws/{name}{suffix}", PLAIN_TAG)
                setup.conversions[f"{name}{suffix}:{PLAIN_TAG}"] = index(
                    setup, f"{name}{suffix}", options)
        if setup.stargz is not None:
            stargz_conversions(setup, image)


def stargz_conversions(setup: Setup, image: WorkspaceImage) -> None:
    """stargz-snapshotter's own images, made as its users make them: stock `ctr-remote
    image optimize --oci` of the image in a containerd's content store, with
    --no-optimize (STARGZ_NOOPT_TAG) and with the same workload run once (STARGZ_OPT_TAG),
    then pushed."""
    assert setup.stargz is not None
    tools = setup.stargz
    node = start_node(setup.next_base("sz-convert"), False, setup.service_config)
    try:
        source = setup.ref(image.name, PLAIN_TAG)
        address = node.daemon.address
        run(stargz.ctr_remote(tools, address, NAMESPACE, "images", "pull", "--plain-http",
                              source), what=f"ctr-remote images pull {source}")
        for tag, optimize in ((STARGZ_NOOPT_TAG, False), (STARGZ_OPT_TAG, True)):
            target = setup.ref(image.name, tag)
            log(f"ctr-remote image optimize {image.name} -> {tag} ...")
            started = time.perf_counter()
            run(stargz.optimize_argv(tools, address, NAMESPACE, source, target, image.command,
                                     optimize), what=f"ctr-remote image optimize -> {tag}")
            seconds = time.perf_counter() - started
            run(stargz.ctr_remote(tools, address, NAMESPACE, "images", "push", "--plain-http",
                                  target), what=f"ctr-remote images push {target}")
            setup.conversions[f"{image.name}:{tag}"] = {
                "tag": tag, "seconds": round(seconds, 2), "tool": "ctr-remote image optimize"
                + ("" if optimize else " --no-optimize"),
                "compressed_bytes": registry_image_bytes(setup, image.name, tag)}
    finally:
        stop_node(node)


def registry_image_bytes(setup: Setup, name: str, tag: str) -> int:
    """The summed layer sizes of the registry's manifest for `ws/NAME:TAG`."""
    request = urllib.request.Request(
        f"http://{setup.registry.host}/v2/ws/{name}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                           "application/vnd.docker.distribution.manifest.v2+json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        manifest = json.loads(response.read())
    return sum(layer["size"] for layer in manifest.get("layers", []))


def add_shaped_link_arguments(parser: argparse.ArgumentParser,
                              default_json: Path | None) -> None:
    """The options every shaped-link benchmark takes: the prefetch source, the service's
    config, where things are kept; with `default_json`, also the link (--rate,
    --delay-ms) and --json (cold-start has --link and --out instead)."""
    if default_json is not None:
        parser.add_argument("--rate", default="100mbit", help="tbf rate (default: 100mbit)")
        parser.add_argument("--delay-ms", type=float, default=20.0,
                            help="one-way delay in ms (default: 20)")
    parser.add_argument("--prefetch-source", choices=("auto", "profile", "strace"),
                        default="auto", help="where the prefetched files come from "
                        "(default: auto = profile if `lazypull profile export` exists)")
    parser.add_argument("--service-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a line added to the snapshotter service's TOML config, e.g. "
                             "'background_fetch = false' (repeatable; default: none, so "
                             "the service's defaults apart from hosts_dir)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"built images and .debs (default: {DEFAULT_CACHE})")
    parser.add_argument("--tmpdir", type=Path, default=None,
                        help="where registries and nodes keep their state (default: the "
                             "system temp dir)")
    if default_json is not None:
        parser.add_argument("--json", type=Path, default=default_json,
                            help=f"JSON results (default: {default_json})")


def prefetch_source(choice: str) -> str:
    source = choice
    if source == "auto":
        source = "profile" if profile_export_available() else "strace"
    log(f"prefetch files from: {source}")
    return source


@contextlib.contextmanager
def shaped_registry(args: argparse.Namespace, workdir: Path) -> Iterator[Setup]:
    """The registry in its namespace behind the path (not shaped yet: see ShapedPath.shape),
    its hosts.toml and the service's base config (hosts_dir + --service-option lines).
    Everything is stopped and deleted on the way out."""
    path = ShapedPath(args.rate, args.delay_ms, workdir)
    path.open()
    registry = None
    try:
        registry = start_registry_in_namespace(workdir / "registry", path.ns_registry,
                                               path.registry_address)
        hosts_dir = workdir / "hosts"
        write_hosts(hosts_dir, registry.host)
        service_config = workdir / "service.toml"
        service_config.write_text(f'hosts_dir = "{hosts_dir}"\n'
                                  + "".join(f"{line}\n" for line in args.service_option))
        yield Setup(args, workdir, path, registry, hosts_dir, service_config)
    finally:
        if registry is not None:
            registry.stop()
        path.close()
        remove_cgroups()


def network_method(args: argparse.Namespace) -> dict[str, object]:
    return {"rate": args.rate, "one_way_delay_ms": args.delay_ms,
            "how": "registry in its own netns; veth pairs through a netns that "
                   "holds every frame (AF_PACKET, PACKET_VNET_HDR) for the delay; "
                   "tbf at the rate on both sides (burst 128kb, latency "
                   f"{max(20.0, 2 * args.delay_ms):g}ms)"}


