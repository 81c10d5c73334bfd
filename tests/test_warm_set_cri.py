"""The warm set on the kubelet's path: once the warm set is warm, CRI PullImage of
each warmed image transfers no layer bytes, and a pod reading the hot files of a
warmed converted image costs no registry traffic.

Real components: a registry behind a recording proxy (blob requests are counted at
the registry side), our service with a warm set of a converted and an unconverted
image (both through the proxy), and a CRI-enabled containerd with the shipped CRI
settings (as in tests/test_cri_lazy.py) that the warm set pulls into.
"""

import json
import time

import pytest

from .fixtures.containerd import start_containerd, stop_containerd
from .fixtures.cri import (
    CRI_NAMESPACE,
    cri_client,
    cri_test_config,
    run_in_pod,
    write_plain_http_host,
)
from .test_cri_lazy import images  # noqa: F401 (the module's images fixture)
from .test_lazy_pull import layer_digests
from .test_snapshotter_containerd import proxy_config
from .test_warm_set import _http, _wait_ready, _warm


def _layer_requests(proxy, digests: set[str]) -> int:
    return sum(1 for r in proxy.requests(None, r"/blobs/sha256:")
               if r.path.rsplit("/", 1)[-1].split("?")[0] in digests)


@pytest.fixture
def warm_cri_node(snapshotter_factory, registry, fault_proxy_factory, tmp_path_factory,
                  images):  # noqa: F811
    proxy = fault_proxy_factory(registry.host)
    base = tmp_path_factory.mktemp("cri")
    ctrd_base = tmp_path_factory.mktemp("ctrd")
    cri_settings, config_path = cri_test_config(base, images["pause"])
    for host in (registry.host, proxy.host):
        write_plain_http_host(config_path, host)
    refs = {"lazy": f"{proxy.host}/{images['lazy']}", "plain": f"{proxy.host}/{images['plain']}"}
    config = base / "lazypull.toml"
    config.write_text(
        "background_fetch = false\nprefetch_timeout_seconds = 30.0\n"
        f'hosts_dir = "{config_path}"\n'
        f'containerd_address = "{ctrd_base / "c.sock"}"\n'
        f'[[warm_set]]\nref = "{refs["lazy"]}"\nnamespace = "{CRI_NAMESPACE}"\n'
        f'[[warm_set]]\nref = "{refs["plain"]}"\npolicy = "full"\n'
        f'namespace = "{CRI_NAMESPACE}"\n')
    service = snapshotter_factory(None, True, None, "--config", str(config))
    daemon = start_containerd(ctrd_base, proxy_config(service.address) + "\n" + cri_settings,
                              cri=True)
    daemon.namespace = CRI_NAMESPACE
    try:
        with cri_client(daemon.address) as client:
            yield {"service": service, "daemon": daemon, "proxy": proxy, "cri": client,
                   "logs": base / "logs", "refs": refs}
    finally:
        stop_containerd(daemon)


def test_cri_pull_of_warmed_images_transfers_no_layer_bytes(warm_cri_node, images) -> None:  # noqa: F811
    node = warm_cri_node
    port, proxy, client = node["service"].metrics_port, node["proxy"], node["cri"]
    _wait_ready(port, 180)
    status = {i["ref"]: i for i in _warm(port, "status")["images"]}
    for ref in node["refs"].values():
        assert status[ref]["state"] == "warm", status[ref]
    lazy_layers = layer_digests(images)
    plain_layers = set(images["image"].layer_digests)
    assert _layer_requests(proxy, lazy_layers) > 0  # the warm set fetched ranges
    assert _layer_requests(proxy, plain_layers) >= len(plain_layers)  # downloaded
    before = len(proxy.requests(None, r"/blobs/"))

    for name, ref in node["refs"].items():
        image_id = client.pull_image(ref)
        assert client.image_status(ref).image.id == image_id, name
    # PullImage may resolve the manifest again, but no layer (or config) blob moves.
    assert len(proxy.requests(None, r"/blobs/")) == before, \
        [r.path for r in proxy.requests(None, r"/blobs/")[before:]]

    # A pod from the warmed converted image reading its hot files: still no traffic.
    ran = run_in_pod(client, "warmhot", node["refs"]["lazy"],
                     ["/bin/sh", "-c", "cat /etc/hello"], node["logs"])
    assert (ran.exit_code, ran.stdout, ran.stderr) == (0, "hello lazily\n", "")
    assert len(proxy.requests(None, r"/blobs/")) == before
    assert _http(port, "/readyz")[0] == 200
    # The images stay warm after the pulls (CRI re-tagged nothing away).
    time.sleep(0.5)
    after = json.dumps(_warm(port, "status"))
    assert '"state": "failed"' not in after
