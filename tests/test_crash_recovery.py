"""kill -9 of the service at every step of Prepare, Commit, Remove and the remote-snapshot
path (snapshotter/crash_points.py), then: `lazypull check` finds only what it can
repair, repairs it, and the restarted service agrees with its metadata, redoes the
interrupted operation and runs a whole prepare / commit / view cycle."""

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.crash_points import ENVIRONMENT, SERVICE_STEPS
from snapshotter.lazy import layer_source as labels_of

from .fixtures.snapshotter import REPO_ROOT
from .images import File, build_layout_image, push_layout_image

LOCAL_STEPS = [s for s in SERVICE_STEPS if not s.startswith("remote.")]
REMOTE_STEPS = [s for s in SERVICE_STEPS if s.startswith("remote.")]


def lazypull(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def check(service, *more: str) -> tuple[int, dict]:
    done = lazypull("check", "--root", str(service.root), "--address", service.address,
                    "--json", *more)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def names(client) -> dict[str, str]:
    return {i.name: pb.Kind.Name(i.kind) for r in client.List(pb.ListSnapshotsRequest())
            for i in r.info}


def start_crashing(snapshotter_factory, monkeypatch, step: str, root: Path | None = None,
                   *extra: str):
    monkeypatch.setenv(ENVIRONMENT, step)
    try:
        return snapshotter_factory(root, False, None, *extra)
    finally:
        monkeypatch.delenv(ENVIRONMENT)


def expect_death(service, call) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    service.process.wait(timeout=30)
    assert service.process.returncode == -9  # SIGKILL, at the crash point


def recover(snapshotter_factory, service, *extra: str):
    """`lazypull check`, its repairs, and the service started again on the same root."""
    _, found = check(service)
    assert all(f["repairable"] for f in found["findings"]), found
    code, repaired = check(service, "--repair")
    assert code == 0 and repaired["consistent"], repaired
    assert check(service) == (0, {"root": str(service.root), "findings": [],
                                  "consistent": True})
    return snapshotter_factory(service.root, False, None, *extra)


def a_full_cycle_works(client, tag: str) -> None:
    client.Prepare(pb.PrepareSnapshotRequest(key=f"cycle-{tag}"))
    client.Commit(pb.CommitSnapshotRequest(key=f"cycle-{tag}", name=f"cycle-{tag}-done"))
    client.View(pb.ViewSnapshotRequest(key=f"view-{tag}", parent=f"cycle-{tag}-done"))
    client.Remove(pb.RemoveSnapshotRequest(key=f"view-{tag}"))
    client.Remove(pb.RemoveSnapshotRequest(key=f"cycle-{tag}-done"))


def directories_agree(service, client) -> None:
    listed = names(client)
    on_disk = sorted(os.listdir(service.root / "snapshots"))
    assert len(on_disk) == len(listed), (on_disk, listed)
    assert all(name.isdigit() for name in on_disk), on_disk


@pytest.mark.parametrize("step", LOCAL_STEPS)
def test_a_crash_at_each_step_leaves_a_whole_state(snapshotter_factory, monkeypatch,
                                                   step: str) -> None:
    service = start_crashing(snapshotter_factory, monkeypatch, step)
    c = service.client()
    operation = step.split(".")[0]
    if operation != "prepare":
        c.Prepare(pb.PrepareSnapshotRequest(key="a"))
        (service.root / "snapshots").joinpath(
            sorted(os.listdir(service.root / "snapshots"))[0], "fs", "f").write_text("x")
    if operation == "remove":
        c.Commit(pb.CommitSnapshotRequest(key="a", name="base"))
    expect_death(service, {
        "prepare": lambda: c.Prepare(pb.PrepareSnapshotRequest(key="a")),
        "commit": lambda: c.Commit(pb.CommitSnapshotRequest(key="a", name="base")),
        "remove": lambda: c.Remove(pb.RemoveSnapshotRequest(key="base")),
    }[operation])
    again = recover(snapshotter_factory, service)
    c = again.client()
    before = names(c)
    # What the crash interrupted happened wholly or not at all, and can be finished.
    if operation == "prepare":
        assert before in ({}, {"a": "ACTIVE"}), before
        if not before:
            c.Prepare(pb.PrepareSnapshotRequest(key="a"))
        c.Mounts(pb.MountsRequest(key="a"))
    elif operation == "commit":
        assert before in ({"a": "ACTIVE"}, {"base": "COMMITTED"}), before
        if "a" in before:
            c.Commit(pb.CommitSnapshotRequest(key="a", name="base"))
        c.View(pb.ViewSnapshotRequest(key="v", parent="base"))
    else:
        assert before in ({}, {"base": "COMMITTED"}), before
        if before:
            c.Remove(pb.RemoveSnapshotRequest(key="base"))
        assert names(c) == {}
    directories_agree(again, c)
    a_full_cycle_works(c, step.replace(".", "-"))
    assert check(again)[0] == 0


@pytest.fixture(scope="module")
def lazy_image(registry, tmp_path_factory):
    image = build_layout_image(tmp_path_factory.mktemp("img") / "l", "v1",
                               [{"app/data.txt": File(b"lazy bytes\n" * 1000)}])
    plain = push_layout_image(image.layout, "v1", registry.host, "crash/lazy")
    lazy = f"docker://{registry.host}/crash/lazy:v1-esgz"
    done = lazypull("convert", plain, lazy, "--no-cache", "--json")
    assert done.returncode == 0, done.stderr
    layer = json.loads(done.stdout)["manifests"][0]["layers"][0]
    return {"ref": f"{registry.host}/crash/lazy:v1-esgz", "layer": layer["digest"],
            "host": registry.host}


@pytest.mark.parametrize("step", REMOTE_STEPS)
def test_a_crash_while_mounting_a_lazy_layer_leaves_a_whole_state(
        snapshotter_factory, monkeypatch, lazy_image, tmp_path, step: str) -> None:
    config = tmp_path / "config.toml"
    (tmp_path / "hosts" / lazy_image["host"]).mkdir(parents=True)
    (tmp_path / "hosts" / lazy_image["host"] / "hosts.toml").write_text(
        f'server = "http://{lazy_image["host"]}"\n')
    config.write_text(f'hosts_dir = "{tmp_path / "hosts"}"\nbackground_fetch = false\n')
    target = "sha256:" + "c" * 64
    labels = {labels_of.REF_LABEL: target, labels_of.STARGZ_REFERENCE: lazy_image["ref"],
              labels_of.STARGZ_DIGEST: lazy_image["layer"]}
    service = start_crashing(snapshotter_factory, monkeypatch, step, None,
                             "--config", str(config))
    c = service.client()
    expect_death(service, lambda: c.Prepare(pb.PrepareSnapshotRequest(key="extract-1",
                                                                      labels=labels)))
    again = recover(snapshotter_factory, service, "--config", str(config))
    c = again.client()
    before = names(c)
    assert before in ({}, {target: "COMMITTED"}), before
    if not before:  # containerd asks again: the layer is mounted lazily this time
        with pytest.raises(grpc.RpcError) as answer:
            c.Prepare(pb.PrepareSnapshotRequest(key="extract-2", labels=labels))
        assert answer.value.code() == grpc.StatusCode.ALREADY_EXISTS
    c.Prepare(pb.PrepareSnapshotRequest(key="container", parent=target))
    mounts = c.Mounts(pb.MountsRequest(key="container")).mounts
    lower = [o for o in mounts[0].options if o.startswith("lowerdir=")]
    assert lower and (Path(lower[0].split("=", 1)[1].split(":")[0]) / "app" /
                      "data.txt").read_bytes() == b"lazy bytes\n" * 1000
    directories_agree(again, c)
    assert check(again)[0] == 0


def test_check_reports_what_it_cannot_repair_and_refuses_a_running_service(
        snapshotter_factory) -> None:
    service = snapshotter_factory()
    c = service.client()
    c.Prepare(pb.PrepareSnapshotRequest(key="a"))
    c.Commit(pb.CommitSnapshotRequest(key="a", name="base"))
    refused = lazypull("check", "--root", str(service.root), "--address", service.address,
                       "--repair")
    assert refused.returncode == 2 and "stop it before repairing" in refused.stderr
    (only,) = os.listdir(service.root / "snapshots")
    assert service.stop() == 0
    os.rename(service.root / "snapshots" / only, service.root / "elsewhere")
    (service.root / "snapshots" / "new-x").mkdir()
    code, found = check(service, "--repair")
    assert code == 1 and not found["consistent"]
    problems = {(f["problem"], f["repaired"]) for f in found["findings"]}
    assert problems == {("missing-directory", False), ("orphan-directory", True)}
    assert not (service.root / "snapshots" / "new-x").exists()
    text = lazypull("check", "--root", str(service.root), "--address", service.address)
    assert text.returncode == 1 and "missing-directory" in text.stdout
    assert "NOT repairable" in text.stdout
