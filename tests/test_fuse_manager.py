"""The FUSE manager process on its own: its socket protocol, bad requests, one
manager per root, and a clean stop. (Serving layers through it is covered end to
end in test_lazy_pull.py.)"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.fusemanager.protocol import PROTOCOL_VERSION, short_path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


class Manager:
    def __init__(self, root: Path, config: Path | None = None):
        self.root = root
        self.log = root.parent / f"{root.name}.log"
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "fuse-manager", "--root", str(root),
                 "--log-level", "debug", *(["--config", str(config)] if config else [])],
                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while self._pid_in_file() != self.process.pid:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no FUSE manager:\n{self.log.read_text()}")
            time.sleep(0.05)

    def _pid_in_file(self) -> int | None:
        try:
            return int((self.root / "fuse-manager.pid").read_text())
        except (OSError, ValueError):
            return None

    def connect(self) -> "Conversation":
        sock = socket.socket(socket.AF_UNIX)
        with short_path(str(self.root / "fuse-manager.sock")) as address:
            sock.connect(address)
        return Conversation(sock)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # by PID
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Conversation:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.settimeout(10)
        self.lines = sock.makefile("rb")
        self.ids = iter(range(1, 1 << 30))

    def send_raw(self, data: bytes) -> dict:
        self.sock.sendall(data)
        return json.loads(self.lines.readline())

    def call(self, op: str, **args) -> dict:
        return self.send_raw(json.dumps({"id": next(self.ids), "op": op,
                                         "args": args}).encode() + b"\n")


@pytest.fixture
def manager(tmp_path) -> Iterator[Manager]:
    started = Manager(tmp_path / "root")
    yield started
    started.stop()


def test_hello_names_the_mount_and_the_layers_served(manager) -> None:
    talk = manager.connect()
    answer = talk.call("hello", protocol=PROTOCOL_VERSION)
    assert answer["result"] == {"protocol": PROTOCOL_VERSION, "pid": manager.process.pid,
                                "mountpoint": str(manager.root / "fuse"), "layers": []}
    assert _mounted(manager.root / "fuse")
    assert talk.call("hello", protocol=PROTOCOL_VERSION + 1)["error"]["kind"] == "invalid"


def test_bad_requests_get_errors_and_the_manager_keeps_answering(manager, tmp_path) -> None:
    talk = manager.connect()
    cases = [
        (b"{not json\n", "invalid", "malformed"),
        (b"[1, 2]\n", "invalid", "not an object"),
        (b'{"id": 1, "op": "explode"}\n', "invalid", "unknown operation"),
        (b'{"id": 2, "op": "mount", "args": []}\n', "invalid", "args must be an object"),
        (b'{"id": 3, "op": "mount", "args": {"nme": "1"}}\n', "invalid", "mount"),
        (b'{"id": 4, "op": "mount", "args": {"name": "../x", "directory": "/"}}\n',
         "invalid", "bad layer name"),
    ]
    for line, kind, words in cases:
        error = talk.send_raw(line)["error"]
        assert error["kind"] == kind and words in error["message"], (line, error)
    for source in ({}, {"target": "t", "reference": "Not A Reference", "layer_digest": "d"}):
        error = talk.call("mount_remote", name="9", directory=str(tmp_path), source=source)
        assert error["error"]["kind"] == "invalid", error
        assert "bad layer source" in error["error"]["message"]
    missing = talk.call("mount", name="7", directory=str(tmp_path / "nothing"))
    assert missing["error"]["kind"] == "not_found"
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "layer.json").write_text('{"reference": 1}')
    (garbage / "toc").write_bytes(b"\x00" * 10)
    assert talk.call("mount", name="8", directory=str(garbage))["error"]["kind"] == "invalid"
    assert talk.call("fetch", digest="sha256:" + "0" * 64, full=False)["error"]["kind"] \
        == "not_found"
    bad_wait = talk.call("wait_prefetched", names=[], timeout=1.0, until="all-of-it")
    assert bad_wait["error"]["kind"] == "invalid" and "'all-of-it'" in \
        bad_wait["error"]["message"]
    # Nothing was mounted by any of that, and the manager still answers.
    assert talk.call("hello", protocol=PROTOCOL_VERSION)["result"]["layers"] == []
    assert "lazypull_lazy_layers_mounted 0.0" in talk.call("metrics")["result"]
    assert manager.process.poll() is None


def test_cache_protection_owners_are_released_by_prefix(manager) -> None:
    talk = manager.connect()
    for owner in ("warm:a@sha256:1", "warm:a@sha256:2", "warm:b@sha256:3", "other"):
        assert "error" not in talk.call("protect", owner=owner, digests=[], full=False)
    dropped = talk.call("release_others", prefix="warm:", keep=["warm:a@sha256:2"])
    assert sorted(dropped["result"]) == ["warm:a@sha256:1", "warm:b@sha256:3"]
    # Owners with nothing protected are gone once released; "other" is untouched.
    assert talk.call("release_others", prefix="", keep=["other"])["result"] == \
        ["warm:a@sha256:2"]


def test_one_manager_per_root_and_a_clean_stop(manager) -> None:
    second = subprocess.run([sys.executable, "-m", "cli.main", "fuse-manager", "--root",
                             str(manager.root)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 1 and "already serves" in second.stderr
    assert manager.connect().call("hello", protocol=PROTOCOL_VERSION)["result"]["pid"] == \
        manager.process.pid
    assert manager.stop() == 0
    assert not _mounted(manager.root / "fuse")
    assert not (manager.root / "fuse-manager.sock").exists()
    assert not (manager.root / "fuse-manager.pid").exists()


def test_a_root_too_long_for_a_socket_address_still_works(tmp_path) -> None:
    root = tmp_path / ("r" * 60) / ("o" * 60)
    assert len(str(root / "fuse-manager.sock")) > 108
    long = Manager(root)
    try:
        assert long.connect().call("hello", protocol=PROTOCOL_VERSION)["result"]["pid"] == \
            long.process.pid
    finally:
        assert long.stop() == 0


def test_a_killed_manager_leaves_a_mount_the_next_one_replaces(tmp_path) -> None:
    first = Manager(tmp_path / "root")
    first.process.kill()  # by PID
    first.process.wait()
    assert _mounted(first.root / "fuse")  # disconnected, as a crash leaves it
    second = Manager(tmp_path / "root")
    try:
        talk = second.connect()
        assert talk.call("hello", protocol=PROTOCOL_VERSION)["result"]["pid"] == \
            second.process.pid
        assert os.listdir(first.root / "fuse") == []  # a live, empty mount again
    finally:
        assert second.stop() == 0
        if _mounted(first.root / "fuse"):  # a failed start: leave no mount behind
            subprocess.run(["umount", "-l", str(first.root / "fuse")], check=False)
            pytest.fail("the FUSE mount outlived both managers")


def test_registry_reads_relayed_for_the_service_pulls(manager, registry, tmp_path) -> None:
    """Manifests and image configs of a pull handed to the service are read by the
    manager's registry client; failures keep their kind (the pull's exit code)."""
    import base64

    from oci.digest import sha256_of

    from .images import build_layout_image, push_layout_image

    image = build_layout_image(tmp_path / "layout", "v1", [{"etc/motd": b"relayed\n"}])
    ref = push_layout_image(tmp_path / "layout", "v1", registry.host,
                            "relay/app").removeprefix("docker://")
    settings = {"hosts_dir": None, "plain_http": True,
                "docker_config": str(tmp_path / "no-credentials.json")}
    talk = manager.connect()
    answer = talk.call("registry_manifest", registry=settings, reference=ref)["result"]
    manifest = base64.b64decode(answer["data"])
    assert answer["digest"] == sha256_of(manifest) == image.manifest_digest
    assert json.loads(manifest) == image.manifest
    config = image.manifest["config"]
    blob = talk.call("registry_blob", registry=settings, reference=ref, descriptor=config)
    assert sha256_of(base64.b64decode(blob["result"]["data"])) == config["digest"]

    missing = talk.call("registry_manifest", registry=settings, reference=ref[:-2] + "v9")
    assert missing["error"]["kind"] == "registry_not_found", missing
    wrong = talk.call("registry_blob", registry=settings, reference=ref,
                      descriptor={**config, "digest": "sha256:" + "1" * 64})
    assert wrong["error"]["kind"] == "registry_not_found", wrong
    layer = {**image.manifest["layers"][0], "size": 64 << 20}
    too_big = talk.call("registry_blob", registry=settings, reference=ref, descriptor=layer)
    assert too_big["error"]["kind"] == "invalid" and "relayed" in too_big["error"]["message"]
    bad = talk.call("registry_manifest", registry={"hosts_dir": None}, reference=ref)
    assert bad["error"]["kind"] == "invalid", bad
    assert talk.call("hello", protocol=PROTOCOL_VERSION)["result"]["layers"] == []


def _index_templates(pid: int) -> list[int]:
    """The index-build template processes among the children of `pid`."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"estargz.index_child" in command and b"--template" in command:
            found.append(int(child))
    return found


def test_the_manager_keeps_an_index_build_template_unless_told_not_to(tmp_path) -> None:
    manager = Manager(tmp_path / "root")
    try:
        deadline = time.monotonic() + 30
        while not _index_templates(manager.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (template,) = _index_templates(manager.process.pid)
    finally:
        assert manager.stop() == 0
    assert not os.path.exists(f"/proc/{template}")  # ended and reaped with the manager

    config = tmp_path / "config.toml"
    config.write_text("index_build_template = false\n")
    without = Manager(tmp_path / "other", config=config)
    try:
        assert without.connect().call("hello", protocol=PROTOCOL_VERSION)["result"]
        time.sleep(2.0)  # a template takes about 0.1 s to start
        assert _index_templates(without.process.pid) == []
    finally:
        assert without.stop() == 0
