"""Layers opened at pull: a pull handed to the service has the FUSE manager fetch every
lazy layer's TOC and start its prefetch before containerd prepares any layer, and the
mounts take that work over without fetching anything twice.

Real registry (behind the recording fault proxy), snapshotter service with its FUSE
manager, and containerd (tests/lazy_node.py; background fetch off, so every request
in the log is a TOC, a prefetch or a read).
"""

import asyncio
import hashlib
import itertools
import json
import os
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import estargz
from estargz.prefetch_region import PREFETCH_REGION_ANNOTATION, encode_region, region_to_fetch
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.fusemanager.client import FuseManagerClient
from snapshotter.lazy.remote import TAIL_PARTS

from .fixtures.fault_proxy import WireFault
from .images import File, Symlink
from .lazy_node import convert_pushed, lazy_node_fixture, lazypull  # noqa: F401  (the `node` fixture)

BIG = 8 << 20
BIG_DATA = os.urandom(BIG)
LAYERS = [
    {"bin/busybox": File(Path("/bin/busybox").read_bytes(), 0o755), "bin/sh": Symlink("busybox"),
     "etc/motd": b"base\n", "data/warm.bin": os.urandom(3 << 20)},
    {"etc/hello": b"hello ahead\n", "data/big.bin": BIG_DATA,
     "data/small/a.txt": b"a" * 100},
    {"app/run.sh": File(b"#!/bin/sh\ncat /etc/hello\nhead -c 16 /data/big.bin | wc -c\n",
                        0o755)},
]
HOT = "/app/run.sh\n/etc/hello\n/bin/busybox\n/data/warm.bin\n"
EXPECTED = "hello ahead\n16\n"


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory) -> dict[str, Any]:
    _, report = convert_pushed(registry, tmp_path_factory.mktemp("img"), LAYERS, "ws/ahead",
                               hot=HOT, cmd=["/app/run.sh"])
    manifest = report["manifests"][0]
    assert all(layer["prefetch_size"] for layer in manifest["layers"])
    return {"ref": "ws/ahead:v1-esgz", "manifest": manifest}


def handoff_pull(node: dict[str, Any], ref: str) -> dict:
    """`lazypull pull` handed to the node's service over its pull socket."""
    socket = Path(node["service"].address).parent / "pull.sock"
    done = lazypull("pull", f"{node['proxy'].host}/{ref}", "--address", node["daemon"].address,
                    "--service-socket", str(socket), "--json")
    assert done.returncode == 0, done.stderr
    assert f"pull of {node['proxy'].host}/{ref}" in node["service"].log  # handed over
    return json.loads(done.stdout)


def ask_manager_ahead(node: dict[str, Any], ref: str, manifest: dict[str, Any]) -> int:
    """Tell the FUSE manager about a pull, as the service does, with no pull at all."""
    root = node["service"].root

    async def ask() -> int:
        client = FuseManagerClient(str(root / "fuse-manager.sock"), str(root / "fuse"))
        await client.connect()
        try:
            return await client.pull_ahead(f"{node['proxy'].host}/{ref}", manifest["digest"],
                                           [layer["digest"] for layer in manifest["layers"]])
        finally:
            await client.close()
    return asyncio.run(ask())


def ranges_of(proxy, digest: str) -> list[tuple[int, int]]:
    """[start, end) of every ranged request for the blob, in the order they came."""
    found = []
    for request in proxy.requests("GET", f"/blobs/{digest}"):
        match = re.match(r"bytes=(\d+)-(\d+)", request.headers.get("Range", "")
                         or request.headers.get("range", ""))
        assert match, f"a whole-blob download of {digest}"
        found.append((int(match.group(1)), int(match.group(2)) + 1))
    return found


def times_requested(ranges: list[tuple[int, int]], start: int, stop: int) -> set[int]:
    """How many requests covered each byte of [start, stop): the set of counts."""
    counts = set()
    edges = sorted({start, stop, *(b for r in ranges for b in r if start <= b <= stop)})
    for left, right in itertools.pairwise(edges):
        counts.add(sum(1 for a, b in ranges if a <= left and right <= b))
    return counts


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 120) -> None:
    """A deadline against a hang, not a measure of speed."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


def in_prefetch_region(proxy, layer: dict[str, Any]) -> list[tuple[int, int]]:
    return [r for r in ranges_of(proxy, layer["digest"]) if r[0] < layer["prefetch_size"]]


def prefetched_at_pull(node: dict[str, Any], manifest: dict[str, Any]) -> bool:
    log = node["service"].log
    return all(f"layer {layer['digest']}: prefetched" in log for layer in manifest["layers"])


def tail_parts(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The requests that make up the blob's tail: one ending at the blob's end, and
    those (side by side with it, lazy.remote) ending where the one after them starts."""
    parts = [r for r in ranges if r[1] == size]
    while parts and len(parts) < TAIL_PARTS and \
            (before := [r for r in ranges if r[1] == parts[0][0]]):
        parts.insert(0, before[0])
    return parts


def requested_once(proxy, manifest: dict[str, Any]) -> None:
    """Each blob's tail (its footer and TOC, and some payload before them) was
    requested once, and no byte of a prefetch region twice by the other requests."""
    for layer in manifest["layers"]:
        ranges = ranges_of(proxy, layer["digest"])
        tails = tail_parts(ranges, layer["size"])
        assert len([r for r in tails if r[1] == layer["size"]]) == 1, ranges
        rest = [r for r in ranges if r not in tails]
        assert times_requested(rest, 0, layer["prefetch_size"]) <= {0, 1}, ranges


def run_app(node: dict[str, Any], ref: str, name: str, *command: str) -> str:
    return node["daemon"].ctr("run", "--rm", "--snapshotter", "lazypull",
                              f"{node['proxy'].host}/{ref}", name, *command).stdout


def test_prefetch_runs_before_any_prepare_and_once_overall(node, images) -> None:
    proxy, manifest, ref = node["proxy"], images["manifest"], images["ref"]
    assert ask_manager_ahead(node, ref, manifest) == 3
    wait_for(lambda: prefetched_at_pull(node, manifest), "every layer's prefetch at pull")
    before_pull = {layer["digest"]: in_prefetch_region(proxy, layer)
                   for layer in manifest["layers"]}
    assert all(before_pull.values())
    # No Prepare has been made: the service has no snapshot at all.
    assert [i for r in node["service"].client().List(pb.ListSnapshotsRequest())
            for i in r.info] == []

    result = handoff_pull(node, ref)
    assert [layer["source"] for layer in result["layers"]] == ["remote"] * 3
    assert run_app(node, ref, "ahead1", "/app/run.sh") == EXPECTED
    # The mounts took the prefetch over: nothing more of the regions was requested.
    assert {layer["digest"]: in_prefetch_region(proxy, layer)
            for layer in manifest["layers"]} == before_pull
    requested_once(proxy, manifest)


def test_a_handed_over_pull_opens_its_layers_ahead(node, images) -> None:
    proxy, manifest, ref = node["proxy"], images["manifest"], images["ref"]
    result = handoff_pull(node, ref)
    assert [layer["source"] for layer in result["layers"]] == ["remote"] * 3
    assert "opening 3 lazy layers ahead of their mounts" in node["service"].log
    # The pull may return before the prefetches it started end (the container's
    # Prepare waits for them).
    wait_for(lambda: prefetched_at_pull(node, manifest), "every layer's prefetch at pull")
    assert run_app(node, ref, "ahead2", "/app/run.sh") == EXPECTED
    requested_once(proxy, manifest)


def test_the_manifest_a_pull_read_is_not_read_again_to_open_its_layers(
        node, registry, tmp_path_factory) -> None:
    """The pull's manifest (read through the FUSE manager) is what the manager opens
    the layers from: the registry is asked for it once, by tag, and never by digest."""
    _, report = convert_pushed(registry, tmp_path_factory.mktemp("once"), LAYERS,
                               "ws/ahead-once", hot=HOT, cmd=["/app/run.sh"])
    manifest, ref, proxy = report["manifests"][0], "ws/ahead-once:v1-esgz", node["proxy"]
    result = handoff_pull(node, ref)
    assert [layer["source"] for layer in result["layers"]] == ["remote"] * 3
    assert "opening 3 lazy layers ahead of their mounts" in node["service"].log
    wait_for(lambda: prefetched_at_pull(node, manifest), "every layer's prefetch at pull")
    assert len(proxy.requests("GET", "/ws/ahead-once/manifests/v1-esgz$")) == 1
    assert proxy.requests("GET", f"/ws/ahead-once/manifests/{manifest['digest']}") == []
    assert run_app(node, ref, "ahead-once", "/app/run.sh") == EXPECTED
    requested_once(proxy, manifest)


def test_a_failed_prefetch_at_pull_fails_nothing(node, images) -> None:
    proxy, manifest, ref = node["proxy"], images["manifest"], images["ref"]
    # Every request for bytes from a blob's start (its prefetch region's first piece,
    # then the prefetch's first request) gets 503 until cleared, retries included; the
    # TOC requests, for a blob's tail, pass. (Skipping the first three ranged requests
    # once stood for "the TOCs", but a region named by the descriptor is requested
    # beside its TOC, and on a busy machine it may come first.)
    fault = WireFault("status", status=503, ranged=True, range=r"^bytes=0-")
    proxy.add(fault)
    try:
        assert ask_manager_ahead(node, ref, manifest) == 3
        wait_for(lambda: "prefetch at pull failed" in node["service"].log,
                 "a prefetch started at pull to fail")
    finally:
        proxy.clear()
    assert fault.hits >= 4  # a request's attempts, all refused
    result = handoff_pull(node, ref)
    assert [layer["source"] for layer in result["layers"]] == ["remote"] * 3
    assert run_app(node, ref, "ahead3", "/app/run.sh") == EXPECTED
    digest = run_app(node, ref, "ahead4", "/bin/busybox", "sha256sum", "/data/big.bin")
    assert digest.split()[0] == hashlib.sha256(BIG_DATA).hexdigest()



def registry_bytes(registry: Any, path: str, accept: str = "") -> bytes:
    request = urllib.request.Request(f"http://{registry.host}/v2/{path}",
                                     headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def test_the_region_named_by_the_descriptor_is_requested_before_the_toc_is_in(
        node, registry, tmp_path) -> None:
    """The converter names each layer's prefetch region in its descriptor, as the TOC
    gives it; the FUSE manager requests those bytes at once, before the TOC is in and
    verified, and the mounts still take everything over."""
    layers = [{**layer, "etc/region": f"layer {n}\n".encode()} for n, layer in enumerate(LAYERS)]
    _, report = convert_pushed(registry, tmp_path, layers, "ws/region", hot=HOT,
                               cmd=["/app/run.sh"])
    manifest, ref = report["manifests"][0], "ws/region:v1-esgz"
    raw = registry_bytes(registry, f"ws/region/manifests/{manifest['digest']}",
                         "application/vnd.oci.image.manifest.v1+json")
    for layer in json.loads(raw)["layers"]:
        blob = registry_bytes(registry, f"ws/region/blobs/{layer['digest']}")
        footer = estargz.parse_footer(blob[-64:], len(blob))
        toc = blob[footer.toc_offset:footer.toc_offset + footer.toc_length]
        region = region_to_fetch(footer, toc, layer["annotations"][estargz.TOC_DIGEST_ANNOTATION],
                                 1 << 30)
        assert region and layer["annotations"][PREFETCH_REGION_ANNOTATION] == \
            encode_region(region)
    # Each layer's TOC request (its blob's tail) hangs until every region is asked for.
    tails = "|".join(str(layer["size"] - 1) for layer in manifest["layers"])
    hang = WireFault("hang", ranged=True, range=rf"-({tails})$")
    proxy = node["proxy"]
    proxy.add(hang)
    try:
        assert ask_manager_ahead(node, ref, manifest) == 3
        for layer in manifest["layers"]:
            wait_for(lambda d=layer["digest"]: any(start == 0 for start, _ in ranges_of(proxy, d)),
                     f"the region of {layer['digest']} requested while its TOC is not in",
                     seconds=30)
        assert hang.hits >= 3
    finally:
        proxy.clear()
    result = handoff_pull(node, ref)
    assert [layer["source"] for layer in result["layers"]] == ["remote"] * 3
    assert run_app(node, ref, "region1", "/app/run.sh") == EXPECTED
