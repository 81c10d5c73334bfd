"""The service's state root on a full disk (a small tmpfs): Prepare and Commit fail
with RESOURCE_EXHAUSTED, naming the full state root; no half-written snapshot is left
(`lazypull check` finds the root consistent); the service stays up; once there is
room again, the same calls succeed."""

import errno
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb

from .fixtures.snapshotter import REPO_ROOT

DISK_BYTES = 4 << 20


@pytest.fixture
def small_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(root)],
                   check=True)
    yield root
    subprocess.run(["umount", "-l", str(root)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def consistent(root: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cli.main", "check", "--root", str(root),
                           "--json"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["findings"] == []


def test_a_full_state_root_fails_calls_clearly_and_leaves_nothing_half_done(
        snapshotter_factory, small_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("lazy = false\n")
    service = snapshotter_factory(small_root, False, None, "--config", str(config))
    c = service.client()
    c.Prepare(pb.PrepareSnapshotRequest(key="before"))
    (small_root / "snapshots" / "1" / "fs" / "f").write_bytes(b"x" * 1000)
    filler = fill(small_root)

    for call in (lambda: c.Prepare(pb.PrepareSnapshotRequest(key="new")),
                 lambda: c.Commit(pb.CommitSnapshotRequest(key="before", name="done"))):
        with pytest.raises(grpc.RpcError) as failed:
            call()
        assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, failed.value
        assert "the state root is full" in failed.value.details()
    assert service.process.poll() is None
    listed = {i.name: pb.Kind.Name(i.kind) for r in c.List(pb.ListSnapshotsRequest())
              for i in r.info}
    assert listed == {"before": "ACTIVE"}
    assert "Traceback" not in service.log
    consistent(small_root)  # nothing half-written, while the disk is still full

    filler.unlink()
    c.Prepare(pb.PrepareSnapshotRequest(key="new"))
    c.Commit(pb.CommitSnapshotRequest(key="before", name="done"))
    assert service.stop() == 0
    consistent(small_root)
