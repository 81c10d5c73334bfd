"""Deciding which layers are lazy, from containerd's Prepare labels and the registry."""

import asyncio
import gc
import itertools
import json
import os
import subprocess
import sys
import weakref

import pytest

from estargz.writer import ZSTD_MANIFEST_POSITION_ANNOTATION
from oci.hosts import HostsConfig
from oci.manifest import Descriptor
from oci.reference import Reference
from oci.registry import RegistryClient
from snapshotter.lazy import layer_source as remote
from snapshotter.lazy import remote as remote_module
from snapshotter.lazy.layer_source import NotLazy, layer_source
from snapshotter.lazy.remote import open_remote_layer
from snapshotter.lazy.toc_ahead import TocAhead

from .images import build_layout_image, push_layout_image

LAYERS = [{"etc/os-release": b"ID=test\n", "usr/lib/big": b"x" * 300_000},
          {"app/main.py": b"print('hi')\n"}]


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory):
    image = build_layout_image(tmp_path_factory.mktemp("img") / "l", "v1", LAYERS)
    plain = push_layout_image(image.layout, "v1", registry.host, "ws/remote")
    lazy = f"docker://{registry.host}/ws/remote:v1-esgz"
    done = subprocess.run([sys.executable, "-m", "cli.main", "convert", plain, lazy, "--no-cache",
                           "--json", "--prefetch-list", "/dev/null"], capture_output=True,
                          text=True, check=True)
    report = json.loads(done.stdout)["manifests"][0]
    return plain.removeprefix("docker://"), lazy.removeprefix("docker://"), report, image


def open_layer(labels: dict[str, str]):
    async def go():
        async with RegistryClient(hosts=HostsConfig()) as client:
            source = layer_source(labels)
            assert source is not None
            return await open_remote_layer(client, source)
    return asyncio.run(go())


def test_labels_of_both_families() -> None:
    assert layer_source({"containerd.io/snapshot.ref": "sha256:a"}) is None
    stargz = layer_source({remote.REF_LABEL: "sha256:c", remote.STARGZ_REFERENCE: "r.io/a:b",
                           remote.STARGZ_DIGEST: "sha256:d"})
    cri = layer_source({remote.REF_LABEL: "sha256:c", remote.CRI_IMAGE_REF: "r.io/a:b",
                        remote.CRI_LAYER_DIGEST: "sha256:d",
                        remote.CRI_MANIFEST_DIGEST: "sha256:m"})
    assert stargz.reference == cri.reference and stargz.layer_digest == cri.layer_digest
    assert (stargz.manifest_digest, cri.manifest_digest) == (None, "sha256:m")


@pytest.mark.parametrize("family", ["stargz", "cri"])
def test_converted_layer_opens_with_a_verified_toc(images, family) -> None:
    _, lazy, report, _ = images
    layer = report["layers"][0]
    labels = {remote.REF_LABEL: "sha256:chain"}
    if family == "stargz":
        labels |= {remote.STARGZ_REFERENCE: lazy, remote.STARGZ_DIGEST: layer["digest"]}
    else:
        labels |= {remote.CRI_IMAGE_REF: lazy, remote.CRI_LAYER_DIGEST: layer["digest"],
                   remote.CRI_MANIFEST_DIGEST: report["digest"]}
    opened = open_layer(labels)
    assert opened.toc_digest == layer["toc_digest"]
    assert opened.layer.lookup("usr/lib/big").size == 300_000
    assert opened.descriptor.digest == layer["digest"]


def test_unconverted_layer_is_not_lazy(images) -> None:
    plain, _, _, image = images
    with pytest.raises(NotLazy, match="not eStargz"):
        open_layer({remote.REF_LABEL: "x", remote.STARGZ_REFERENCE: plain,
                    remote.STARGZ_DIGEST: image.layer_digests[0]})


def test_layer_not_in_the_manifest_is_not_lazy(images) -> None:
    _, lazy, _, image = images
    with pytest.raises(NotLazy, match="is not in"):
        open_layer({remote.REF_LABEL: "x", remote.STARGZ_REFERENCE: lazy,
                    remote.STARGZ_DIGEST: image.layer_digests[0]})


def test_unreachable_registry_is_not_lazy() -> None:
    with pytest.raises(NotLazy, match="cannot read the manifest"):
        open_layer({remote.REF_LABEL: "x", remote.STARGZ_REFERENCE: "127.0.0.1:9/ws/a:v1",
                    remote.STARGZ_DIGEST: "sha256:" + "0" * 64})


def open_layers_ahead(report: dict, lazy: str, order: list[int]) -> tuple[list, list[str]]:
    """Open the image's layers in `order` through one TocAhead, as the FUSE manager
    does; returns the layers and the requests the registry saw (method, path, range)."""
    seen: list[str] = []

    async def record(request) -> None:
        seen.append(f"{request.method} {request.url.path} {request.headers.get('range', '')}")

    async def go():
        async with RegistryClient(hosts=HostsConfig(),
                                  event_hooks={"request": [record]}) as client:
            ahead = TocAhead(client)
            opened = []
            for i in order:
                source = layer_source({
                    remote.REF_LABEL: f"sha256:chain{i}", remote.CRI_IMAGE_REF: lazy,
                    remote.CRI_LAYER_DIGEST: report["layers"][i]["digest"],
                    remote.CRI_MANIFEST_DIGEST: report["digest"]})
                assert source is not None
                opened.append(await open_remote_layer(client, source, ahead=ahead))
            return opened
    return asyncio.run(go()), seen


def test_first_mount_fetches_every_layers_toc_at_once(images) -> None:
    _, lazy, report, _ = images
    opened, seen = open_layers_ahead(report, lazy, [0, 1])
    assert [o.toc_digest for o in opened] == [layer["toc_digest"] for layer in report["layers"]]
    assert opened[0].layer.lookup("usr/lib/big").size == 300_000
    manifests = [r for r in seen if "/manifests/" in r]
    tails = [r for r in seen if "/blobs/" in r]
    # one manifest request for both mounts; each layer's footer and TOC in one tail request,
    # both started by the first mount
    assert len(manifests) == 1 and len(tails) == 2, seen
    assert {t.split()[1].rsplit("/", 1)[1] for t in tails} == \
        {layer["digest"] for layer in report["layers"]}


def test_tocs_claimed_by_their_mounts_are_not_kept_until_the_ahead_timer(images) -> None:
    """The fetched-ahead TOC bytes go with their mount's claim: the expiry timer (two
    minutes) holds no reference to them."""
    _, lazy, report, _ = images

    async def go() -> None:
        async with RegistryClient(hosts=HostsConfig()) as client:
            ahead = TocAhead(client, keep_seconds=3600)
            sources = [layer_source({
                remote.REF_LABEL: f"sha256:chain{i}", remote.CRI_IMAGE_REF: lazy,
                remote.CRI_LAYER_DIGEST: layer["digest"],
                remote.CRI_MANIFEST_DIGEST: report["digest"]})
                for i, layer in enumerate(report["layers"])]
            assert all(sources)
            await ahead.find_layer(sources[0])  # starts every layer's TOC fetch
            tasks = [weakref.ref(task) for task in ahead._tocs.values()]
            assert len(tasks) == len(report["layers"])
            for source in sources:
                opened = await open_remote_layer(client, source, ahead=ahead)
                opened.layer.close()
            del opened
            assert not ahead._tocs
            gc.collect()
            assert all(task() is None for task in tasks)  # while the timers are pending

    asyncio.run(go())


def test_toc_beyond_the_tail_takes_a_second_request(images, monkeypatch) -> None:
    _, lazy, report, _ = images
    monkeypatch.setattr(remote_module, "TAIL_BYTES", 0)  # the footer alone
    opened, seen = open_layers_ahead(report, lazy, [1, 0])
    assert [o.toc_digest for o in opened] == [report["layers"][i]["toc_digest"] for i in (1, 0)]
    assert len([r for r in seen if "/blobs/" in r]) == 4, seen


@pytest.fixture(scope="module")
def zstd_image(registry, tmp_path_factory):
    """A zstd:chunked image whose first layer's payload is larger than TAIL_BYTES."""
    layers = [{"usr/lib/noise": os.urandom(700_000), "etc/hostname": b"ws\n"},
              {"app/main.py": b"print('hi')\n"}]
    image = build_layout_image(tmp_path_factory.mktemp("zimg") / "l", "v1", layers)
    plain = push_layout_image(image.layout, "v1", registry.host, "ws/remote-zstd")
    lazy = f"docker://{registry.host}/ws/remote-zstd:v1-zstd"
    done = subprocess.run([sys.executable, "-m", "cli.main", "convert", plain, lazy, "--no-cache",
                           "--json", "--format", "zstdchunked", "--prefetch-list", "/dev/null"],
                          capture_output=True, text=True, check=True)
    return lazy.removeprefix("docker://"), json.loads(done.stdout)["manifests"][0]


def test_zstd_chunked_toc_is_fetched_from_where_the_descriptor_puts_it(zstd_image) -> None:
    lazy, report = zstd_image
    opened, seen = open_layers_ahead(report, lazy, [0, 1])
    assert [o.toc_digest for o in opened] == [layer["toc_digest"] for layer in report["layers"]]
    assert opened[0].layer.lookup("usr/lib/noise").size == 700_000
    tails = {r.split()[1].rsplit("/", 1)[1]: r.split()[2] for r in seen if "/blobs/" in r}
    assert len(tails) == 2 and len([r for r in seen if "/blobs/" in r]) == 2, seen
    for layer, descriptor in zip(report["layers"], opened, strict=True):
        position = descriptor.descriptor.annotations[ZSTD_MANIFEST_POSITION_ANNOTATION]
        size = descriptor.descriptor.size
        # the TOC and the footer only: none of the payload before the TOC
        assert tails[layer["digest"]] == f"bytes={position.split(':')[0]}-{size - 1}"
    assert opened[0].descriptor.size - int(tails[report["layers"][0]["digest"]]
                                          .removeprefix("bytes=").split("-")[0]) < 64 << 10


def describe(size: int, position: str | None) -> Descriptor:
    annotations = {} if position is None else {ZSTD_MANIFEST_POSITION_ANNOTATION: position}
    return Descriptor("application/vnd.oci.image.layer.v1.tar+zstd", "sha256:" + "a" * 64,
                      size, annotations)


@pytest.mark.parametrize("position", [
    None, "", "x:1:2:1", "-5:1:2:1", "²:1:2:1",
    str(10 << 20), str((10 << 20) - 50),  # past the blob, or inside its last footer
    "0",  # would fetch a TOC larger than the largest accepted
])
def test_tail_falls_back_to_the_last_bytes_without_a_usable_toc_position(position) -> None:
    size = 10 << 20
    assert remote_module.tail_start(describe(size, position), max_toc_size=1 << 20) == \
        size - remote_module.TAIL_BYTES


def test_tail_starts_at_the_toc_position_even_before_the_usual_tail() -> None:
    size = 10 << 20
    far = size - (900 << 10)  # a TOC larger than TAIL_BYTES: still one request
    assert remote_module.tail_start(describe(size, f"{far}:1:1:1"), max_toc_size=1 << 20) == far
    github = Descriptor("application/vnd.oci.image.layer.v1.tar+zstd", "sha256:" + "a" * 64,
                        size, {"io.github.containers.zstd-chunked.manifest-position":
                               f"{size - 1000}:900:4000:1"})
    assert remote_module.tail_start(github, max_toc_size=1 << 20) == size - 1000
    assert remote_module.tail_start(describe(100, None), max_toc_size=1 << 20) == 0


def test_a_manifest_a_pull_read_is_remembered_but_not_an_index() -> None:
    """What TocAhead.remember keeps is answered without the registry (here one that
    cannot be reached): an image manifest, by its digest; an index or bytes that are
    no manifest are not kept."""
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
             "digest": "sha256:" + "b" * 64, "size": 10}
    manifest = json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": "sha256:" + "c" * 64, "size": 2},
                           "layers": [layer]}).encode()
    index = json.dumps({"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": []}).encode()
    reference = Reference.parse("127.0.0.1:9/ws/remembered:v1")

    async def go() -> None:
        async with RegistryClient(hosts=HostsConfig()) as client:
            ahead = TocAhead(client)
            image, of_index = ("application/vnd.oci.image.manifest.v1+json",
                               "application/vnd.oci.image.index.v1+json")
            for data, media_type, digest in [(manifest, image, "sha256:" + "1" * 64),
                                             (index, of_index, "sha256:" + "2" * 64),
                                             (b"[]", image, "sha256:" + "3" * 64)]:
                ahead.remember(reference, data, media_type, digest)

            def source(digest: str):
                return layer_source({remote.REF_LABEL: "sha256:chain",
                                     remote.CRI_IMAGE_REF: str(reference),
                                     remote.CRI_LAYER_DIGEST: layer["digest"],
                                     remote.CRI_MANIFEST_DIGEST: digest})
            layers = await ahead.image_layers(source("sha256:" + "1" * 64))
            assert [d.digest for d in layers] == [layer["digest"]]
            for digest in ("sha256:" + "2" * 64, "sha256:" + "3" * 64):
                with pytest.raises(NotLazy, match="cannot read the manifest"):
                    await ahead.image_layers(source(digest))

    asyncio.run(go())


def test_a_large_tail_comes_in_parts_side_by_side(zstd_image, monkeypatch) -> None:
    """Each layer's tail as up to TAIL_PARTS ranges that together are the one range
    it would be, and the TOC they make up verifies."""
    lazy, report = zstd_image
    monkeypatch.setattr(remote_module, "TAIL_PART_BYTES", 64)
    opened, seen = open_layers_ahead(report, lazy, [0, 1])
    assert [o.toc_digest for o in opened] == [layer["toc_digest"] for layer in report["layers"]]
    assert opened[0].layer.lookup("usr/lib/noise").size == 700_000
    for layer, descriptor in zip(report["layers"], opened, strict=True):
        ranges = sorted(tuple(int(n) for n in r.split()[2].removeprefix("bytes=").split("-"))
                        for r in seen if layer["digest"] in r)
        position = int(descriptor.descriptor.annotations[ZSTD_MANIFEST_POSITION_ANNOTATION]
                       .split(":")[0])
        assert 1 < len(ranges) <= remote_module.TAIL_PARTS, ranges
        assert ranges[0][0] == position and ranges[-1][1] == descriptor.descriptor.size - 1
        assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges)), ranges
