"""A warm-set entry with policy `full` keeps every byte, so its lazy layers are written
out as plain directories and containers start on them as on a node that unpacked the
image: no FUSE round trip, and no dependence on the service or its FUSE manager.

Real components: a registry, a private containerd with the service as its proxy
snapshotter, and the service with a warm set of one converted image (policy full).
"""

import hashlib
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from .fixtures.containerd import start_containerd, stop_containerd
from .lazy_node import convert_pushed
from .test_lazy_pull import LAYERS
from .test_snapshotter_containerd import proxy_config
from .test_warm_set import _wait_ready, _warm, warm_config

NAMESPACE = "k8s.io"  # the warm set's default
READ = "cat /etc/hello; ls -A /opt/tools; /bin/busybox sha256sum /data/big.bin"
BIG_SHA = hashlib.sha256(LAYERS[1]["data/big.bin"]).hexdigest()


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory) -> str:
    convert_pushed(registry, tmp_path_factory.mktemp("img"), LAYERS, "ws/written",
                   hot="/etc/hello\n/bin/busybox\n")
    return f"{registry.host}/ws/written:v1-esgz"


def lazy_snapshot_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "snapshots").iterdir() if (p / "layer.json").exists())


def lowerdirs_of_overlays() -> list[list[str]]:
    """The lower directories of every overlay mount on the machine."""
    lowers = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if " - overlay " not in line:
                continue
            for option in line.rsplit(" ", 1)[-1].strip().split(","):
                if option.startswith("lowerdir="):
                    lowers.append(option.removeprefix("lowerdir=").split(":"))
    return lowers


def container_lowers(root: Path) -> list[str]:
    """The lower directories of the one overlay over the service's snapshots."""
    [lowers] = [ls for ls in lowerdirs_of_overlays() if ls[0].startswith(str(root))]
    return lowers


def test_full_policy_starts_containers_on_written_out_layers(snapshotter_factory, image,
                                                             tmp_path_factory) -> None:
    ctrd_base = tmp_path_factory.mktemp("ctrd")
    address = str(tmp_path_factory.mktemp("sock") / "s.sock")
    daemon = start_containerd(ctrd_base, proxy_config(address))
    config = warm_config(tmp_path_factory, ctrd_base,
                         f'[[warm_set]]\nref = "{image}"\npolicy = "full"\n')
    service = snapshotter_factory(None, True, address, "--config", str(config))
    try:
        _wait_ready(service.metrics_port)
        [entry] = _warm(service.metrics_port, "status")["images"]
        assert entry["state"] == "warm" and entry["bytes_cached"] == entry["bytes_total"]
        layers = lazy_snapshot_dirs(service.root)
        assert len(layers) == len(LAYERS)
        assert all((layer / "tree").is_dir() for layer in layers)
        assert "written out as directories" in service.log_path.read_text()

        # A container's overlay takes the trees, and reads what the image holds (the
        # top layer's whiteout hides /opt/tools/readme).
        run = daemon.ctr("run", "--rm", "--snapshotter", "lazypull", image, "w1", "/bin/sh",
                         "-c", READ, namespace=NAMESPACE)
        assert run.stdout.split() == ["hello", "lazily", BIG_SHA, "/data/big.bin"]
        daemon.ctr("run", "-d", "--snapshotter", "lazypull", image, "w2", "/bin/busybox",
                   "sleep", "600", namespace=NAMESPACE)
        lowers = container_lowers(service.root)
        assert sorted(lowers) == sorted(str(layer / "tree") for layer in layers)

        # Neither the service nor its FUSE manager is needed by it any more.
        service.stop(signal.SIGKILL, fuse_manager=False)
        service.stop_fuse_manager(signal.SIGKILL)
        other = hashlib.sha256(LAYERS[1]["data/other.bin"]).hexdigest()
        done = daemon.ctr("tasks", "exec", "--exec-id", "down", "w2", "/bin/busybox",
                          "sha256sum", "/data/other.bin", namespace=NAMESPACE)
        assert done.stdout.split()[0] == other
        wait_gone(daemon, "w2")

        # Started again, the service serves the layers from their trees still.
        service.start()
        _wait_ready(service.metrics_port)
        daemon.ctr("run", "-d", "--snapshotter", "lazypull", image, "w3", "/bin/busybox",
                   "sleep", "600", namespace=NAMESPACE)
        assert sorted(container_lowers(service.root)) == sorted(lowers)
        done = daemon.ctr("tasks", "exec", "--exec-id", "up", "w3", "/bin/sh", "-c", READ,
                          namespace=NAMESPACE)
        assert done.stdout.split() == ["hello", "lazily", BIG_SHA, "/data/big.bin"]
        wait_gone(daemon, "w3")

        # A refresh writes out trees that went missing; a layer that cannot be written
        # (its directory read-only here) stays on FUSE and the others are written.
        for layer in layers[:2]:
            shutil.rmtree(layer / "tree")
        subprocess.run(["mount", "--bind", str(layers[0]), str(layers[0])], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(layers[0])], check=True)
            [entry] = _warm(service.metrics_port, "refresh", image)["images"]
            assert entry["state"] == "warm", entry
        finally:
            subprocess.run(["umount", str(layers[0])], check=True)
        assert not (layers[0] / "tree").exists()
        assert (layers[1] / "tree").is_dir()
        assert "stays served through FUSE" in service.log_path.read_text()
        run = daemon.ctr("run", "--rm", "--snapshotter", "lazypull", image, "w4", "/bin/sh",
                         "-c", READ, namespace=NAMESPACE)
        assert run.stdout.split() == ["hello", "lazily", BIG_SHA, "/data/big.bin"]
    finally:
        stop_containerd(daemon)


def wait_gone(daemon, container: str) -> None:
    """Delete the task (killing it) and its container."""
    daemon.ctr("tasks", "rm", "-f", container, namespace=NAMESPACE)
    daemon.ctr("containers", "rm", container, namespace=NAMESPACE)
