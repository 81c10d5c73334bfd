"""Chunk-level profiles: a large prioritized file whose profile entry lists the ranges
the workload read is prefetched only in the chunks those ranges meet; its other
chunks stay remote until read, and are read right then.

`lazypull convert --prefetch-profile` with `ranges` for the file, then the pull, on a
real registry (recording proxy), snapshotter service, FUSE manager and containerd
(tests/lazy_node.py, background fetch off): once through the service's pull socket
(the layers opened at pull), once pulled by the command itself (opened at mount).
"""

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from snapshotter.fusemanager.client import FuseManagerClient

from .images import File, Symlink
from .lazy_node import convert_pushed, lazy_node_fixture, lazypull  # noqa: F401  (the `node` fixture)
from .test_pull_ahead import handoff_pull, ranges_of, run_app, wait_for

MIB = 1 << 20
LIB = os.urandom(24 * MIB)  # six 4 MiB chunks that do not compress
READ = [[0, 4096], [21 * MIB, 4096]]  # in chunks 0 and 5 only, margins included
LAYERS = [
    {"bin/busybox": File(Path("/bin/busybox").read_bytes(), 0o755), "bin/sh": Symlink("busybox"),
     "data/lib.bin": LIB, "app/run.sh": File(b"#!/bin/sh\necho started\n", 0o755)},
]


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory) -> dict[str, Any]:
    profile = tmp_path_factory.mktemp("profile") / "profile.json"
    profile.write_text(json.dumps({"schemaVersion": 1, "images": [{"files": [
        {"path": "/app/run.sh"}, {"path": "/bin/busybox"},
        {"path": "/data/lib.bin", "ranges": READ}]}]}))
    _, report = convert_pushed(registry, tmp_path_factory.mktemp("img"), LAYERS, "ws/chunky",
                               "--prefetch-profile", str(profile), cmd=["/app/run.sh"])
    layer = report["manifests"][0]["layers"][0]
    assert layer["prefetch_size"] > len(LIB)  # the whole file is in the prefetch region
    return {"ref": "ws/chunky:v1-esgz", "layer": layer}


def fetched(proxy, layer: dict[str, Any]) -> int:
    return sum(end - start for start, end in ranges_of(proxy, layer["digest"]))


def check_unread_chunks_stay_remote(node: dict[str, Any], image: dict[str, Any]) -> None:
    proxy, layer = node["proxy"], image["layer"]
    # Prefetched: busybox, run.sh and two chunks of lib.bin (plus the TOC's tail);
    # not the four unread chunks in the middle (16 MiB).
    assert fetched(proxy, layer) < layer["size"] - 12 * MIB, ranges_of(proxy, layer["digest"])
    assert run_app(node, image["ref"], "chunky1", "/app/run.sh") == "started\n"
    assert fetched(proxy, layer) < layer["size"] - 12 * MIB
    out = run_app(node, image["ref"], "chunky2", "/bin/busybox", "sha256sum", "/data/lib.bin")
    assert out.split()[0] == hashlib.sha256(LIB).hexdigest()
    assert fetched(proxy, layer) > len(LIB)  # read on demand, then


def test_layers_opened_at_pull_prefetch_only_the_chunks_read(node, image) -> None:
    result = handoff_pull(node, image["ref"])
    assert [layer["source"] for layer in result["layers"]] == ["remote"]
    wait_for(lambda: f"layer {image['layer']['digest']}: prefetched" in node["service"].log,
             "the prefetch at pull")
    check_unread_chunks_stay_remote(node, image)


def test_layers_opened_at_mount_prefetch_only_the_chunks_read(node, image) -> None:
    done = lazypull("pull", f"{node['proxy'].host}/{image['ref']}", "--address",
                    node["daemon"].address, "--no-service", "--json")
    assert done.returncode == 0, done.stderr
    assert "ahead of their mounts" not in node["service"].log  # none opened at pull
    wait_for(lambda: f"({image['layer']['digest']}): prefetched" in node["service"].log,
             "the prefetch at mount")
    check_unread_chunks_stay_remote(node, image)


def test_a_warm_set_still_keeps_the_whole_prefetch_region(node, image) -> None:
    """The warm set's questions to the FUSE manager: its prefetch policy wants the
    whole region local, unread chunks included."""
    digest = image["layer"]["digest"]
    handoff_pull(node, image["ref"])
    wait_for(lambda: f"layer {digest}: prefetched" in node["service"].log,
             "the prefetch at pull")
    root = node["service"].root

    async def ask() -> tuple[bool, bool]:
        client = FuseManagerClient(str(root / "fuse-manager.sock"), str(root / "fuse"))
        await client.connect()
        try:
            before = await client.chunks_missing(digest, False)
            await client.fetch(digest, False)
            return before, await client.chunks_missing(digest, False)
        finally:
            await client.close()

    assert asyncio.run(ask()) == (True, False)
    assert fetched(node["proxy"], image["layer"]) > len(LIB)
