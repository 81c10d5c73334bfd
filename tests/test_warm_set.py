"""The warm set: images the service pulls into containerd at start and keeps fresh.

Real components: a registry, our service with a warm set of two converted images and
one unconverted image (one of them from warm_set_dir), a private containerd with the
service as proxy snapshotter, started after the service (so the first attempts fail
and are retried), and the `lazypull warm` CLI over the service's HTTP endpoint.
"""

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from snapshotter.config import ConfigError, load_config
from snapshotter.warm.spec import WarmSpecError, merge, parse_entries, read_dir

from .fixtures.containerd import start_containerd, stop_containerd
from .fixtures.fault_proxy import WireFault
from .images import File, Symlink, build_layout_image, push_layout_image
from .lazy_node import convert_pushed, lazypull
from .test_lazy_pull import blob_bytes
from .test_snapshotter_containerd import proxy_config

HOT = "/etc/hot.txt\n"


def _layers(tag: str) -> list[dict]:
    return [
        {"etc/hot.txt": f"hot {tag}\n".encode(), "etc/base": b"base\n"},
        {"data/blob.bin": os.urandom(3 << 20), "data/small.txt": f"small {tag}\n".encode(),
         "bin/run": File(b"#!/bin/sh\necho hi\n", 0o755)},
    ]


def _convert(registry, tmp_path_factory, name: str, tag: str, repo: str,
             target: str | None = None) -> dict:
    """Build NAME, push it as REPO:TAG (plain) and convert it to TARGET:TAG-esgz
    (default: REPO)."""
    image = build_layout_image(tmp_path_factory.mktemp(name) / "l", tag, _layers(name))
    plain = push_layout_image(image.layout, tag, registry.host, repo)
    hot = tmp_path_factory.mktemp("hot") / "hot.txt"
    hot.write_text(HOT)
    done = lazypull("convert", plain, f"docker://{registry.host}/{target or repo}:{tag}-esgz",
                    "--no-cache", "--json", "--prefetch-list", str(hot))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory):
    _convert(registry, tmp_path_factory, "a", "v1", "ws/warm-a")
    _convert(registry, tmp_path_factory, "b", "v1", "ws/warm-b")
    host = registry.host
    return {"a": f"{host}/ws/warm-a:v1-esgz", "b": f"{host}/ws/warm-b:v1-esgz",
            "plain": f"{host}/ws/warm-a:v1", "missing": f"{host}/ws/warm-none:v1"}


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_ready(port: int, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    status, body = _http(port, "/readyz")
    while status != 200:
        assert time.monotonic() < deadline, body
        time.sleep(0.5)
        status, body = _http(port, "/readyz")


def _warm(port: int, *args: str) -> dict:
    done = lazypull("warm", *args, "--address", f"127.0.0.1:{port}", "--json")
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def _by_ref(status: dict) -> dict[str, dict]:
    return {image["ref"]: image for image in status["images"]}


def _image_digests(daemon) -> dict[str, str]:
    out = daemon.ctr("images", "ls", namespace="k8s.io").stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[2] for line in out}


def warm_config(tmp_path_factory, ctrd_base: Path, tables: str, extra: str = "") -> Path:
    """A service config for one containerd (in ctrd_base), background fetch off, with
    these [[warm_set]] tables and extra lines."""
    config = tmp_path_factory.mktemp("cfg") / "config.toml"
    config.write_text(
        "background_fetch = false\n"
        f'hosts_dir = "{tmp_path_factory.mktemp("hosts")}"\n'
        f'containerd_address = "{ctrd_base / "c.sock"}"\n' + extra + tables)
    return config


@pytest.fixture
def warm_node(snapshotter_factory, images, tmp_path_factory):
    ctrd_base = tmp_path_factory.mktemp("ctrd")
    warm_dir = tmp_path_factory.mktemp("warmdir")
    (warm_dir / "plain.toml").write_text(
        f'[[warm_set]]\nref = "{images["plain"]}"\npolicy = "full"\n')
    (warm_dir / "broken.toml").write_text("[[warm_set]]\npolicy = 'sometimes'\n")
    (warm_dir / "optional.toml").write_text(
        f'[[warm_set]]\nref = "{images["missing"]}"\nblock_readiness = false\n')
    config = tmp_path_factory.mktemp("cfg") / "config.toml"
    config.write_text(
        "background_fetch = false\n"
        f'hosts_dir = "{tmp_path_factory.mktemp("hosts")}"\n'
        f'containerd_address = "{ctrd_base / "c.sock"}"\n'
        f'warm_set_dir = "{warm_dir}"\n'
        "[[warm_set]]\n"
        f'ref = "{images["a"]}"\n'
        "[[warm_set]]\n"
        f'ref = "{images["b"]}"\npolicy = "full"\n')
    service = snapshotter_factory(None, True, None, "--config", str(config))
    daemons = []

    def start() -> object:
        daemons.append(start_containerd(ctrd_base, proxy_config(service.address)))
        return daemons[-1]

    yield {"service": service, "start_containerd": start}
    for daemon in daemons:
        stop_containerd(daemon)


def test_warm_set_at_boot_and_moving_tag(warm_node, images, registry,
                                         tmp_path_factory) -> None:
    service = warm_node["service"]
    port = service.metrics_port
    # containerd is not up yet: nothing can be warm, and the reason says why.
    status, body = _http(port, "/readyz")
    assert status == 503, body
    deadline = time.monotonic() + 60
    while not any(i["state"] == "failed" for i in _warm(port, "status")["images"]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    failed = [i for i in _warm(port, "status")["images"] if i["state"] == "failed"]
    assert all(i["reason"] and i["failures"] >= 1 for i in failed), failed
    assert _http(port, "/readyz")[0] == 503
    daemon = warm_node["start_containerd"]()  # the retries (with backoff) now succeed
    _wait_ready(port)
    status = _warm(port, "status")
    assert status["ready"] is True
    assert any("broken.toml" in error for error in status["errors"])
    by_ref = _by_ref(status)
    # Not in the registry, but block_readiness = false: failed, with the reason.
    missing = by_ref.pop(images["missing"])
    assert missing["state"] == "failed" and "not found" in missing["reason"].lower(), \
        missing
    assert set(by_ref) == {images["a"], images["b"], images["plain"]}
    for image in by_ref.values():
        assert image["state"] == "warm", image
        assert image["digest"].startswith("sha256:")
        assert image["warm_digest"] == image["digest"]
        assert image["namespace"] == "k8s.io"
        assert image["last_success"] and image["next_refresh"]
        assert image["boot_seconds"] > 0
    # full: every chunk cached; unconverted: all unpacked by containerd
    for ref in (images["b"], images["plain"]):
        assert by_ref[ref]["bytes_cached"] == by_ref[ref]["bytes_total"] > 0, by_ref[ref]
    # prefetch (background fetch off): the prioritized region, not everything
    a = by_ref[images["a"]]
    assert 0 < a["bytes_cached"] < a["bytes_total"], a

    listed = _image_digests(daemon)
    for ref, image in by_ref.items():
        assert listed[ref] == image["digest"], listed
    assert images["missing"] not in listed

    table = lazypull("warm", "status", "--address", f"http://127.0.0.1:{port}")
    assert table.returncode == 0, table.stderr
    assert "warm" in table.stdout and images["a"] in table.stdout

    metrics = _http(port, "/metrics")[1]
    assert f'lazypull_warm_image_state{{namespace="k8s.io",ref="{images["a"]}",' \
           f'state="warm"}} 1.0' in metrics
    assert "lazypull_warm_boot_seconds" in metrics
    assert "lazypull_warm_refresh_failures_total" in metrics

    # A moving tag: push other content under a's tag, refresh, the new digest is warm.
    _convert(registry, tmp_path_factory, "a2", "v1", "ws/warm-a2", "ws/warm-a")
    refreshed = _warm(port, "refresh", images["a"])
    [image] = refreshed["images"]
    assert image["state"] == "warm", image
    assert image["digest"] != a["digest"]
    assert image["warm_digest"] == image["digest"]
    assert _image_digests(daemon)[images["a"]] == image["digest"]
    assert _http(port, "/readyz")[0] == 200
    after = _by_ref(_warm(port, "status"))
    assert after[images["a"]]["digest"] == image["digest"]
    assert after[images["b"]]["digest"] == by_ref[images["b"]]["digest"]

    # An image deleted from containerd is warmed again on refresh.
    daemon.ctr("images", "rm", images["b"], namespace="k8s.io")
    refreshed = _warm(port, "refresh", images["b"])
    assert refreshed["images"][0]["state"] == "warm", refreshed
    assert images["b"] in _image_digests(daemon)

    unknown = lazypull("warm", "refresh", "nowhere.example/x:y", "--address",
                       f"127.0.0.1:{port}")
    assert unknown.returncode == 1 and "not in the warm set" in unknown.stderr

    # A restart: warm again from local state (same digests, the chunks still cached).
    before = _by_ref(_warm(port, "status"))
    service.stop()
    service.start()
    _wait_ready(port)
    again = _by_ref(_warm(port, "status"))
    for ref in (images["a"], images["b"], images["plain"]):
        assert again[ref]["state"] == "warm", again[ref]
        assert again[ref]["digest"] == before[ref]["digest"]
        assert again[ref]["bytes_cached"] == before[ref]["bytes_cached"]


def test_containerd_that_started_first_is_waited_for(snapshotter_factory, images,
                                                     tmp_path_factory) -> None:
    """As on a booting node: containerd dialled the service's socket before it existed
    and waits out a reconnect backoff; the first warm attempt waits for containerd to
    reach the service instead of failing and backing off."""
    ctrd_base = tmp_path_factory.mktemp("ctrd")
    address = str(tmp_path_factory.mktemp("sock") / "s.sock")
    daemon = start_containerd(ctrd_base, proxy_config(address))
    try:
        daemon.ctr("snapshots", "--snapshotter", "lazypull", "ls", check=False)  # dials
        config = warm_config(tmp_path_factory, ctrd_base, f'[[warm_set]]\nref = "{images["a"]}"\n')
        service = snapshotter_factory(None, True, address, "--config", str(config))
        _wait_ready(service.metrics_port)
        [image] = _warm(service.metrics_port, "status")["images"]
        assert image["state"] == "warm" and image["failures"] == 0, image
        assert "refresh_failures_total" not in _failures(service.metrics_port)
    finally:
        stop_containerd(daemon)


def _failures(port: int) -> str:
    """The refresh-failure samples with a value other than zero."""
    return "\n".join(line for line in _http(port, "/metrics")[1].splitlines()
                     if line.startswith("lazypull_warm_refresh_failures_total{")
                     and not line.endswith(" 0.0"))


# -- configuration, without components ---------------------------------------------------


def test_entries_parse_with_defaults_and_refuse_bad_ones() -> None:
    [spec] = parse_entries([{"ref": "reg.example/a:b"}], "t")
    assert (spec.policy, spec.namespace, spec.refresh_seconds, spec.block_readiness) == \
        ("prefetch", "k8s.io", 900.0, True)
    for bad in ({"ref": "reg.example/a:b", "policy": "lazy"}, {"policy": "full"},
                {"ref": "reg.example/a:b", "refresh_seconds": 0},
                {"ref": "reg.example/a:b", "extra": 1}, {"ref": "UPPER/Case"}):
        with pytest.raises(WarmSpecError):
            parse_entries([bad], "t")
    with pytest.raises(WarmSpecError, match="twice"):
        parse_entries([{"ref": "r.example/a:b"}, {"ref": "r.example/a:b"}], "t")


def test_warm_set_dir_and_config(tmp_path: Path) -> None:
    (tmp_path / "one.toml").write_text('[[warm_set]]\nref = "r.example/a:1"\n')
    (tmp_path / "two.toml").write_text('[[warm_set]]\nref = "r.example/a:2"\npolicy = "full"\n'
                                       'namespace = "default"\n')
    (tmp_path / "bad.toml").write_text("not toml [")
    specs, errors = read_dir(str(tmp_path))
    assert [s.ref for s in specs] == ["r.example/a:1", "r.example/a:2"]
    assert len(errors) == 1 and "bad.toml" in errors[0]
    assert read_dir(str(tmp_path / "missing")) == ([], [])
    override = parse_entries([{"ref": "r.example/a:1", "policy": "full"}], "t")
    assert [s.policy for s in merge(specs, override)] == ["full", "full"]

    config = tmp_path / "config.toml"
    config.write_text('warm_set_dir = "/etc/lazypull/warm.d"\n[[warm_set]]\n'
                      'ref = "r.example/a:1"\nblock_readiness = false\n')
    loaded = load_config(str(config))
    assert loaded.warm_set_dir == "/etc/lazypull/warm.d"
    assert parse_entries(loaded.warm_set, "t")[0].block_readiness is False
    config.write_text('[[warm_set]]\nref = "r.example/a:1"\npolicy = "eager"\n')
    with pytest.raises(ConfigError, match="policy"):
        load_config(str(config))


# -- the manager's loop, with a registry that has nothing ----------------------------------


class _EmptyRegistry:
    def __init__(self) -> None:
        self.asked = 0

    async def get_manifest(self, reference, digest=None):
        from oci.store import NotFoundError
        self.asked += 1
        raise NotFoundError(f"{reference}: manifest unknown")


class _NoContainerd:
    def __init__(self, address: str, namespace: str) -> None:
        self.namespace = namespace

    async def aclose(self) -> None:
        pass


def test_failures_retry_and_readiness_follows_block_readiness() -> None:
    import asyncio

    from snapshotter.warm.http import warm_routes
    from snapshotter.warm.manager import WarmSet

    async def scenario() -> None:
        registry = _EmptyRegistry()
        specs = parse_entries([{"ref": "r.example/gone:1", "block_readiness": False},
                               {"ref": "r.example/gone:2"}], "t")
        warm = WarmSet(specs, registry=registry, containerd_address="/nonexistent",
                       containerd_factory=_NoContainerd)
        assert warm.ready() == (False, "warm set not started yet")
        await warm.start()
        try:
            await warm.refresh(timeout=10)
            states = {e.spec.ref: e for e in warm.entries.values()}
            assert all(e.state == "failed" and "manifest unknown" in e.reason
                       for e in states.values())
            ok, why = warm.ready()
            assert not ok and "r.example/gone:2" in why and "gone:1" not in why
            assert states["r.example/gone:1"].failures >= 1
            asked = registry.asked
            await asyncio.sleep(2.5)  # backoff: 1s, then 2s
            assert registry.asked > asked
            route = warm_routes(warm)
            status, ctype, body = await route("GET", "/warm", "")
            assert (status, ctype) == (200, "application/json")
            assert {i["state"] for i in json.loads(body)["images"]} == {"failed"}
            assert (await route("POST", "/warm/refresh", "ref=x.example/y:z"))[0] == 404
            assert (await route("GET", "/warm/refresh", ""))[0] == 405
            assert await route("GET", "/metrics", "") is None
            status, _, body = await route("POST", "/warm/refresh", "ref=r.example/gone:1")
            assert status == 200 and json.loads(body)["images"][0]["state"] == "failed"
            # The entry that blocks readiness leaves the set: ready.
            warm.config_specs = specs[:1]
            await warm._reconcile()
            assert warm.ready()[0]
        finally:
            await warm.close()

    asyncio.run(scenario())


# -- registry down at boot, zero-traffic workloads, re-warm after eviction -------------------

RUN_HOT = "/bin/busybox\n/bin/sh\n/etc/hot.txt\n"


@pytest.fixture(scope="module")
def runnable(registry, tmp_path_factory):
    """A converted image with a shell whose hot files (busybox, /etc/hot.txt) are in its
    prioritized region, and a cold layer that a workload reading hot files never needs."""
    layers = [{"bin/busybox": File(Path("/bin/busybox").read_bytes(), 0o755),
               "bin/sh": Symlink("busybox"), "etc/hot.txt": b"hot runnable\n"},
              {"data/cold.bin": os.urandom(4 << 20), "etc/cold.txt": b"cold\n"}]
    _, report = convert_pushed(registry, tmp_path_factory.mktemp("run"), layers, "ws/warm-run",
                               hot=RUN_HOT, cmd=["/bin/sh"])
    return {"repo": "ws/warm-run:v1-esgz",
            "layers": {layer["digest"] for layer in report["manifests"][0]["layers"]}}


def _down(proxy) -> list[WireFault]:
    """Every request the proxy gets is refused with a 503 until the faults are cleared."""
    faults = [WireFault("answer", method, ".", status=503, body=b"registry down")
              for method in ("GET", "HEAD")]
    proxy.add(*faults)
    return faults


def _blob_requests(proxy, digests: set[str]) -> int:
    return sum(1 for r in proxy.requests(None, r"/blobs/sha256:")
               if r.path.rsplit("/", 1)[-1].split("?")[0] in digests)


def test_registry_down_at_boot_then_zero_traffic_and_rewarm(
        snapshotter_factory, registry, fault_proxy_factory, runnable,
        tmp_path_factory) -> None:
    proxy = fault_proxy_factory(registry.host)
    faults = _down(proxy)
    ref = f"{proxy.host}/{runnable['repo']}"
    ctrd_base = tmp_path_factory.mktemp("ctrd")
    config = warm_config(tmp_path_factory, ctrd_base, f'[[warm_set]]\nref = "{ref}"\n')
    service = snapshotter_factory(None, True, None, "--config", str(config))
    daemon = start_containerd(ctrd_base, proxy_config(service.address))
    try:
        port = service.metrics_port
        # 1. The registry refuses everything: failed with a reason, retried, not ready.
        deadline = time.monotonic() + 60
        image = _warm(port, "status")["images"][0]
        while image["state"] != "failed" or image["failures"] < 2:
            assert time.monotonic() < deadline, image
            time.sleep(0.3)
            image = _warm(port, "status")["images"][0]
        assert image["reason"] and "resolve" in image["reason"], image
        assert _http(port, "/readyz")[0] == 503
        seen = len(proxy.requests())
        time.sleep(3)  # backoff: the service keeps asking
        assert len(proxy.requests()) > seen
        assert _warm(port, "status")["images"][0]["state"] in ("failed", "pending",
                                                               "warming")
        # The registry comes back: ready without a restart.
        for fault in faults:
            fault.clear()
        _wait_ready(port, 120)
        [image] = _warm(port, "status")["images"]
        assert image["state"] == "warm" and not image["reason"], image
        assert 0 < image["bytes_cached"] < image["bytes_total"], image
        assert service.process.poll() is None

        # 2. A workload reading the hot files costs no registry traffic.
        before = _blob_requests(proxy, runnable["layers"])
        assert before > 0
        run = daemon.ctr("run", "--rm", "--snapshotter", "lazypull", ref, "warmrun",
                         "/bin/sh", "-c", "cat /etc/hot.txt", namespace="k8s.io")
        assert run.stdout == "hot runnable\n", run.stderr
        assert _blob_requests(proxy, runnable["layers"]) == before
        assert blob_bytes(proxy, runnable["layers"]) < 1 << 40  # ranges only

        # 3. The cached chunks are evicted (the cache directory emptied while the
        # service is down: the chunk files and the index that packs small chunks):
        # after a restart and a forced refresh the image is warmed again, fetching
        # the chunks from the registry again.
        chunks = service.root / "cache" / "sha256"
        service.stop()
        cached = [path for path in chunks.parent.rglob("*") if path.is_file()]
        assert chunks.parent / "chunks.db" in cached
        assert any(chunks in path.parents for path in cached)  # busybox: large chunks
        for path in cached:
            path.unlink()
        service.start()
        _wait_ready(port, 120)
        [image] = _warm(port, "refresh", ref)["images"]  # forced: still complete
        assert image["state"] == "warm", image
        assert 0 < image["bytes_cached"] < image["bytes_total"], image
        assert _blob_requests(proxy, runnable["layers"]) > before
        assert sum(1 for p in chunks.rglob("*") if p.is_file()) > 0

        # 4. Chunk files removed behind the running service's back: a forced refresh
        # notices and warms the image again.
        before = _blob_requests(proxy, runnable["layers"])
        for path in chunks.rglob("*"):
            if path.is_file():
                path.unlink()
        [image] = _warm(port, "refresh", ref)["images"]
        assert image["state"] == "warm", (image, service.log[-3000:])
        assert _blob_requests(proxy, runnable["layers"]) > before
        assert sum(1 for p in chunks.rglob("*") if p.is_file()) > 0
    finally:
        stop_containerd(daemon)
