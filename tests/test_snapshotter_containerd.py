"""containerd 1.6 uses lazypull as a proxy snapshotter: pull, run, remove, restart."""

import os
import time
from pathlib import Path

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb

from .fixtures.containerd import start_containerd, stop_containerd
from .images import File, Symlink, build_layout_image, push_layout_image

MANIFESTS = Path(__file__).parents[1] / "manifests"
LAYERS = [
    {"bin/busybox": File(Path("/bin/busybox").read_bytes(), 0o755), "bin/sh": Symlink("busybox"),
     "etc/motd": b"layer one\n"},
    {"etc/hello": b"hello through lazypull\n", "srv/data": os.urandom(100_000)},
]


def proxy_config(socket_path: str) -> str:
    """The shipped proxy-plugin snippet, pointed at this test's socket."""
    text = (MANIFESTS / "containerd" / "proxy-plugin.toml").read_text()
    text = text.replace("/run/lazypull/snapshotter.sock", socket_path)
    return "\n".join(line for line in text.splitlines() if not line.startswith("version"))


def our_snapshots(service) -> dict[str, int]:
    return {i.name: i.kind for r in service.client().List(pb.ListSnapshotsRequest())
            for i in r.info}


def ctr_snapshots(daemon) -> list[list[str]]:
    out = daemon.ctr("snapshots", "--snapshotter", "lazypull", "ls").stdout.splitlines()[1:]
    return [line.split() for line in out]


def reconnected(daemon, seconds: float = 30) -> list[list[str]]:
    """containerd's gRPC client backs off after the service vanished; it redials within
    seconds, and until then a call fails fast with UNAVAILABLE."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return ctr_snapshots(daemon)
        except RuntimeError as exc:
            if "unavailable" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def test_pull_run_remove_and_restart(snapshotter_factory, registry, tmp_path_factory) -> None:
    service = snapshotter_factory()
    daemon = start_containerd(tmp_path_factory.mktemp("ctrd"), proxy_config(service.address))
    try:
        image = build_layout_image(tmp_path_factory.mktemp("img") / "l", "v1", LAYERS)
        ref = push_layout_image(image.layout, "v1", registry.host, "ws/proxy").removeprefix(
            "docker://")
        daemon.ctr("images", "pull", "--plain-http", "--snapshotter", "lazypull", ref)
        committed = [name for name, kind in our_snapshots(service).items() if kind == 3]
        assert len(committed) == 2
        assert len(ctr_snapshots(daemon)) == 2

        run = daemon.ctr("run", "--rm", "--snapshotter", "lazypull", ref, "t1", "/bin/sh", "-c",
                         "cat /etc/hello; echo written > /srv/new; cat /srv/new /etc/motd")
        assert run.stdout == "hello through lazypull\nwritten\nlayer one\n"

        # Killed and restarted, the service keeps its snapshots, and containerd with it.
        service.kill9()
        again = snapshotter_factory(service.root, False, service.address)
        # (the container's own snapshot may still await containerd's garbage collection)
        assert sorted(n for n, kind in our_snapshots(again).items() if kind == 3) == \
            sorted(committed)
        assert [row[-1] for row in reconnected(daemon)] == ["Committed", "Committed"]
        run = daemon.ctr("run", "--rm", "--snapshotter", "lazypull", ref, "t2", "/bin/sh", "-c",
                         "cat /etc/hello")
        assert run.stdout == "hello through lazypull\n"

        # Removing the image lets containerd's GC remove the snapshots, then Cleanup runs.
        daemon.ctr("images", "rm", "--sync", ref)
        deadline = time.monotonic() + 30
        while our_snapshots(again) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert our_snapshots(again) == {}
        again.client().Cleanup(pb.CleanupRequest())
        assert os.listdir(again.root / "snapshots") == []
    finally:
        stop_containerd(daemon)
