"""A container's creation over lazy layers waits for their prefetch's first bytes
(`prefetch_wait = "first-bytes"`, the default) or for all of it ("whole"), end to end:
a real registry behind the fault proxy, the service, containerd and runc.

The second layer's prefetch region is 6 MiB of hot files. The proxy lets its TOC
request and every range starting in its first 2 MB through, and holds the rest until
the test lets them go: its first prefetched bytes arrive, its tail does not."""

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from estargz.toc import DEFAULT_MAX_TOC_SIZE
from oci.manifest import Descriptor
from oci.mediatypes import OCI_LAYER_GZIP
from snapshotter.lazy.remote import parts_of, tail_start

from .fixtures.fault_proxy import WireFault
from .images import File, Symlink
from .lazy_node import NO_BACKGROUND, convert_pushed, pull, start_lazy_node, stop_lazy_node

TAIL = {f"data/tail{index:02d}.bin": os.urandom(200 << 10) for index in range(30)}
LAYERS = [
    {"bin/busybox": File(Path("/bin/busybox").read_bytes(), 0o755), "bin/sh": Symlink("busybox")},
    TAIL,
]
HOT = "/bin/busybox\n" + "".join(f"/{path}\n" for path in TAIL)
# Ranges that start at 2,000,000 or later (the tail's too, with the TOC: skipped).
PAST_2MB = r"^bytes=([2-9]\d{6}|\d{8,})-"
SCRIPT = "sha256sum /data/tail*.bin"


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory) -> dict:
    _, report = convert_pushed(registry, tmp_path_factory.mktemp("img"), LAYERS, "pw/tail",
                               hot=HOT)
    layers = report["manifests"][0]["layers"]
    descriptor = Descriptor(OCI_LAYER_GZIP, layers[1]["digest"], layers[1]["size"])
    start = tail_start(descriptor, DEFAULT_MAX_TOC_SIZE)
    # The tail is asked for first (TocAhead), in this many requests side by side.
    tail_requests = len(parts_of(start, layers[1]["size"] - start))
    return {"ref": "pw/tail:v1-esgz", "tail": layers[1]["digest"],
            "tail_requests": tail_requests}


def tasks(node: dict) -> str:
    return node["daemon"].ctr("task", "ls").stdout


@pytest.mark.parametrize("until", ["first-bytes", "whole"])
def test_a_container_is_created_while_its_prefetch_tail_is_held(
        snapshotter_factory, registry, fault_proxy_factory, tmp_path_factory, image,
        until) -> None:
    node = start_lazy_node(snapshotter_factory, registry, fault_proxy_factory,
                           tmp_path_factory, NO_BACKGROUND + f'prefetch_wait = "{until}"\n')
    try:
        held = WireFault("hang", path=f"/blobs/{image['tail']}", range=PAST_2MB,
                         skip=image["tail_requests"])
        node["proxy"].add(held)
        name = f"pw-{os.getpid()}-{until}"
        ran: dict = {}

        def pull_and_run() -> None:
            pull(node, image["ref"])
            ran["done"] = node["daemon"].ctr(
                "run", "--rm", "--snapshotter", "lazypull",
                f"{node['proxy'].host}/{image['ref']}", name, "/bin/sh", "-c", SCRIPT,
                check=False)

        worker = threading.Thread(target=pull_and_run)
        worker.start()
        if until == "first-bytes":
            deadline = time.monotonic() + 25  # a hang guard, not a measure
            while name not in tasks(node) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert name in tasks(node), "the container was not created before the tail came"
        else:
            while held.hits == 0 and worker.is_alive():
                time.sleep(0.1)
            time.sleep(2)  # the Prepare holds while the tail is held
            assert name not in tasks(node)
        assert held.hits >= 1 and worker.is_alive()  # it reads (or waits for) the tail
        node["proxy"].clear()
        worker.join(120)
        done = ran["done"]
        assert done.returncode == 0, done.stderr
        sums = {line.split()[1].lstrip("/"): line.split()[0] for line in done.stdout.splitlines()}
        assert sums == {path: hashlib.sha256(data).hexdigest() for path, data in TAIL.items()}
    finally:
        node["proxy"].clear()
        stop_lazy_node(node)
