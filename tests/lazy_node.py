"""A node for lazy-pull tests: the snapshotter service (and its FUSE manager) from
the fixtures, a private containerd with it as proxy snapshotter `lazypull`, and a
fault proxy in front of the registry that records every request."""

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .fixtures.containerd import start_containerd, stop_containerd
from .images import LayoutImage, build_layout_image, push_layout_image
from .test_snapshotter_containerd import proxy_config

REPO_ROOT = Path(__file__).resolve().parent.parent
NO_BACKGROUND = "background_fetch = false\nprefetch_timeout_seconds = 30.0\n"


def lazypull(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=300)


def convert_pushed(registry: Any, workdir: Path, layers: list[dict[str, Any]], repo: str,
                   *convert_args: str, hot: str | None = None,
                   cmd: list[str] | None = None) -> tuple[LayoutImage, dict[str, Any]]:
    """Build LAYERS, push them as REPO:v1 and `lazypull convert` that to REPO:v1-esgz,
    its hot files the lines of `hot` (if given); returns the image and the convert
    command's JSON report."""
    image = build_layout_image(workdir / "layout", "v1", layers, cmd=cmd)
    plain = push_layout_image(image.layout, "v1", registry.host, repo)
    if hot is not None:
        (workdir / "hot.txt").write_text(hot)
        convert_args = (*convert_args, "--prefetch-list", str(workdir / "hot.txt"))
    done = lazypull("convert", plain, f"docker://{registry.host}/{repo}:v1-esgz",
                    "--no-cache", "--json", *convert_args)
    assert done.returncode == 0, done.stderr
    return image, json.loads(done.stdout)


def start_lazy_node(snapshotter_factory: Any, registry: Any, fault_proxy_factory: Any,
                    tmp_path_factory: Any, settings: str = NO_BACKGROUND) -> dict[str, Any]:
    """`settings`: the service's config file, but for `hosts_dir`."""
    proxy = fault_proxy_factory(registry.host)
    config = tmp_path_factory.mktemp("cfg") / "config.toml"
    config.write_text(settings + f'hosts_dir = "{tmp_path_factory.mktemp("hosts")}"\n')
    service = snapshotter_factory(None, True, None, "--config", str(config))
    daemon = start_containerd(tmp_path_factory.mktemp("ctrd"), proxy_config(service.address))
    return {"service": service, "daemon": daemon, "proxy": proxy, "config": config}


def stop_lazy_node(node: dict[str, Any]) -> None:
    """containerd, by PID; the fixtures stop the service and the proxy."""
    stop_containerd(node["daemon"])


def pull(node: dict[str, Any], ref: str, *more: str) -> dict:
    """`lazypull pull` of REF (a repository:tag on the registry) through the proxy."""
    done = lazypull("pull", f"{node['proxy'].host}/{ref}", "--address", node["daemon"].address,
                    "--json", *more)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(name="node")
def lazy_node_fixture(snapshotter_factory: Any, registry: Any, fault_proxy_factory: Any,
                      tmp_path_factory: Any) -> Iterator[dict[str, Any]]:
    """`node` for a test module that imports this: a lazy node without background fetch."""
    started = start_lazy_node(snapshotter_factory, registry, fault_proxy_factory,
                              tmp_path_factory)
    yield started
    stop_lazy_node(started)
