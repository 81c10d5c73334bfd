"""The cold-start benchmark's harness and report (`python -m perf cold-start`), run on
the tiny busybox image, one sample of every mode over one shaped link. With the Go
toolchain and Debian's Go sources present (CI installs them) stargz-snapshotter runs
beside lazypull as it does in a real run. Figures are not asserted: only that every
mode ran end to end and that the report holds what people read."""

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from perf import stargz
from perf.cold_modes import PHASES
from perf.cold_setup import LINKS
from perf.harness import parse_go_time
from perf.workspace_images import BUSYBOX, _rewrite_layer

REPO_ROOT = Path(__file__).resolve().parent.parent
LINK = "1gbit-4ms"
WITH_STARGZ = stargz.toolchain_problem() is None
LAZY = ("lazy", "lazy-prefetch", "lazy-warm-set", "lazy-prefetch-second")
INDEXED = ("index-lazy", "index-lazy-prefetch")
STARGZ = ("stargz-noopt", "stargz-opt") if WITH_STARGZ else ()
EXPECTED = ("full-overlayfs", "local-cold", "local-warm", *LAZY, *INDEXED, *STARGZ)
TIMED = ("full-overlayfs", "lazy", "lazy-prefetch", "lazy-warm-set", *INDEXED, *STARGZ)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("cold-start")
    out = work / "report" / "cold"
    argv = [sys.executable, "-m", "perf", "cold-start", "--images", "tiny", "--repeat", "1",
            "--link", LINK, "--out", str(out), "--tmpdir", str(work),
            "--modes", ",".join(TIMED)]
    if WITH_STARGZ:
        argv.append("--with-stargz")
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
    assert done.returncode == 0, done.stderr[-4000:]
    return {"out": out, "stdout": done.stdout, "stderr": done.stderr,
            "data": json.loads(out.with_suffix(".json").read_text())}


def test_every_mode_reaches_ready_once_with_its_phases(report: dict) -> None:
    modes = report["data"]["results"][LINK]["tiny"]["modes"]
    assert sorted(modes) == sorted(EXPECTED), report["stderr"][-3000:]
    for name, mode in modes.items():
        assert (mode["runs"], mode["failed"]) == (1, 0), (name, mode["errors"])
        assert mode["median_ready_s"] > 0
        phases = mode["median_phases_s"]
        assert set(phases) <= set(PHASES)
        assert phases["container start"] > 0 and phases["run to READY"] >= 0, (name, phases)
        # the phases follow one another, so they add up to the time to READY
        assert sum(phases.values()) == pytest.approx(mode["median_ready_s"], abs=0.05)
    assert modes["full-overlayfs"]["median_phases_s"]["fetch + unpack"] > 0
    for name in ("lazy", "lazy-prefetch", *INDEXED, *STARGZ):
        assert modes[name]["median_phases_s"]["TOC + mounts"] > 0, name


def test_lazy_images_are_zstd_chunked_at_the_smallest_level(report: dict) -> None:
    data = report["data"]
    assert data["method"]["lazypull_images"] == {"format": "zstdchunked", "level": 19}
    for tag in ("v1-lazy", "v1-lazy-prefetch"):
        layers = data["conversions"][f"tiny:{tag}"]["layers"]
        assert layers and all(layer["media_type"].endswith("+zstd") for layer in layers)
    assert "zstdchunked level 19" in report["out"].with_suffix(".md").read_text()


def test_bytes_on_the_wire_and_bytes_read(report: dict) -> None:
    data = report["data"]
    modes = data["results"][LINK]["tiny"]["modes"]
    image = data["images"]["tiny"]
    # the full pull fetched every layer; the lazy pulls fetched something, and less
    assert modes["full-overlayfs"]["median_wire_bytes_at_ready"] >= image["compressed_bytes"]
    for name in ("lazy", "lazy-prefetch"):
        assert 0 < modes[name]["median_wire_bytes_at_ready"] < image["compressed_bytes"]
    # (a tiny layer is one span of its gzip index: read through it, it comes whole)
    for name in INDEXED:
        assert modes[name]["median_wire_bytes_at_ready"] > 0
    # what the workload opened: busybox, its script, the config and the data file (1 MiB,
    # of which it reads 64 KiB); what it read of them came into the page cache
    reads = data["reads"]["tiny"]
    assert reads["files"] >= 4 and reads["file_bytes"] > BUSYBOX.stat().st_size + (1 << 20)
    assert 0 < reads["bytes"] < reads["file_bytes"]
    limit = data["results"][LINK]["tiny"]["limit"]
    assert limit["bytes_read"] == reads["bytes"]
    assert limit["limit_s"] > limit["local_floor_s"] == modes["local-cold"]["median_ready_s"]
    # the lazy service's own counters were read at READY
    sample = next(s for s in data["samples"] if s["mode"] == "lazy")
    assert sample["counters_at_ready"].get("demand_bytes", 0) > 0
    # and its two processes' memory: the FUSE manager's RSS is in the total
    memory = sample["memory_at_ready"]
    assert memory["service"]["vmrss_bytes"] > 0 and memory["fuse_manager"]["pss_bytes"] > 0
    children = (memory["fuse_manager_children"] or {}).get("vmrss_bytes", 0)  # index builds
    assert memory["total_rss_bytes"] == (memory["service"]["vmrss_bytes"]
                                         + memory["fuse_manager"]["vmrss_bytes"] + children)
    assert modes["lazy"]["median_rss_bytes_at_ready"] == memory["total_rss_bytes"]
    full = next(s for s in data["samples"] if s["mode"] == "full-overlayfs")
    assert full["memory_at_ready"] == {}  # no snapshotter of ours or stargz's on that node


def test_targets_markdown_and_charts(report: dict) -> None:
    data = report["data"]
    targets = {t["target"]: t for t in data["results"][LINK]["tiny"]["targets"]}
    assert "first start on a warm-set node / fully local" in targets
    if WITH_STARGZ:
        assert "lazypull without profile / stargz noopt" in targets
    for t in targets.values():
        assert t["value"] > 0 and t["met"] == (t["value"] <= t["at_most"])
    markdown = report["out"].with_suffix(".md").read_text()
    assert markdown.strip() in report["stdout"]
    assert f"### {LINK}" in markdown
    for name in EXPECTED:
        assert f"| tiny | {name} |" in markdown
    for suffix in ("-ready.png", "-phases.png"):
        png = report["out"].with_name(report["out"].name + suffix).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    method = data["method"]
    assert list(method["links"]) == [LINK] and method["repeat"] == 1


def test_layers_get_every_ancestor_directory_entry(tmp_path: Path) -> None:
    """What stock `ctr-remote image optimize` needs: a layer that adds usr/lib/x/f
    when usr/ and usr/lib/ did not change gets entries for both, with their metadata
    from the layer below, and usr/lib/x keeps its own."""
    lower = tarfile.TarInfo("usr")
    lower.type, lower.mode, lower.mtime, lower.uid = tarfile.DIRTYPE, 0o711, 1234, 7
    source = tmp_path / "layer.tar.gz"
    with gzip.open(source, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        new_dir = tarfile.TarInfo("usr/lib/x")
        new_dir.type, new_dir.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(new_dir)
        data = b"hello"
        member = tarfile.TarInfo("usr/lib/x/f")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    target = tmp_path / "out.tar.gz"
    assert _rewrite_layer(source, target, {"usr": lower}) == 2
    with tarfile.open(target) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["usr", "usr/lib", "usr/lib/x", "usr/lib/x/f"]
        usr, lib, x, f = members
        assert (usr.isdir(), usr.mode, usr.mtime, usr.uid) == (True, 0o711, 1234, 7)
        assert lib.isdir() and lib.mode == 0o755  # nothing below: a plain directory
        assert x.mode == 0o700
        assert tar.extractfile(f).read() == b"hello"


def test_go_timestamps_and_links() -> None:
    assert parse_go_time("2026-12-06", "20:19:21.5", "+0000") == pytest.approx(1796588361.5)
    assert parse_go_time("2026-12-06", "21:19:21", "+0100") == pytest.approx(1796588361.0)
    assert LINKS["100mbit-40ms"].bytes_per_s == 12.5e6
    assert LINKS["100mbit-40ms"].rtt_s == pytest.approx(0.040)
    assert LINKS["1gbit-4ms"].bytes_per_s == 125e6


def test_stargz_metrics_are_summed_over_layers() -> None:
    text = "\n".join([
        '# TYPE stargz_fs_operation_duration_milliseconds histogram',
        'stargz_fs_operation_duration_milliseconds_sum{layer="sha256:a",'
        'operation_type="mount"} 30.5',
        'stargz_fs_operation_duration_milliseconds_sum{layer="sha256:b",'
        'operation_type="mount"} 12',
        'stargz_fs_operation_duration_milliseconds_count{layer="sha256:b",'
        'operation_type="mount"} 1',
        'stargz_fs_bytes_served{layer="sha256:a",operation_type="on_demand_bytes_fetched"} 4096',
        'go_goroutines 12',
    ])
    assert stargz.parse_metrics(text) == {"mount_ms": 42.5, "mount_count": 1.0,
                                          "on_demand_bytes_fetched": 4096.0}


def test_the_unmodified_image_is_indexed_beside_it(report: dict) -> None:
    """The index modes ran on the unmodified image's copies, indexed at set-up: without
    hot files, and with the workload's; the report keeps the index sizes."""
    data = report["data"]
    plain = data["images"]["tiny"]
    without = data["conversions"]["tiny-index:v1"]
    with_profile = data["conversions"]["tiny-index-prefetch:v1"]
    for indexed in (without, with_profile):
        assert indexed["compressed_bytes"] == plain["compressed_bytes"]  # the same layers
        assert indexed["index_bytes"] > 0 and 0 < indexed["index_share"] < 1
    assert without["hot_files"] == 0 < with_profile["hot_files"]
    targets = {t["target"] for t in data["results"][LINK]["tiny"]["targets"]}
    assert "unmodified image through its gzip index / converted, with profile" in targets
    sample = next(s for s in data["samples"] if s["mode"] == "index-lazy-prefetch")
    assert sample["counters_at_ready"].get("prefetch_bytes", 0) > 0
    # where its mounts went: one lookup of the image, each layer's index fetched ahead
    mounts = sample["mounts"]
    assert len(mounts["layer_s"]) == len(plain["layers"])
    assert len(mounts["lookup_s"]) == 1
    assert len(mounts["layers"]) == len(plain["layers"])
    assert all(layer["ahead"] for layer in mounts["layers"])
    converted = next(s for s in data["samples"] if s["mode"] == "lazy")
    assert "lookup_s" not in converted["mounts"] and converted["mounts"]["layer_s"]
