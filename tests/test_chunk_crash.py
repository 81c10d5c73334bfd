"""kill -9 of the FUSE manager at each step of the chunk cache's write path and in the
middle of a background fetch (snapshotter/crash_points.py MANAGER_STEPS), during real
reads through FUSE. The service starts a new manager, which serves the layer again;
then the lazy files read right, every chunk in the cache hashes to its digest, and
`lazypull check` finds the root consistent, with the service running and after it
stopped."""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.crash_points import ENVIRONMENT, MANAGER_STEPS, ONCE_ENVIRONMENT
from snapshotter.lazy import layer_source as labels_of

from .fixtures.snapshotter import REPO_ROOT
from .images import File, build_layout_image, push_layout_image

CHUNK = 128 << 10  # larger than a packed chunk (64 KiB): big files' chunks are files
RECOVERY_DEADLINE = 120  # seconds for the new manager to serve the layer again


def lazypull(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def lazy_image(registry, tmp_path_factory) -> dict:
    files = {"app/big.bin": os.urandom(600 << 10), "app/mid.bin": os.urandom(200 << 10),
             "app/a.txt": os.urandom(3000), "app/b.txt": os.urandom(9000),
             "app/c.txt": os.urandom(20000)}
    image = build_layout_image(tmp_path_factory.mktemp("img") / "l", "v1",
                               [{name: File(data) for name, data in files.items()}])
    plain = push_layout_image(image.layout, "v1", registry.host, "chunk-crash/lazy")
    lazy = f"docker://{registry.host}/chunk-crash/lazy:v1-esgz"
    done = lazypull("convert", plain, lazy, "--no-cache", "--json",
                    "--chunk-size", str(CHUNK))
    assert done.returncode == 0, done.stderr
    layer = json.loads(done.stdout)["manifests"][0]["layers"][0]
    return {"ref": f"{registry.host}/chunk-crash/lazy:v1-esgz", "layer": layer["digest"],
            "host": registry.host, "files": files}


def read_all(lower: Path, files: dict[str, bytes]) -> dict[str, bytes | str]:
    """Each file's bytes, or the error reading it gave."""
    got: dict[str, bytes | str] = {}
    for name in files:  # big files first: their chunks are files in the cache
        try:
            got[name] = (lower / name).read_bytes()
        except OSError as exc:
            got[name] = f"{type(exc).__name__}: {exc}"
    return got


def chunks_that_do_not_hash(cache_dir: Path) -> tuple[int, list[str]]:
    """(chunks in the cache, those whose bytes do not match their digest)."""
    bad, count = [], 0
    db = sqlite3.connect(f"file:{cache_dir / 'chunks.db'}?mode=ro", uri=True)
    try:
        for key, data in db.execute("SELECT digest, data FROM chunks"):
            count += 1
            if data is None:
                path = cache_dir / "sha256" / key.hex()[:2] / key.hex()
                data = path.read_bytes() if path.exists() else b"(missing)"
            if hashlib.sha256(data).hexdigest() != key.hex():
                bad.append(key.hex())
    finally:
        db.close()
    for path in (cache_dir / "sha256").glob("*/*"):  # files without a row count too
        if hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
            bad.append(path.name)
    return count, bad


def mount_lazily(service, image: dict, target: str = "sha256:" + "e" * 64) -> Path:
    """Prepare the image's lazy layer (as containerd's unpacker does) and a container
    snapshot on it; the lazy layer's directory in the FUSE mount."""
    c = service.client()
    labels = {labels_of.REF_LABEL: target, labels_of.STARGZ_REFERENCE: image["ref"],
              labels_of.STARGZ_DIGEST: image["layer"]}
    with pytest.raises(grpc.RpcError) as answer:
        c.Prepare(pb.PrepareSnapshotRequest(key="extract", labels=labels))
    assert answer.value.code() == grpc.StatusCode.ALREADY_EXISTS
    c.Prepare(pb.PrepareSnapshotRequest(key="container", parent=target))
    mounts = c.Mounts(pb.MountsRequest(key="container")).mounts
    (lower,) = [o.split("=", 1)[1].split(":")[0] for o in mounts[0].options
                if o.startswith("lowerdir=")]
    return Path(lower)


@pytest.mark.parametrize("step", MANAGER_STEPS)
def test_a_manager_killed_while_chunks_are_written_leaves_a_whole_cache(
        snapshotter_factory, monkeypatch, lazy_image, tmp_path, step: str) -> None:
    host, files = lazy_image["host"], lazy_image["files"]
    (tmp_path / "hosts" / host).mkdir(parents=True)
    (tmp_path / "hosts" / host / "hosts.toml").write_text(f'server = "http://{host}"\n')
    background = step == "fetch.background"
    # A second of quiet: the background fetch (and the crash it meets) starts after the
    # mount's Prepares, not during them.
    (tmp_path / "config.toml").write_text(
        f'hosts_dir = "{tmp_path / "hosts"}"\nbackground_fetch = {str(background).lower()}\n'
        "background_quiet_seconds = 1.0\nprofile_window_seconds = 0.0\n")
    once = tmp_path / "crashed"
    monkeypatch.setenv(ENVIRONMENT, step)
    monkeypatch.setenv(ONCE_ENVIRONMENT, str(once))
    service = snapshotter_factory(None, False, None, "--config", str(tmp_path / "config.toml"))
    monkeypatch.delenv(ENVIRONMENT)
    monkeypatch.delenv(ONCE_ENVIRONMENT)
    first_manager = service.fuse_manager_pid
    lower = mount_lazily(service, lazy_image, "sha256:" + "d" * 64)
    # Reads fetch chunks until the manager dies at the step (a read then fails), or,
    # for the background step, until the background fetch gets there by itself.
    deadline = time.monotonic() + RECOVERY_DEADLINE
    first = read_all(lower, files)
    while not once.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    died = time.monotonic()
    assert once.exists(), f"the manager never reached {step}: {first}\n{service.log}"
    assert any(value != files[name] for name, value in first.items()) or background, first
    # A read that failed failed with an error: never other bytes.
    assert all(isinstance(value, str) or value == files[name]
               for name, value in first.items()), first
    print("\n" + "; ".join(sorted({v for v in first.values() if isinstance(v, str)})))

    # The service starts a new manager, which serves the layer again.
    while time.monotonic() < deadline:
        got = read_all(lower, files)
        if got == files:
            break
        time.sleep(0.5)
    recovered = time.monotonic()
    assert got == files, {n: v if isinstance(v, str) else "wrong bytes" for n, v in got.items()
                          if v != files[n]}
    assert service.fuse_manager_pid not in (None, first_manager)
    assert service.process.poll() is None

    if background:  # the new manager's background fetch completes the layer
        while time.monotonic() < deadline:
            count, bad = chunks_that_do_not_hash(service.root / "cache")
            if count >= len(files) + 4:
                break
            time.sleep(0.5)
    count, bad = chunks_that_do_not_hash(service.root / "cache")
    assert count >= len(files) and not bad, (count, bad)
    assert os.listdir(service.root / "cache" / "tmp") == []  # no write left half done
    failed_first = sorted(name for name, value in first.items() if value != files[name])
    print(f"\n| `{step}` | {len(failed_first)} of {len(files)} failed "
          f"({', '.join(failed_first) or '-'}) | {recovered - died:.1f} s | {count} | 0 |")
    running = lazypull("check", "--root", str(service.root), "--address", service.address,
                       "--json")
    assert running.returncode == 0, running.stdout + running.stderr
    assert json.loads(running.stdout)["consistent"]
    assert "Traceback" not in service.log

    assert service.stop() == 0  # the service, then its manager
    stopped = lazypull("check", "--root", str(service.root), "--json")
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["findings"] == [], \
        stopped.stdout + stopped.stderr
