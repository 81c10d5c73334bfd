"""The snapshotter service over gRPC: containerd's semantics, status codes, state."""

import os
import stat
import subprocess
import urllib.request

import grpc
import pytest
from google.protobuf import field_mask_pb2

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb

KIND = {"view": 1, "active": 2, "committed": 3}


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def names(client, *filters: str) -> list[str]:
    return sorted(i.name for r in client.List(pb.ListSnapshotsRequest(filters=list(filters)))
                  for i in r.info)


@pytest.fixture
def service(snapshotter_factory):
    return snapshotter_factory(None, True)


def test_prepare_commit_view_mounts_like_containerds_overlay(service) -> None:
    c = service.client()
    mounts = c.Prepare(pb.PrepareSnapshotRequest(key="base-active",
                                                 labels={"a": "1"})).mounts
    assert [(m.type, list(m.options)) for m in mounts] == [("bind", ["rw", "rbind"])]
    upper = mounts[0].source
    assert upper.startswith(str(service.root)) and upper.endswith("/fs")
    with open(os.path.join(upper, "hello"), "w") as f:
        f.write("x" * 10000)
    usage = c.Usage(pb.UsageRequest(key="base-active"))
    assert usage.size >= 10000 and usage.inodes == 2
    c.Commit(pb.CommitSnapshotRequest(key="base-active", name="base", labels={"b": "2"}))
    info = c.Stat(pb.StatSnapshotRequest(key="base")).info
    assert (info.kind, dict(info.labels), info.parent) == (KIND["committed"], {"b": "2"}, "")
    assert c.Usage(pb.UsageRequest(key="base")).size == usage.size
    assert code_of(lambda: c.Stat(pb.StatSnapshotRequest(key="base-active"))) == \
        grpc.StatusCode.NOT_FOUND

    child = c.Prepare(pb.PrepareSnapshotRequest(key="child", parent="base")).mounts[0]
    assert child.type == "overlay" and child.source == "overlay"
    opts = list(child.options)
    assert f"lowerdir={upper}" in opts
    assert any(o.startswith("upperdir=") for o in opts) and any(o.startswith("workdir=")
                                                                 for o in opts)
    view = c.View(pb.ViewSnapshotRequest(key="v", parent="base")).mounts[0]
    assert (view.type, view.source, list(view.options)) == ("bind", upper, ["ro", "rbind"])
    assert list(c.Mounts(pb.MountsRequest(key="child")).mounts[0].options) == opts
    assert c.Stat(pb.StatSnapshotRequest(key="v")).info.kind == KIND["view"]


def test_update_list_and_filters(service) -> None:
    c = service.client()
    c.Prepare(pb.PrepareSnapshotRequest(key="a-active", labels={"keep": "1", "drop": "2"}))
    c.Commit(pb.CommitSnapshotRequest(key="a-active", name="a",
                                      labels={"containerd.io/gc.root": "x", "t": "1"}))
    c.Prepare(pb.PrepareSnapshotRequest(key="b", parent="a", labels={"t": "2"}))
    before = c.Stat(pb.StatSnapshotRequest(key="b")).info
    updated = c.Update(pb.UpdateSnapshotRequest(
        info=pb.Info(name="b", labels={"t": "3", "new": "n"}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels.t", "labels.new"]))).info
    assert dict(updated.labels) == {"t": "3", "new": "n"}
    assert updated.updated_at.ToNanoseconds() > before.updated_at.ToNanoseconds()
    assert updated.created_at == before.created_at
    replaced = c.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="b", labels={"only": "1"})))
    assert dict(replaced.info.labels) == {"only": "1"}
    assert code_of(lambda: c.Update(pb.UpdateSnapshotRequest(
        info=pb.Info(name="b", parent="x"),
        update_mask=field_mask_pb2.FieldMask(paths=["parent"])))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert names(c) == ["a", "b"]
    assert names(c, "kind==committed") == ["a"]
    assert names(c, "parent==a") == ["b"]
    assert names(c, 'labels."containerd.io/gc.root"==x') == ["a"]
    assert names(c, "name==a", "name==b") == ["a", "b"]
    assert names(c, "labels.only") == ["b"]
    assert code_of(lambda: names(c, "name==")) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("call", "code"), [
    (lambda c: c.Stat(pb.StatSnapshotRequest(key="nope")), "NOT_FOUND"),
    (lambda c: c.Mounts(pb.MountsRequest(key="nope")), "NOT_FOUND"),
    (lambda c: c.Remove(pb.RemoveSnapshotRequest(key="nope")), "NOT_FOUND"),
    (lambda c: c.Usage(pb.UsageRequest(key="nope")), "NOT_FOUND"),
    (lambda c: c.Commit(pb.CommitSnapshotRequest(key="nope", name="n")), "NOT_FOUND"),
    (lambda c: c.Prepare(pb.PrepareSnapshotRequest(key="x", parent="nope")), "NOT_FOUND"),
    # A snapshot cannot be its own parent: the parent must already exist, committed.
    (lambda c: c.Prepare(pb.PrepareSnapshotRequest(key="self", parent="self")), "NOT_FOUND"),
    (lambda c: c.Prepare(pb.PrepareSnapshotRequest(key="committed")), "ALREADY_EXISTS"),
    (lambda c: c.Prepare(pb.PrepareSnapshotRequest(key="active")), "ALREADY_EXISTS"),
    (lambda c: c.Commit(pb.CommitSnapshotRequest(key="active", name="committed")),
     "ALREADY_EXISTS"),
    (lambda c: c.Prepare(pb.PrepareSnapshotRequest(key="x", parent="active")),
     "INVALID_ARGUMENT"),
    (lambda c: c.Commit(pb.CommitSnapshotRequest(key="view", name="v2")),
     "FAILED_PRECONDITION"),
    (lambda c: c.Remove(pb.RemoveSnapshotRequest(key="committed")), "FAILED_PRECONDITION"),
    (lambda c: c.Prepare(pb.PrepareSnapshotRequest(key="")), "INVALID_ARGUMENT"),
    (lambda c: c.Prepare(pb.PrepareSnapshotRequest(key="big", labels={"k": "v" * 5000})),
     "INVALID_ARGUMENT"),
    (lambda c: c.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="active",
                                                              labels={"k" * 4097: "v"}))),
     "INVALID_ARGUMENT"),
    (lambda c: c.Prepare(pb.PrepareSnapshotRequest(
        key="many", labels={f"label-{i}": "v" * 4000 for i in range(5000)})),
     "RESOURCE_EXHAUSTED"),
    (lambda c: list(c.List(pb.ListSnapshotsRequest(filters=["labels.\"x"]))),
     "INVALID_ARGUMENT"),
])
def test_bad_requests_get_containerds_codes(service, call, code) -> None:
    c = service.client()
    c.Prepare(pb.PrepareSnapshotRequest(key="c-active"))
    c.Commit(pb.CommitSnapshotRequest(key="c-active", name="committed"))
    c.Prepare(pb.PrepareSnapshotRequest(key="active", parent="committed"))
    c.View(pb.ViewSnapshotRequest(key="view", parent="committed"))
    assert code_of(lambda: call(c)).name == code
    # A refused request changes nothing.
    assert names(c) == ["active", "committed", "view"]


def test_remove_and_cleanup_leave_no_directories(service) -> None:
    c = service.client()
    c.Prepare(pb.PrepareSnapshotRequest(key="p"))
    c.Commit(pb.CommitSnapshotRequest(key="p", name="base"))
    c.Prepare(pb.PrepareSnapshotRequest(key="child", parent="base"))
    snapshots_dir = service.root / "snapshots"
    assert len(os.listdir(snapshots_dir)) == 2
    (snapshots_dir / "rm-77").mkdir()  # what an interrupted removal leaves
    c.Remove(pb.RemoveSnapshotRequest(key="child"))
    c.Remove(pb.RemoveSnapshotRequest(key="base"))
    c.Cleanup(pb.CleanupRequest())
    assert os.listdir(snapshots_dir) == []
    assert names(c) == []


def test_socket_metrics_and_clean_shutdown(service) -> None:
    mode = os.stat(service.address).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    c = service.client()
    c.Prepare(pb.PrepareSnapshotRequest(key="m"))
    code_of(lambda: c.Stat(pb.StatSnapshotRequest(key="missing")))
    base = f"http://127.0.0.1:{service.metrics_port}"
    text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    assert 'lazypull_snapshotter_rpc_requests_total{method="Prepare"} 1.0' in text
    assert 'lazypull_snapshotter_rpc_errors_total{code="NOT_FOUND",method="Stat"} 1.0' in text
    assert "lazypull_snapshotter_rpc_duration_seconds_bucket" in text
    assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
    assert service.stop() == 0
    assert not os.path.exists(service.address)


def test_config_file_and_flags(tmp_path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('root = "/nonexistent/root"\nlog_level = "loud"\n')
    import sys
    done = subprocess.run([sys.executable, "-m", "cli.main", "snapshotter", "--config",
                           str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "log_level must be one of" in done.stderr
    config.write_text('unknown = "x"\n')
    done = subprocess.run([sys.executable, "-m", "cli.main", "snapshotter", "--config",
                           str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unknown option 'unknown'" in done.stderr
    config.write_text("gzip_index_lookup_seconds = 0\n")
    done = subprocess.run([sys.executable, "-m", "cli.main", "snapshotter", "--config",
                           str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "gzip_index_lookup_seconds must be positive" in done.stderr
    for line, said in [("demand_readahead_bytes = -1", "must not be negative"),
                       ("small_file_window_bytes = 0", "small_file_window_bytes must be positive")]:
        config.write_text(line + "\n")
        done = subprocess.run([sys.executable, "-m", "cli.main", "snapshotter", "--config",
                               str(config)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and said in done.stderr, done.stderr
    config.write_text('prefetch_wait = "some"\n')
    done = subprocess.run([sys.executable, "-m", "cli.main", "snapshotter", "--config",
                           str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "prefetch_wait must be one of first-bytes, whole" \
        in done.stderr


def test_shipped_config_is_what_the_service_parses() -> None:
    from pathlib import Path

    from snapshotter.config import load_config
    shipped = Path(__file__).parents[1] / "manifests" / "lazypull" / "config.toml"
    config = load_config(str(shipped))
    assert config.address == "/run/lazypull/snapshotter.sock"
    assert config.root == "/var/lib/lazypull"
