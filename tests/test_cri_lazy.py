"""The kubelet's path: CRI PullImage is lazy, and a pod's container runs from it.

containerd runs with its CRI plugin and the shipped settings
(manifests/containerd/cri.toml: snapshotter "lazypull", snapshot annotations on,
hosts from config_path) plus the proxy plugin (proxy-plugin.toml). Pods use host
networking, so no CNI is needed; the sandbox ("pause") image is a busybox `sleep`
of our own in the test registry. A minimal CRI client of our own
(tests/fixtures/cri.py) pulls, runs and reads the container's CRI log file.
"""

import hashlib
import tomllib
from pathlib import Path

import pytest

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb

from .fixtures.containerd import start_containerd, stop_containerd
from .fixtures.cri import (
    CRI_NAMESPACE,
    CRI_PLUGIN,
    cri_client,
    cri_test_config,
    run_in_pod,
    shipped_cri_settings,
    write_plain_http_host,
)
from .images import File, Symlink, build_layout_image, push_layout_image
from .lazy_node import convert_pushed
from .test_lazy_pull import HOT, LAYERS, blob_bytes, layer_digests
from .test_snapshotter_containerd import proxy_config

SCRIPT = "cat /etc/hello /data/link; echo; head -c 100 /data/big.bin | wc -c; ls /app"
EXPECTED = "hello lazily\n" + "a" * 100 + "\n100\nrun.sh\n"


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory):
    work = tmp_path_factory.mktemp("img")
    image, report = convert_pushed(registry, work, LAYERS, "ws/crilazy", hot=HOT,
                                   cmd=["/app/run.sh"])
    # The sandbox ("pause") image: busybox sleeping; CRI starts it first in every pod.
    pause = build_layout_image(work / "p", "1", [
        {"bin/busybox": File(Path("/bin/busybox").read_bytes(), 0o755),
         "bin/sleep": Symlink("busybox")}], entrypoint=["/bin/sleep"], cmd=["86400"])
    push_layout_image(pause.layout, "1", registry.host, "ws/pause")
    return {"plain": "ws/crilazy:v1", "lazy": "ws/crilazy:v1-esgz", "image": image,
            "pause": f"{registry.host}/ws/pause:1", "report": report}


@pytest.fixture
def node(snapshotter_factory, registry, fault_proxy_factory, tmp_path_factory, images):
    proxy = fault_proxy_factory(registry.host)
    base = tmp_path_factory.mktemp("cri")
    cri_settings, config_path = cri_test_config(base, images["pause"])
    for host in (registry.host, proxy.host):
        write_plain_http_host(config_path, host)
    config = base / "lazypull.toml"
    # The snapshotter reads the same hosts directory as containerd's CRI plugin.
    config.write_text('background_fetch = false\nprefetch_timeout_seconds = 30.0\n'
                      f'hosts_dir = "{config_path}"\n')
    service = snapshotter_factory(None, False, None, "--config", str(config))
    daemon = start_containerd(tmp_path_factory.mktemp("ctrd"),
                              proxy_config(service.address) + "\n" + cri_settings, cri=True)
    daemon.namespace = CRI_NAMESPACE
    try:
        with cri_client(daemon.address) as client:
            yield {"service": service, "daemon": daemon, "proxy": proxy, "cri": client,
                   "logs": base / "logs", "config": daemon.base / "config.toml"}
    finally:
        stop_containerd(daemon)


def chain_ids(diff_ids: list[str]) -> list[str]:
    chain = [diff_ids[0]]
    for diff_id in diff_ids[1:]:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


def committed(service) -> dict[str, dict[str, str]]:
    """Our service's committed snapshots: name -> labels."""
    return {i.name: dict(i.labels) for r in service.client().List(pb.ListSnapshotsRequest())
            for i in r.info if i.kind == pb.COMMITTED}


def test_test_containerd_uses_the_shipped_cri_settings(node) -> None:
    used = tomllib.loads(node["config"].read_text())["plugins"][CRI_PLUGIN]
    shipped = shipped_cri_settings()["plugins"][CRI_PLUGIN]
    assert used["containerd"]["snapshotter"] == shipped["containerd"]["snapshotter"] == "lazypull"
    assert used["containerd"]["disable_snapshot_annotations"] is False
    assert shipped["containerd"]["disable_snapshot_annotations"] is False
    # Only the hosts directory moved; every other shipped setting is used as it is.
    assert shipped["registry"].pop("config_path") == "/etc/containerd/certs.d"
    assert Path(used["registry"].pop("config_path")).parent == node["logs"].parent
    for table, settings in shipped.items():
        for key, value in settings.items():
            assert used[table][key] == value, (table, key)
    version = node["cri"].version()
    assert version.runtime_name == "containerd" and version.runtime_api_version == "v1"


def test_cri_pull_is_lazy_and_a_pod_runs_from_it(node, images) -> None:
    client, daemon, proxy, service = node["cri"], node["daemon"], node["proxy"], node["service"]
    ref = f"{proxy.host}/{images['lazy']}"
    image_id = client.pull_image(ref)
    assert client.image_status(ref).image.id == image_id
    assert ref in {tag for image in client.list_images() for tag in image.repo_tags}

    # Every layer was committed by the lazy path: named by the chainID containerd asked
    # for (snapshots containerd applies itself are named "k8s.io/N/..."), labelled by CRI.
    info = client.image_info(ref)
    chain = chain_ids(info["imageSpec"]["rootfs"]["diff_ids"])
    assert info["chainID"] == chain[-1]
    ours = committed(service)
    layers = images["report"]["manifests"][0]["layers"]
    for chain_id, layer in zip(chain, layers, strict=True):
        labels = ours[chain_id]
        assert labels["containerd.io/snapshot.ref"] == chain_id
        assert labels["containerd.io/snapshot/cri.layer-digest"] == layer["digest"]
        assert labels["containerd.io/snapshot/cri.image-ref"] == ref
    # The layer blobs never entered containerd's content store, and the registry
    # served only ranges (TOCs and prefetched files), far less than the image.
    content = set(daemon.ctr("content", "ls", "-q").stdout.split())
    assert not layer_digests(images) & content
    image_size = sum(layer["size"] for layer in layers)
    assert blob_bytes(proxy, layer_digests(images)) < image_size / 4

    ran = run_in_pod(client, "lazy", image_id, ["/bin/sh", "-c", SCRIPT], node["logs"])
    assert (ran.exit_code, ran.stdout, ran.stderr) == (0, EXPECTED, "")
    manifest = images["report"]["manifests"][0]["digest"]
    assert ran.status.image_ref == f"{proxy.host}/ws/crilazy@{manifest}"
    served = blob_bytes(proxy, layer_digests(images))
    assert served < image_size / 4, (served, image_size)

    client.remove_image(ref)
    assert ref not in {tag for image in client.list_images() for tag in image.repo_tags}


def test_unconverted_image_through_cri_falls_back_and_runs(node, images) -> None:
    client, daemon, service = node["cri"], node["daemon"], node["service"]
    ref = f"{node['proxy'].host}/{images['plain']}"
    image_id = client.pull_image(ref)
    chain = chain_ids(client.image_info(ref)["imageSpec"]["rootfs"]["diff_ids"])
    # containerd downloaded and applied every layer itself: the blobs are in its
    # content store and the snapshots carry containerd's own names.
    content = set(daemon.ctr("content", "ls", "-q").stdout.split())
    assert set(images["image"].layer_digests) <= content
    ours = committed(service)
    assert not set(chain) & set(ours)
    assert all(any(name.endswith("/" + chain_id) for name in ours) for chain_id in chain)

    ran = run_in_pod(client, "plain", image_id, ["/bin/sh", "-c", SCRIPT], node["logs"])
    assert (ran.exit_code, ran.stdout, ran.stderr) == (0, EXPECTED, "")
