"""Warm-set pull credentials from a Kubernetes image pull Secret mounted as files.

The service's `docker_config` names `.dockerconfigjson` in a directory laid out as the
kubelet lays out a Secret volume: the data in a timestamped directory, `..data` a
symlink to it, and each key a symlink through `..data`. The kubelet updates the Secret
by writing a new timestamped directory, renaming a fresh `..data` symlink over the old
one and removing the old directory; the service must follow that without a restart.

End to end: a registry with htpasswd auth, our service with a warm set of one
converted image, a private containerd with the service as proxy snapshotter.
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from oci.docker_config import CredentialStore

from .fixtures.containerd import start_containerd, stop_containerd
from .fixtures.registry import PASSWORD, USER
from .fixtures.snapshotter import REPO_ROOT
from .images import File, build_layout_image, skopeo
from .test_snapshotter_containerd import proxy_config
from .test_warm_set import _http, _warm, warm_config

SECRET_KEY = ".dockerconfigjson"
# As long as PASSWORD, so the Secret's file keeps its size when the password changes.
WRONG_PASSWORD = "Zq7-wrong!"
REFRESH_SECONDS = 3  # also caps the retry backoff, so retries come every few seconds
DEADLINE_SECONDS = 120


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _dockerconfigjson(host: str, password: str) -> bytes:
    """A Secret's `.dockerconfigjson` (`kubectl create secret docker-registry` layout)."""
    return json.dumps({"auths": {host: {"username": USER, "password": password,
                                        "auth": _b64(f"{USER}:{password}")}}}).encode()


def publish_secret(volume: Path, files: dict[str, bytes], mtime_ns: int | None = None) -> None:
    """Write `files` into `volume` as the kubelet's atomic writer does. `mtime_ns` pins
    the new files' mtime, as coarse file timestamps make it for quick successive writes."""
    volume.mkdir(parents=True, exist_ok=True)
    data = volume / "..data"
    previous = os.readlink(data) if data.is_symlink() else None
    prefix = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    new = Path(tempfile.mkdtemp(prefix=prefix, dir=volume))
    new.chmod(0o755)
    for name, content in files.items():
        (new / name).write_bytes(content)
        if mtime_ns is not None:
            os.utime(new / name, ns=(mtime_ns, mtime_ns))
    staged = volume / "..data_tmp"
    os.symlink(new.name, staged)
    os.rename(staged, data)  # the atomic switch
    for name in files:
        if not (volume / name).is_symlink():
            os.symlink(f"..data/{name}", volume / name)
    if previous is not None:
        shutil.rmtree(volume / previous)


# -- the credential store alone ------------------------------------------------------------


def test_store_follows_secret_volume_swaps_of_same_size_and_mtime(tmp_path: Path) -> None:
    volume = tmp_path / "pull-secrets"
    host = "registry.example:5000"
    publish_secret(volume, {SECRET_KEY: _dockerconfigjson(host, "password-1")})
    store = CredentialStore(str(volume / SECRET_KEY))
    assert store.get(host).password == "password-1"
    first = (volume / SECRET_KEY).stat()

    for password in ("password-2", "password-3"):
        publish_secret(volume, {SECRET_KEY: _dockerconfigjson(host, password)},
                       mtime_ns=first.st_mtime_ns)
        now = (volume / SECRET_KEY).stat()
        assert (now.st_size, now.st_mtime_ns) == (first.st_size, first.st_mtime_ns)
        assert store.get(host).password == password
    assert len([p for p in volume.iterdir() if p.name.startswith("..2")]) == 1

    # Two swaps between lookups: the last one counts.
    for password in ("password-4", "password-5"):
        publish_secret(volume, {SECRET_KEY: _dockerconfigjson(host, password)},
                       mtime_ns=first.st_mtime_ns)
    assert store.get(host).password == "password-5"
    assert store.get("other.example") is None

    # The Secret deleted (the volume emptied): anonymous; back again: its credentials.
    shutil.rmtree(volume)
    assert store.get(host) is None
    publish_secret(volume, {SECRET_KEY: _dockerconfigjson(host, "password-6")})
    assert store.get(host).password == "password-6"


# -- end to end ----------------------------------------------------------------------------


def _lazypull(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, env={**os.environ, **env}, timeout=300)


@pytest.fixture(scope="module")
def private_image(basic_auth_registry, tmp_path_factory) -> dict[str, str]:
    """A converted image in the registry that needs USER / PASSWORD."""
    host = basic_auth_registry.host
    layers = [{"etc/hot.txt": b"hot private\n", "bin/run": File(b"#!/bin/sh\n", 0o755)},
              {"data/cold.bin": os.urandom(2 << 20), "etc/cold.txt": b"cold\n"}]
    image = build_layout_image(tmp_path_factory.mktemp("private") / "l", "v1", layers)
    skopeo("copy", "--dest-tls-verify=false", "--dest-creds", f"{USER}:{PASSWORD}",
           f"oci:{image.layout}:v1", f"docker://{host}/ws/private:v1")
    docker = tmp_path_factory.mktemp("docker")
    (docker / "config.json").write_bytes(_dockerconfigjson(host, PASSWORD))
    hot = docker / "hot.txt"
    hot.write_text("/etc/hot.txt\n")
    done = _lazypull("convert", f"docker://{host}/ws/private:v1",
                     f"docker://{host}/ws/private:v1-esgz", "--no-cache", "--json",
                     "--prefetch-list", str(hot), env={"DOCKER_CONFIG": str(docker)})
    assert done.returncode == 0, done.stderr
    [manifest] = json.loads(done.stdout)["manifests"]
    return {"host": host, "ref": f"{host}/ws/private:v1-esgz", "digest": manifest["digest"]}


def _entry(port: int) -> dict:
    [image] = _warm(port, "status")["images"]
    return image


def _wait_entry(service, done: Callable[[dict], bool], what: str) -> dict:
    deadline = time.monotonic() + DEADLINE_SECONDS
    image = _entry(service.metrics_port)
    while not done(image):
        assert time.monotonic() < deadline, f"{what}: {image}\n{service.log[-4000:]}"
        time.sleep(0.3)
        image = _entry(service.metrics_port)
    return image


def _wait_ready(service) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    status, body = _http(service.metrics_port, "/readyz")
    while status != 200:
        assert time.monotonic() < deadline, f"{body}\n{service.log[-4000:]}"
        time.sleep(0.3)
        status, body = _http(service.metrics_port, "/readyz")


def test_warm_set_follows_a_rotated_pull_secret(snapshotter_factory, private_image,
                                                tmp_path_factory) -> None:
    host, ref = private_image["host"], private_image["ref"]
    volume = tmp_path_factory.mktemp("secret") / "pull-secrets"
    publish_secret(volume, {SECRET_KEY: _dockerconfigjson(host, WRONG_PASSWORD)})
    ctrd_base = tmp_path_factory.mktemp("ctrd")
    config = warm_config(tmp_path_factory, ctrd_base,
                         f'[[warm_set]]\nref = "{ref}"\nrefresh_seconds = {REFRESH_SECONDS}\n',
                         f'docker_config = "{volume / SECRET_KEY}"\n')
    service = snapshotter_factory(None, True, None, "--config", str(config))
    daemon = start_containerd(ctrd_base, proxy_config(service.address))
    try:
        port = service.metrics_port
        # 1. Wrong credentials: failed with an auth reason, retried, not ready.
        image = _wait_entry(service, lambda i: i["state"] == "failed" and i["failures"] >= 2,
                            "failed twice")
        assert "refused the credentials" in image["reason"], image
        assert "401" in image["reason"] and image["warm_digest"] == "", image
        status, body = _http(port, "/readyz")
        assert status == 503 and "failed" in body, body
        assert _http(port, "/healthz")[0] == 200
        metrics = _http(port, "/metrics")[1]
        assert f'lazypull_warm_image_state{{namespace="k8s.io",ref="{ref}",' \
               f'state="failed"}} 1.0' in metrics

        # 2. The kubelet publishes the rotated Secret; no restart.
        publish_secret(volume, {SECRET_KEY: _dockerconfigjson(host, PASSWORD)})
        _wait_ready(service)
        image = _entry(port)
        assert image["state"] == "warm" and not image["reason"], image
        assert image["digest"] == image["warm_digest"] == private_image["digest"], image
        assert image["failures"] == 0 and 0 < image["bytes_cached"] < image["bytes_total"]
        listed = daemon.ctr("images", "ls", namespace="k8s.io").stdout
        assert ref in listed and private_image["digest"] in listed, listed

        # 3. Revoked again: refreshes fail, but the warm image keeps the node ready.
        publish_secret(volume, {SECRET_KEY: _dockerconfigjson(host, WRONG_PASSWORD)})
        image = _wait_entry(service, lambda i: i["reason"].startswith("refresh failed"),
                            "refresh failed")
        assert image["state"] == "warm" and "refused the credentials" in image["reason"]
        assert _http(port, "/readyz")[0] == 200
        assert service.process.poll() is None
        # Secrets stay out of what the service reports, logs and exposes as metrics,
        # also base64-encoded as the Authorization header carries them.
        secrets = [PASSWORD, WRONG_PASSWORD, _b64(f"{USER}:{PASSWORD}"),
                   _b64(f"{USER}:{WRONG_PASSWORD}")]
        for text in (json.dumps(_warm(port, "status")), service.log,
                     _http(port, "/metrics")[1]):
            assert not [secret for secret in secrets if secret in text]
    finally:
        stop_containerd(daemon)
