"""End to end: `lazypull convert` of a multi-layer image, registry to registry, against
`skopeo copy` of the same image.

Once per run: a realistic image (perf/images.py: layers cut from real trees on this
machine) is written as an OCI layout and pushed, untimed, to a source registry A, a
docker-registry on 127.0.0.1. Every timed sample then pulls `A/src:v1` and pushes to
a destination registry B:

- skopeo-copy: `skopeo copy` (the baseline: pull and push the blobs as they are);
- estargz, zstdchunked: `lazypull convert --no-cache` (pull, decompress, convert,
  push), as a subprocess like a user would run it;
- estargz-cached: `lazypull convert --cache-dir DIR` after one untimed warm-up run
  filled DIR, so only the manifest and config are read and the blobs pushed.

B is a fresh docker-registry for every sample, stopped and deleted after it. Within
one registry a client may mount a blob from another repository instead of uploading
it, and skopeo does: as root its blob-info cache (/var/lib/containers/cache) remembers
where it pushed each blob. A fresh B with empty storage makes every sample upload
every byte, which is checked: each layer blob must be in B's storage afterwards.

Samples run interleaved, forward on even repetitions and reversed on odd ones, as in
perf/convert_throughput.py. Wall time covers the whole command, process start
included; registry start-up and the checks of what was pushed are outside it. Only
medians are reported, never asserted. All traffic stays on 127.0.0.1.
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from perf import convert_throughput
from perf.convert_throughput import Timing, environment, timing
from perf.images import BuiltImage, LayerSpec, build_image, default_layer_specs, python_stdlib
from perf.machine import describe, text_table
from tests.fixtures.registry import RegistryServer, start_registry
from tests.images import push_layout_image

MB = 1_000_000
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = Path(__file__).parent / "results" / "convert-e2e.json"
TAG = "v1"
SOURCE_REPOSITORY = "src"
COMMAND_TIMEOUT = 3600
CONVERSION_ANNOTATION = "dev.lazypull.conversion"  # converter.image.CONVERSION_ANNOTATION
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
])


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    baseline: bool
    repository: str  # prefix; the sample's repetition number is appended
    lazypull_args: tuple[str, ...] | None  # None: skopeo copy


@dataclass
class Pushed:
    """What a sample left in the destination registry."""

    manifest_digest: str
    layer_bytes: int
    total_bytes: int  # layers, config and manifest
    layers: list[tuple[str, int]]  # digest, size
    layer_types: list[str]
    converted: bool  # every layer carries lazypull's conversion annotation


@dataclass
class Samples(convert_throughput.Samples):
    """convert_throughput's samples (output_bytes: of the layers), plus what else each
    run left in the destination registry."""

    total_output_bytes: set[int] = field(default_factory=set)
    layer_types: set[str] = field(default_factory=set)
    missing_hot_files: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Summary(Timing):
    mb_per_s_compressed: float  # of the source image's gzip layers
    mb_per_s_uncompressed: float  # of its layer tars
    output_layer_bytes: int
    output_total_bytes: int
    time_vs_baseline: dict[str, float]  # our median time / the baseline's; > 1 is slower
    output_manifest_digests: list[str]
    output_layer_types: list[str]
    wall_s: list[float]


@dataclass
class Setup:
    workdir: Path
    source: RegistryServer
    image: BuiltImage
    prefetch_list: Path
    cache_dir: Path
    env: dict[str, str]

    @property
    def source_ref(self) -> str:
        return f"docker://{self.source.host}/{SOURCE_REPOSITORY}:{TAG}"


# -- variants ---------------------------------------------------------------


def variants(cache_dir: Path, prefetch_list: Path) -> list[Variant]:
    prefetch = ("--prefetch-list", str(prefetch_list))
    return [
        Variant(
            "skopeo-copy",
            "skopeo copy registry A -> B, blobs as they are",
            True,
            "copy",
            None,
        ),
        Variant(
            "estargz",
            "lazypull convert --no-cache (eStargz, gzip level 6)",
            False,
            "conv-estargz",
            ("--no-cache", *prefetch),
        ),
        Variant(
            "zstdchunked",
            "lazypull convert --no-cache --format zstdchunked (level 3)",
            False,
            "conv-zstd",
            ("--no-cache", "--format", "zstdchunked", *prefetch),
        ),
        Variant(
            "estargz-cached",
            "lazypull convert --cache-dir DIR (eStargz), DIR filled by one warm-up run",
            False,
            "conv-cached",
            ("--cache-dir", str(cache_dir), *prefetch),
        ),
    ]


def hot_files() -> list[str]:
    """A small prefetch list: what `python3 -c 'import json'` reads first, by its
    path inside the image (the stdlib layer keeps this machine's stdlib path)."""
    std = str(python_stdlib()).lstrip("/")
    tag = sys.implementation.cache_tag
    return [
        f"{std}/__pycache__/os.{tag}.pyc",
        f"{std}/__pycache__/site.{tag}.pyc",
        f"{std}/__pycache__/codecs.{tag}.pyc",
        f"{std}/os.py",
        f"{std}/site.py",
        f"{std}/encodings/__init__.py",
        f"{std}/encodings/utf_8.py",
        f"{std}/json/*.py",
    ]


def child_env(workdir: Path) -> dict[str, str]:
    """The environment of the timed commands: no proxy (everything is loopback), and
    lazypull's scratch files in the work directory."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["TMPDIR"] = str(workdir)
    return env


def command(variant: Variant, setup: Setup, destination: str) -> list[str]:
    if variant.lazypull_args is None:
        # --insecure-policy: the run must not depend on /etc/containers/policy.json.
        return ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                "--dest-tls-verify=false", setup.source_ref, destination]
    return [sys.executable, "-m", "cli.main", "convert", setup.source_ref, destination,
            "--plain-http", "--quiet", *variant.lazypull_args]


# -- measuring --------------------------------------------------------------


def children_cpu_seconds() -> float:
    # Only the timed command is reaped inside the window; the registries are reaped
    # when stopped, outside it, so their CPU never counts.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(argv: list[str], env: dict[str, str]) -> tuple[float, float, str, str]:
    cpu0, start = children_cpu_seconds(), time.perf_counter()
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT)
    wall = time.perf_counter() - start
    cpu = children_cpu_seconds() - cpu0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return wall, cpu, done.stdout, done.stderr


def _get(url: str, accept: str | None = None) -> bytes:
    assert url.startswith("http://127.0.0.1:"), url  # loopback only
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=60) as response:
        return response.read()


def pushed_image(registry: RegistryServer, repository: str) -> Pushed:
    data = _get(f"{registry.url}/v2/{repository}/manifests/{TAG}", MANIFEST_ACCEPT)
    manifest = json.loads(data)
    layers = manifest["layers"]
    layer_bytes = sum(layer["size"] for layer in layers)
    return Pushed(
        manifest_digest="sha256:" + hashlib.sha256(data).hexdigest(),
        layer_bytes=layer_bytes,
        total_bytes=layer_bytes + manifest["config"]["size"] + len(data),
        layers=[(layer["digest"], layer["size"]) for layer in layers],
        layer_types=sorted({layer["mediaType"] for layer in layers}),
        converted=all(CONVERSION_ANNOTATION in layer.get("annotations", {}) for layer in layers),
    )


def check_output(variant: Variant, pushed: Pushed, destination: RegistryServer,
                 image: BuiltImage) -> None:
    """The sample did what it claims. Every layer blob is in B's storage, which was
    empty before the sample: so it was uploaded, not mounted or skipped. skopeo kept
    the image as it is; lazypull pushed converted layers of the format asked for."""
    for digest, size in pushed.layers:
        path = destination.blob_data_path(digest)
        if not path.is_file() or path.stat().st_size != size:
            raise RuntimeError(f"{variant.name}: layer {digest} was not uploaded to {path}")
    if variant.lazypull_args is None:
        if pushed.manifest_digest != image.manifest_digest:
            raise RuntimeError("skopeo copy changed the manifest")
        return
    zstd = "zstdchunked" in variant.lazypull_args
    if not pushed.converted or zstd != (pushed.layer_types == [ZSTD_LAYER]):
        raise RuntimeError(f"{variant.name}: unexpected layer types {pushed.layer_types}")


def _missing_hot_files(stderr: str) -> set[str]:
    marker = "hot file not in the image: "
    return {line.split(marker, 1)[1] for line in stderr.splitlines() if marker in line}


def sample(variant: Variant, setup: Setup, rep: int, seq: int,
           samples: Samples) -> float:
    """One timed run into a fresh destination registry."""
    where = setup.workdir / f"registry-b-{seq}"
    destination = start_registry(where)
    try:
        repository = f"{variant.repository}-{rep + 1}"
        ref = f"docker://{destination.host}/{repository}:{TAG}"
        wall, cpu, _, stderr = run_command(command(variant, setup, ref), setup.env)
        pushed = pushed_image(destination, repository)
        check_output(variant, pushed, destination, setup.image)
    finally:
        destination.stop()
        shutil.rmtree(where, ignore_errors=True)
    samples.wall_s.append(wall)
    samples.cpu_s.append(cpu)
    samples.output_bytes.add(pushed.layer_bytes)
    samples.total_output_bytes.add(pushed.total_bytes)
    samples.digests.add(pushed.manifest_digest)
    samples.layer_types.update(pushed.layer_types)
    samples.missing_hot_files |= _missing_hot_files(stderr)
    return wall


def schedule(found: list[Variant], repeat: int) -> Iterator[tuple[int, Variant]]:
    for rep in range(repeat):
        for variant in found if rep % 2 == 0 else found[::-1]:
            yield rep, variant


def warm_up(cached: Variant, setup: Setup) -> dict[str, object]:
    """Fill the conversion cache with one untimed run of the cached variant."""
    print("  warm-up  estargz-cached (fills the cache, not timed)", file=sys.stderr)
    samples = Samples()
    wall = sample(cached, setup, -1, 0, samples)  # repository conv-cached-0
    blobs = sorted((setup.cache_dir / "blobs").glob("*.blob"))
    return {
        "wall_s": wall,
        "cache_blobs": len(blobs),
        "cache_bytes": sum(p.stat().st_size for p in blobs),
        "output_manifest_digest": next(iter(samples.digests)),
    }


def measure(found: list[Variant], setup: Setup, repeat: int) -> dict[str, Samples]:
    samples = {v.name: Samples() for v in found}
    for seq, (rep, variant) in enumerate(schedule(found, repeat), start=1):
        wall = sample(variant, setup, rep, seq, samples[variant.name])
        print(f"  rep {rep + 1}/{repeat}  {variant.name:<16} {wall:7.2f} s", file=sys.stderr)
    return samples


# -- summarizing ------------------------------------------------------------


def summarize(found: list[Variant], samples: dict[str, Samples],
              image: BuiltImage) -> list[Summary]:
    medians = {name: statistics.median(s.wall_s) for name, s in samples.items()}
    baselines = [v.name for v in found if v.baseline]
    summaries = []
    for v in found:
        s, median = samples[v.name], medians[v.name]
        summaries.append(
            Summary(
                **timing(v.name, v.label, v.baseline, s),
                mb_per_s_compressed=image.compressed_bytes / MB / median,
                mb_per_s_uncompressed=image.uncompressed_bytes / MB / median,
                output_layer_bytes=max(s.output_bytes),  # one value unless nondeterministic
                output_total_bytes=max(s.total_output_bytes),
                time_vs_baseline={} if v.baseline else {b: median / medians[b] for b in baselines},
                output_manifest_digests=sorted(s.digests),
                output_layer_types=sorted(s.layer_types),
                wall_s=s.wall_s,
            )
        )
    return summaries


def table(summaries: list[Summary]) -> str:
    baselines = [s.name for s in summaries if s.baseline]
    head = ["variant", "median s", "min-max s", "MB/s gz", "MB/s tar", "CPU s", "out MB"]
    head += [f"t / {b}" for b in baselines]
    rows = [head]
    for s in summaries:
        row = [
            s.name,
            f"{s.median_s:.2f}",
            f"{s.min_s:.2f}-{s.max_s:.2f}",
            f"{s.mb_per_s_compressed:.1f}",
            f"{s.mb_per_s_uncompressed:.1f}",
            f"{s.median_cpu_s:.2f}",
            f"{s.output_layer_bytes / MB:.1f}",
        ]
        row += [f"{s.time_vs_baseline[b]:.2f}" if b in s.time_vs_baseline else "-"
                for b in baselines]
        rows.append(row)
    lines = text_table(rows)
    lines.append("")
    lines += [f"{s.name:<16} {s.label}" for s in summaries]
    return "\n".join(lines)


# -- report -----------------------------------------------------------------


def image_json(args: argparse.Namespace, image: BuiltImage) -> dict[str, object]:
    return {
        "target_bytes": int(args.size_mb * MB),
        "uncompressed_bytes": image.uncompressed_bytes,
        "compressed_bytes": image.compressed_bytes,
        "manifest_digest": image.manifest_digest,
        "short_of_target": image.short,
        "layers": [
            {
                "created_by": layer.name,
                "sources": layer.tar.roots,
                "tar_bytes": layer.tar.size,
                "gzip_bytes": layer.size,
                "entries": layer.tar.entries,
                "regular_files": layer.tar.regular_files,
                "digest": layer.digest,
            }
            for layer in image.layers
        ],
    }


def report(
    args: argparse.Namespace,
    image: BuiltImage,
    summaries: list[Summary],
    samples: dict[str, Samples],
    warmup: dict[str, object],
    hot: list[str],
    env: dict[str, object],
) -> dict[str, object]:
    by_name = {s.name: s for s in summaries}
    estargz_digests = set(by_name["estargz"].output_manifest_digests)
    cached_digests = set(by_name["estargz-cached"].output_manifest_digests)
    missing = sorted(set().union(*(s.missing_hot_files for s in samples.values())))
    return {
        "benchmark": "convert-e2e",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": env,
        "image": image_json(args, image),
        "method": {
            "repeat": args.repeat,
            "order": "interleaved; forward on even repetitions, reversed on odd",
            "statistic": "median wall time of the whole command, process start included",
            "source": "docker-registry on 127.0.0.1 (A), image pushed once before timing",
            "destination": "a fresh docker-registry on 127.0.0.1 (B) per sample, so every "
                           "byte is uploaded (no cross-repository mounts, no existing blobs)",
            "mb": "10^6 bytes; MB/s gz = source gzip layers / median s, "
                  "MB/s tar = source layer tars / median s",
            "time_vs_baseline": "median s / baseline median s (> 1: slower than skopeo)",
            "cpu": "user + system of the timed command and its children; registries excluded",
            "lazypull": "python -m cli.main convert SRC DST --plain-http --quiet "
                        "--prefetch-list FILE, --jobs default (2)",
            "prefetch_list": hot,
        },
        "warmup": warmup,
        "variants": [asdict(s) for s in summaries],
        "checks": {
            "outputs_identical_across_repetitions": {
                s.name: len(s.output_manifest_digests) == 1 for s in summaries
            },
            "cached_output_identical_to_uncached": cached_digests == estargz_digests,
            "missing_hot_files": missing,
        },
    }


def print_report(image: BuiltImage, summaries: list[Summary], data: dict[str, object],
                 repeat: int) -> None:
    print(
        f"image: {len(image.layers)} layers, {image.uncompressed_bytes / MB:.1f} MB of tar, "
        f"{image.compressed_bytes / MB:.1f} MB gzip -6 "
        f"(ratio {image.uncompressed_bytes / image.compressed_bytes:.2f})"
    )
    for layer in image.layers:
        print(
            f"  {layer.name:<15} {layer.tar.size / MB:7.1f} MB tar {layer.size / MB:7.1f} MB gz "
            f"{layer.tar.entries:6d} entries  {', '.join(layer.tar.roots)}"
        )
    print("registry A -> registry B, both docker-registry 2.8 on 127.0.0.1; B fresh per sample")
    print(
        f"median of {repeat} runs per variant, interleaved in alternating order; "
        "MB = 10^6 bytes; MB/s gz|tar = source image gzip|tar bytes / median s; "
        "t / skopeo-copy = median s / skopeo's median s"
    )
    print()
    print(table(summaries))
    print()
    warmup = data["warmup"]
    assert isinstance(warmup, dict)
    print(f"estargz-cached warm-up (cold cache, fills it): {warmup['wall_s']:.2f} s")
    checks = data["checks"]
    assert isinstance(checks, dict)
    same = all(checks["outputs_identical_across_repetitions"].values())
    print(f"each variant pushed the same manifest every repetition: {'yes' if same else 'NO'}")
    cached = "yes" if checks["cached_output_identical_to_uncached"] else "NO"
    print(f"cached conversion identical to the uncached one: {cached}")
    if checks["missing_hot_files"]:
        print(f"prefetch patterns not in the image: {', '.join(checks['missing_hot_files'])}")


# -- entry point ------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m perf convert-e2e",
        description="lazypull convert of a multi-layer image between two loopback "
        "registries (pull, convert, push) against skopeo copy of the same image.",
    )
    parser.add_argument(
        "--size-mb",
        type=float,
        default=300.0,
        help="uncompressed size of the image's layers in MB of 10^6 bytes (default: 300)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (default: 3)")
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help=f"where to write the JSON results (default: {DEFAULT_JSON})",
    )
    parser.add_argument(
        "--tmpdir",
        type=Path,
        default=None,
        help="where the image, registries, cache and lazypull's scratch files go "
        "(default: the system temp dir)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size_mb <= 0:
        parser.error("--repeat and --size-mb must be positive")
    return args


def build_setup(args: argparse.Namespace, workdir: Path, specs: list[LayerSpec],
                hot: list[str]) -> tuple[BuiltImage, Path]:
    print(f"building a {args.size_mb:g} MB image in {workdir} ...", file=sys.stderr)
    image = build_image(workdir / "layout", TAG, specs, int(args.size_mb * MB),
                        workdir / "scratch")
    if image.short:
        print(f"warning: sources hold only {image.uncompressed_bytes / MB:.1f} MB",
              file=sys.stderr)
    prefetch_list = workdir / "prefetch.txt"
    prefetch_list.write_text("# hot files of `python3 -c 'import json'`\n" + "\n".join(hot) + "\n")
    return image, prefetch_list


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install {tool}", file=sys.stderr)
            return 1
    hot = hot_files()
    with tempfile.TemporaryDirectory(prefix="lazypull-perf-e2e-", dir=args.tmpdir) as tmp:
        workdir = Path(tmp)
        image, prefetch_list = build_setup(args, workdir, default_layer_specs(), hot)
        source = start_registry(workdir / "registry-a")
        try:
            print(f"pushing the image to {source.host}/{SOURCE_REPOSITORY}:{TAG} ...",
                  file=sys.stderr)
            push_layout_image(image.layout, TAG, source.host, SOURCE_REPOSITORY)
            shutil.rmtree(image.layout)  # registry A holds it now; save the disk space
            setup = Setup(workdir, source, image, prefetch_list, workdir / "cache",
                          child_env(workdir))
            found = variants(setup.cache_dir, prefetch_list)
            warmup = warm_up(found[-1], setup)
            samples = measure(found, setup, args.repeat)
        finally:
            source.stop()
    summaries = summarize(found, samples, image)
    env = environment(os.cpu_count() or 1)
    env |= {k: v for k, v in describe("skopeo", "docker-registry").items() if k not in env}
    data = report(args, image, summaries, samples, warmup, hot, env)
    print_report(image, summaries, data, args.repeat)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nresults: {args.json}")
    return 0
