"""A full disk under the chunk cache (ROOT/cache on a small tmpfs, or a loop-mounted
ext4): lazy reads still return the files' bytes, fetched from the registry without
being cached; the failed stores are counted (lazypull_chunk_cache_write_failures_total
{reason="disk-full"}) and logged; the service and its FUSE manager stay up; no
partial chunk is left; and once there is room again, caching resumes."""

import errno
import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .fixtures.snapshotter import REPO_ROOT
from .images import File, build_layout_image, push_layout_image
from .test_chunk_crash import chunks_that_do_not_hash, mount_lazily

CHUNK = 256 << 10
DISK_BYTES = 2 << 20


def lazypull(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def lazy_image(registry, tmp_path_factory) -> dict:
    files = {f"{part}/{name}": os.urandom(size) for part in ("first", "then", "last")
             for name, size in (("big.bin", 1 << 20), ("mid.bin", 300 << 10),
                                ("a.txt", 3000), ("b.txt", 20000))}
    image = build_layout_image(tmp_path_factory.mktemp("img") / "l", "v1",
                               [{name: File(data) for name, data in files.items()}])
    plain = push_layout_image(image.layout, "v1", registry.host, "disk-full/lazy")
    done = lazypull("convert", plain, f"docker://{registry.host}/disk-full/lazy:v1-esgz",
                    "--no-cache", "--json", "--chunk-size", str(CHUNK))
    assert done.returncode == 0, done.stderr
    layer = json.loads(done.stdout)["manifests"][0]["layers"][0]
    return {"ref": f"{registry.host}/disk-full/lazy:v1-esgz", "layer": layer["digest"],
            "host": registry.host, "files": files}


@pytest.fixture(params=["tmpfs", "ext4"])
def small_disk(request, tmp_path: Path) -> Iterator[Path]:
    """ROOT/cache on a filesystem of DISK_BYTES."""
    cache = tmp_path / "root" / "cache"
    cache.mkdir(parents=True)
    if request.param == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs",
                        str(cache)], check=True)
    else:
        image = tmp_path / "cache.img"
        with open(image, "wb") as f:
            f.truncate(DISK_BYTES + (1 << 20))  # ext4's own metadata takes about 1 MiB
        subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(cache)], check=True)
    yield cache
    subprocess.run(["umount", "-l", str(cache)], check=False)


def fill(directory: Path) -> Path:
    """A file that takes every free byte of the filesystem."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def metric(service, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics",
                                  timeout=10).read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(name))


def chunk_digests(data: bytes) -> set[str]:
    return {hashlib.sha256(data[i:i + CHUNK]).hexdigest() for i in range(0, len(data), CHUNK)}


def cached_digests(cache: Path) -> set[str]:
    import sqlite3

    db = sqlite3.connect(f"file:{cache / 'chunks.db'}?mode=ro", uri=True)
    try:
        return {key.hex() for (key,) in db.execute("SELECT digest FROM chunks")}
    finally:
        db.close()


def start_service(snapshotter_factory, tmp_path: Path, host: str, *config: str):
    (tmp_path / "hosts" / host).mkdir(parents=True)
    (tmp_path / "hosts" / host / "hosts.toml").write_text(f'server = "http://{host}"\n')
    (tmp_path / "config.toml").write_text(
        f'hosts_dir = "{tmp_path / "hosts"}"\nbackground_fetch = false\n'
        "profile_window_seconds = 0.0\n" + "".join(line + "\n" for line in config))
    return snapshotter_factory(tmp_path / "root", True, None,
                               "--config", str(tmp_path / "config.toml"))


def test_a_disk_filled_by_others_serves_reads_uncached_until_room_frees(
        snapshotter_factory, lazy_image, small_disk: Path, tmp_path: Path) -> None:
    files = lazy_image["files"]
    service = start_service(snapshotter_factory, tmp_path, lazy_image["host"])
    manager = service.fuse_manager_pid
    lower = mount_lazily(service, lazy_image)
    filler = fill(small_disk)

    first = {name: data for name, data in files.items() if name.startswith("first/")}
    for name, data in first.items():
        assert (lower / name).read_bytes() == data, name
    failures = metric(service, 'lazypull_chunk_cache_write_failures_total{reason="disk-full"}')
    assert failures > 0
    full = [line for line in service.log.splitlines() if "cannot cache" in line]
    assert full and all("database or disk is full" in line or "No space left" in line
                        for line in full), full
    print(f"\n{full[0]}\nfilled by others: {failures:.0f} failed stores")
    assert not cached_digests(small_disk) & set().union(*map(chunk_digests, first.values()))
    assert os.listdir(small_disk / "tmp") == []
    assert chunks_that_do_not_hash(small_disk)[1] == []
    assert service.process.poll() is None and service.fuse_manager_pid == manager

    filler.unlink()  # room again: the next fetches are cached
    then = {name: data for name, data in files.items() if name.startswith("then/")}
    for name, data in then.items():
        assert (lower / name).read_bytes() == data, name
    assert set().union(*map(chunk_digests, then.values())) <= cached_digests(small_disk)
    count, bad = chunks_that_do_not_hash(small_disk)
    assert count > 0 and bad == []
    assert service.process.poll() is None and service.fuse_manager_pid == manager
    assert service.stop() == 0
    checked = lazypull("check", "--root", str(service.root), "--json")
    assert checked.returncode == 0, checked.stdout


def test_a_disk_the_cache_fills_itself_makes_room_by_evicting(
        snapshotter_factory, lazy_image, small_disk: Path, tmp_path: Path) -> None:
    """cache_max_bytes (the default, 20 GiB) is far more than the disk holds: the
    disk fills with the cache's own chunks first; then least recently used ones are
    evicted to make room, and the newest files' chunks are cached. (Before: once the
    disk was full, no chunk was cached again.)"""
    files = lazy_image["files"]
    service = start_service(snapshotter_factory, tmp_path, lazy_image["host"])
    manager = service.fuse_manager_pid
    lower = mount_lazily(service, lazy_image)
    for name, data in files.items():  # about 4 MiB through a 2 MiB disk
        assert (lower / name).read_bytes() == data, name
    # The files read last are cached (those read before them may have made way).
    last = [data for name, data in files.items() if name.startswith("last/")][1:]
    assert set().union(*map(chunk_digests, last)) <= cached_digests(small_disk), \
        "\n".join(line for line in service.log.splitlines() if "WARNING" in line)
    first = set().union(*(chunk_digests(data) for name, data in files.items()
                          if name.startswith("first/")))
    assert not first <= cached_digests(small_disk)  # evicted to make room
    made_room = [line for line in service.log.splitlines() if "to make room" in line]
    assert made_room
    print(f"\nfilled by the cache: {len(made_room)} evictions to make room, "
          f"{metric(service, 'lazypull_chunk_cache_write_failures_total')} failed stores, "
          f"{len(cached_digests(small_disk))} of "
          f"{len(set().union(*map(chunk_digests, files.values())))} chunks cached")
    count, bad = chunks_that_do_not_hash(small_disk)
    assert count > 0 and bad == []
    assert os.listdir(small_disk / "tmp") == []
    assert service.process.poll() is None and service.fuse_manager_pid == manager
    assert service.stop() == 0
    checked = lazypull("check", "--root", str(service.root), "--json")
    assert checked.returncode == 0, checked.stdout
