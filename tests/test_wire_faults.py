"""Faults on the wire: lazy reads, lazy mounts and conversion against a real registry
behind a scripted fault-injecting proxy (tests/fixtures/fault_proxy.py).

One registry, proxy, snapshotter service and containerd serve the whole module; the
service reaches the registry only through the proxy. The lazy image has a layer of
its own for every read case, so that case's first reads really go to the registry
(background fetch is off and nothing of those layers is prefetched), and the case's
rule matches only range requests for that layer's blob. Per case: the rule is set
once the image is mounted, a container started through containerd hashes every file
of the case's layer and times each; every file must hash right or fail with an I/O
error, never give other bytes. Then the rule is cleared and a second container must
read every file right, from the same service.

Mount cases put faults on the range requests of a layer's TOC or prefetch; conversion
cases on `lazypull convert`'s reads from the source and pushes to the target.

Each test adds a row to a table (fault, outcome, longest file read), printed at the
end of the module and written to $LAZYPULL_WIRE_FAULTS_REPORT when that is set.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from estargz.toc import DEFAULT_MAX_TOC_SIZE
from oci.manifest import Descriptor
from oci.mediatypes import OCI_LAYER_GZIP as GZIP_LAYER
from snapshotter.lazy.remote import parts_of, tail_start

from .fixtures.containerd import Containerd, start_containerd, stop_containerd
from .fixtures.fault_proxy import WireFault, WireFaultProxy
from .fixtures.registry import RegistryServer
from .fixtures.snapshotter import SnapshotterProcess, free_tcp_port
from .images import File, Symlink, build_layout_image, push_layout_image
from .test_snapshotter_containerd import proxy_config

REPO_ROOT = Path(__file__).resolve().parents[1]
READ_TIMEOUT = 4.0  # the service's read_timeout_seconds in this module
CHUNK = 256 << 10
BUSYBOX = {"bin/busybox": File(Path("/bin/busybox").read_bytes(), 0o755),
           "bin/sh": Symlink("busybox")}
IO_ERROR = re.compile(r"I/O error|Input/output error")
TABLES: dict[str, list[str]] = {}


def case_files(directory: str) -> dict[str, bytes]:
    """Files bigger than a chunk and small ones (which a small-file window fetches
    together), random so that no chunk is shared with another case."""
    return {f"{directory}/big.bin": os.urandom(600 << 10),
            f"{directory}/mid.bin": os.urandom(300 << 10),
            f"{directory}/a.txt": os.urandom(100), f"{directory}/b.txt": os.urandom(5000)}


def lazypull(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=timeout)


def convert(source: str, destination: str, *extra: str) -> subprocess.CompletedProcess:
    return lazypull("convert", source, destination, "--no-cache", "--json",
                    "--chunk-size", str(CHUNK), *extra)


def blob_rule(digest: str, **fault: Any) -> WireFault:
    """A rule for the range requests of one blob."""
    return WireFault(path=re.escape(digest) + "$", ranged=True, **fault)


# -- the module's node ---------------------------------------------------------------------


@dataclass
class Node:
    registry: RegistryServer
    proxy: WireFaultProxy
    service: SnapshotterProcess
    daemon: Containerd
    containers: int = 0

    def pull(self, ref: str) -> subprocess.CompletedProcess:
        return lazypull("pull", f"{self.proxy.host}/{ref}", "--address", self.daemon.address,
                        "--json")

    def run(self, ref: str, script: str) -> subprocess.CompletedProcess:
        self.containers += 1
        # runc's state is shared by every containerd of the machine: names must be unique.
        name = f"wf-{os.getpid()}-{self.containers}"
        return self.daemon.ctr("run", "--rm", "--snapshotter", "lazypull",
                               f"{self.proxy.host}/{ref}", name, "/bin/sh",
                               "-c", script, check=False, timeout=600)

    def read_failures(self, digest: str) -> float:
        """lazypull_read_failures_total of one layer, every reason."""
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{self.service.metrics_port}/metrics", timeout=10).read().decode()
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith("lazypull_read_failures_total{")
                   and f'layer="{digest}"' in line)


@pytest.fixture(scope="module")
def node(registry, wire_fault_proxy, tmp_path_factory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("wf")
    config = base / "config.toml"
    config.write_text("background_fetch = false\nprefetch_timeout_seconds = 20.0\n"
                      f"read_timeout_seconds = {READ_TIMEOUT}\nprofile_window_seconds = 0.0\n"
                      f'hosts_dir = "{base / "hosts"}"\n')
    service = SnapshotterProcess(root=base / "root", address=str(base / "s.sock"),
                                 metrics_port=free_tcp_port(), log_path=base / "service.log",
                                 extra_args=("--config", str(config))).start()
    daemon = start_containerd(tmp_path_factory.mktemp("ctrd"), proxy_config(service.address))
    yield Node(registry, wire_fault_proxy, service, daemon)
    stop_containerd(daemon)
    service.stop()
    service.release_mounts()


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    text = "\n\n".join(f"{title}\n\n" + "\n".join(rows) for title, rows in TABLES.items())
    print("\n" + text)
    if os.environ.get("LAZYPULL_WIRE_FAULTS_REPORT"):
        Path(os.environ["LAZYPULL_WIRE_FAULTS_REPORT"]).write_text(text + "\n")


def shown(text: str, limit: int = 180) -> str:
    """A message for the table: digests shortened, one line, at most `limit` characters."""
    text = re.sub(r"sha256:([0-9a-f]{12})[0-9a-f]{52}", r"sha256:\1…", " ".join(text.split()))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def add_row(table: str, header: str, row: str) -> None:
    TABLES.setdefault(table, [header, re.sub(r"[^|]", "-", header)]).append(row)


@pytest.fixture(autouse=True)
def no_rules_left(wire_fault_proxy) -> Iterator[None]:
    yield
    wire_fault_proxy.clear()


# -- reads of a mounted lazy image ---------------------------------------------------------


@dataclass(frozen=True)
class ReadCase:
    name: str
    fault: dict[str, Any]
    # "right": every file reads right; "eio": every file fails with EIO; "some-eio": at
    # least one does (a flipped byte spoils one chunk of a request, not all of them)
    expect: str

    @property
    def label(self) -> str:
        times = self.fault.get("times")
        return f"{self.fault['fault']} {'always' if times is None else f'x{times}'}"


READ_CASES = [
    ReadCase("503-twice", {"fault": "status", "times": 2}, "right"),
    ReadCase("503-always", {"fault": "status"}, "eio"),
    ReadCase("429-once", {"fault": "rate_limit", "retry_after": 1, "times": 1}, "right"),
    ReadCase("reset-once", {"fault": "reset", "times": 1}, "right"),
    # Broken halfway, every time: a miss's own request is read as a stream, so the file
    # whose span came before the break is read right; the others fail.
    ReadCase("reset-always", {"fault": "reset"}, "some-eio"),
    ReadCase("truncate-always", {"fault": "truncate"}, "some-eio"),
    ReadCase("stall-always", {"fault": "stall", "stall_seconds": 0.5}, "right"),
    ReadCase("hang-always", {"fault": "hang"}, "eio"),
    ReadCase("flip-once", {"fault": "flip", "times": 1}, "right"),
    ReadCase("flip-always", {"fault": "flip"}, "some-eio"),
    ReadCase("whole-blob-always", {"fault": "whole_blob"}, "eio"),
    ReadCase("wrong-range-always", {"fault": "wrong_range"}, "eio"),
    ReadCase("redirect-once", {"fault": "redirect", "times": 1}, "right"),
    ReadCase("redirect-always", {"fault": "redirect"}, "eio"),
]


@dataclass
class LazyImage:
    ref: str
    layers: dict[str, str]  # case -> blob digest
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # case -> path -> sha256
    tail_requests: int = 1  # of its (one) layer's tail, footer and TOC (lazy.remote)


@pytest.fixture(scope="module")
def lazy_image(node, tmp_path_factory) -> LazyImage:
    """One layer with busybox (prefetched: containers must start) and one per read case."""
    files = {case.name: case_files(f"w/{case.name}") for case in READ_CASES}
    image = build_layout_image(tmp_path_factory.mktemp("img") / "l", "v1",
                               [BUSYBOX, *files.values()])
    plain = push_layout_image(image.layout, "v1", node.registry.host, "wf/lazy")
    hot = tmp_path_factory.mktemp("hot") / "hot.txt"
    hot.write_text("/bin/busybox\n")
    done = convert(plain, f"docker://{node.registry.host}/wf/lazy:esgz", "--prefetch-list",
                   str(hot))
    assert done.returncode == 0, done.stderr
    layers = json.loads(done.stdout)["manifests"][0]["layers"][1:]
    pulled = node.pull("wf/lazy:esgz")
    assert pulled.returncode == 0, pulled.stderr
    assert {layer["source"] for layer in json.loads(pulled.stdout)["layers"]} == {"remote"}
    digests = {case.name: layer["digest"]
               for case, layer in zip(READ_CASES, layers, strict=True)}
    return LazyImage("wf/lazy:esgz", digests,
                     {name: {"/" + path: hashlib.sha256(data).hexdigest()
                             for path, data in case.items()} for name, case in files.items()})


@dataclass(frozen=True)
class FileRead:
    path: str
    ok: bool
    sha256: str  # when ok
    error: str  # when not
    seconds: float


# Every file at once (one line each, written whole), timed from /proc/uptime.
HASH_EVERY_FILE = """\
for f in {directory}/*; do
  (a=$(/bin/busybox cut -d' ' -f1 /proc/uptime)
   out=$(/bin/busybox sha256sum "$f" 2>&1)
   rc=$?
   b=$(/bin/busybox cut -d' ' -f1 /proc/uptime)
   echo "$f $rc $a $b $out") &
done
wait
"""


def hash_every_file(node: Node, ref: str, directory: str) -> list[FileRead]:
    """Hash the files of `directory` side by side in a new container, timing each."""
    done = node.run(ref, HASH_EVERY_FILE.format(directory=directory))
    assert done.returncode == 0, done.stderr
    reads = []
    for line in done.stdout.splitlines():
        path, rc, started, ended, output = line.split(" ", 4)
        seconds = round(float(ended) - float(started), 2)
        ok = rc == "0"
        reads.append(FileRead(path, ok, output.split()[0] if ok else "", "" if ok else output,
                              seconds))
    return reads


def outcome(reads: list[FileRead], expected: dict[str, str]) -> str:
    right = sum(r.ok and r.sha256 == expected[r.path] for r in reads)
    eio = sum(not r.ok and IO_ERROR.search(r.error) is not None for r in reads)
    wrong = len(reads) - right - eio
    parts = [f"{n} {what}" for n, what in ((right, "right"), (eio, "EIO"), (wrong, "WRONG"))
             if n]
    return ", ".join(parts)


@pytest.mark.parametrize("case", READ_CASES, ids=lambda c: c.name)
def test_lazy_reads_are_right_or_eio(node, lazy_image, case) -> None:
    digest, expected = lazy_image.layers[case.name], lazy_image.files[case.name]
    rule = blob_rule(digest, **case.fault)
    failures_before = node.read_failures(digest)
    node.proxy.add(rule)
    faulted = hash_every_file(node, lazy_image.ref, f"/w/{case.name}")
    node.proxy.clear()
    cleared = hash_every_file(node, lazy_image.ref, f"/w/{case.name}")
    failed_reads = node.read_failures(digest) - failures_before
    first = outcome(faulted, expected)
    if case.expect == "right" and case.fault.get("times"):
        first = f"retried-ok ({first})"
    add_row("Lazy reads, faults after the mount is ready",
            "| fault | requests faulted | outcome (4 files) | longest file read | "
            "read failures counted | after the fault clears |",
            f"| {case.label} | {rule.hits} | {first} | "
            f"{max(r.seconds for r in faulted):.2f} s | {failed_reads:.0f} | "
            f"{outcome(cleared, expected)} |")
    assert rule.hits >= 1  # the fault really met the reads
    assert sorted(r.path for r in faulted) == sorted(expected)
    for read in faulted:  # right bytes or EIO, never other bytes
        assert (read.ok and read.sha256 == expected[read.path]) or \
            (not read.ok and IO_ERROR.search(read.error)), read
    failed = [read for read in faulted if not read.ok]
    if case.expect == "right":
        assert not failed, faulted
    else:
        assert failed == faulted if case.expect == "eio" else failed, faulted
        assert failed_reads >= len(failed)
        assert re.search(rf"layer {digest}: read of /?w/{case.name}/\S+ .*chunk sha256:",
                         node.service.log)
    # Bounded by the configured deadline, not by the registry: a check for hangs (before
    # the deadline existed a silent registry held a read for minutes), not a measure.
    assert max(read.seconds for read in faulted) < 3 * READ_TIMEOUT
    # Recovered without a restart: every file reads right once the fault is gone.
    assert all(read.ok and read.sha256 == expected[read.path] for read in cleared), cleared


# -- faults while a lazy layer is mounted: its TOC and its prefetch --------------------------


@dataclass(frozen=True)
class MountCase:
    name: str
    fault: dict[str, Any]
    expect: str  # "fallback": pulled the ordinary way; "lazy": mounted lazily


# The first range request of a layer fetches its tail: the footer and the TOC just
# before it (a byte 64 before the end is the TOC's); the prefetch requests come next.
MOUNT_CASES = [
    MountCase("toc-503-always", {"fault": "status"}, "fallback"),
    MountCase("toc-hang-always", {"fault": "hang"}, "fallback"),
    MountCase("toc-flip-always", {"fault": "flip", "flip_at_end": 64}, "fallback"),
    # skip "tail": the requests for the blob's tail (footer and TOC, asked for first, in
    # parts) go through; the prefetch's after them meet the fault.
    MountCase("prefetch-reset-once", {"fault": "reset", "skip": "tail", "times": 1}, "lazy"),
    MountCase("prefetch-503-always", {"fault": "status", "skip": "tail"}, "lazy"),
    # A region's bytes are handed out as they arrive: a response cut midway is resumed
    # where it stopped, and flipped bytes are caught by the chunks' digests.
    MountCase("prefetch-cut-once",
              {"fault": "cut", "cut_after": 100_000, "skip": "tail", "times": 1}, "lazy"),
    MountCase("prefetch-flip-once", {"fault": "flip", "skip": "tail", "times": 1}, "lazy"),
]


@pytest.fixture(scope="module")
def mount_images(node, tmp_path_factory) -> dict[str, LazyImage]:
    """A one-layer image per mount case, its busybox and big.bin in the prefetch region."""
    hot = tmp_path_factory.mktemp("hot") / "hot.txt"
    images = {}
    for case in MOUNT_CASES:
        files = case_files(f"m/{case.name}")
        hot.write_text(f"/bin/busybox\n/m/{case.name}/big.bin\n")
        image = build_layout_image(tmp_path_factory.mktemp("img") / "l", "v1",
                                   [{**BUSYBOX, **files}])
        plain = push_layout_image(image.layout, "v1", node.registry.host, f"wf/{case.name}")
        done = convert(plain, f"docker://{node.registry.host}/wf/{case.name}:esgz",
                       "--prefetch-list", str(hot))
        assert done.returncode == 0, done.stderr
        layer = json.loads(done.stdout)["manifests"][0]["layers"][0]
        tail = tail_start(Descriptor(GZIP_LAYER, layer["digest"], layer["size"]),
                          DEFAULT_MAX_TOC_SIZE)
        images[case.name] = LazyImage(f"wf/{case.name}:esgz", {case.name: layer["digest"]}, {
            case.name: {"/" + path: hashlib.sha256(data).hexdigest()
                        for path, data in files.items()}},
            tail_requests=len(parts_of(tail, layer["size"] - tail)))
    return images


@pytest.mark.parametrize("case", MOUNT_CASES, ids=lambda c: c.name)
def test_mount_time_faults_fall_back_or_fail_clearly(node, mount_images, case) -> None:
    image = mount_images[case.name]
    digest, expected = image.layers[case.name], image.files[case.name]
    fault = {**case.fault}
    if fault.get("skip") == "tail":
        fault["skip"] = image.tail_requests
    rule = blob_rule(digest, **fault)
    node.proxy.add(rule)
    pulled = node.pull(image.ref)
    assert pulled.returncode == 0, pulled.stderr
    source = json.loads(pulled.stdout)["layers"][0]["source"]
    seconds = json.loads(pulled.stdout)["seconds"]
    started = node.run(image.ref, HASH_EVERY_FILE.format(directory=f"/m/{case.name}"))
    node.proxy.clear()
    first = "container ran" if started.returncode == 0 else \
        "refused: " + shown(started.stderr.strip().splitlines()[-1])
    cleared = hash_every_file(node, image.ref, f"/m/{case.name}")
    add_row("Lazy mounts, faults on the TOC or the prefetch",
            "| case | requests faulted | layer pulled as | pull took | first container | "
            "after the fault clears |",
            f"| {case.name} | {rule.hits} | {source} | {seconds:.1f} s | {first} | "
            f"{outcome(cleared, expected)} |")
    assert rule.hits >= 1
    assert source == ("fetched+applied" if case.expect == "fallback" else "remote")
    if case.fault.get("times") or case.expect == "fallback":
        assert started.returncode == 0, started.stderr
    else:  # a prefetch that cannot be done refuses the container, and says why
        assert started.returncode != 0 and "prefetch" in started.stderr
    assert all(read.ok and read.sha256 == expected[read.path] for read in cleared), cleared


# -- conversion -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertCase:
    name: str
    where: str  # a key of WHERE
    fault: dict[str, Any]
    expect: str  # "ok", or what the one-line error of a failure says (a pattern)


WHERE = {  # method, path (TARGET: the case's own repository), ranged
    "source blob": ("GET", r"/v2/wf/src/blobs/sha256:", None),
    "source blob, first try": ("GET", r"/v2/wf/src/blobs/sha256:", False),
    "source blob, resumed": ("GET", r"/v2/wf/src/blobs/sha256:", True),
    "target upload": ("PUT", r"/v2/TARGET/blobs/uploads/", None),
    "target upload session": ("POST", r"/v2/TARGET/blobs/uploads/", None),
    "target manifest": ("PUT", r"/v2/TARGET/manifests/", None),
}

CONVERT_CASES = [
    ConvertCase("src-503-twice", "source blob", {"fault": "status", "times": 2}, "ok"),
    ConvertCase("src-503-always", "source blob", {"fault": "status"}, "answered HTTP 503"),
    ConvertCase("src-429-once", "source blob", {"fault": "rate_limit", "times": 1}, "ok"),
    ConvertCase("src-reset-once", "source blob", {"fault": "reset", "times": 1}, "ok"),
    ConvertCase("src-reset-always", "source blob", {"fault": "reset"},
                "truncated: got .* also after resuming"),
    ConvertCase("src-truncate-once", "source blob", {"fault": "truncate", "times": 1}, "ok"),
    ConvertCase("src-stall-always", "source blob", {"fault": "stall"}, "ok"),
    ConvertCase("src-hang-always", "source blob", {"fault": "hang"}, "sent nothing for 1s"),
    ConvertCase("src-flip-once", "source blob", {"fault": "flip", "times": 1}, "ok"),
    ConvertCase("src-flip-always", "source blob", {"fault": "flip"}, "content is sha256:"),
    ConvertCase("src-redirect-once", "source blob", {"fault": "redirect", "times": 1}, "ok"),
    ConvertCase("src-redirect-always", "source blob", {"fault": "redirect"},
                r"\(redirected from .*\) answered HTTP 502"),
    ConvertCase("src-resume-whole-blob", "source blob, resumed", {"fault": "whole_blob"},
                "resuming failed: .* answered HTTP 200"),
    ConvertCase("src-resume-wrong-range", "source blob, resumed", {"fault": "wrong_range"},
                "resuming failed: asked for bytes"),
    ConvertCase("dst-upload-503-once", "target upload", {"fault": "status", "times": 1}, "ok"),
    ConvertCase("dst-upload-reset-once", "target upload", {"fault": "reset", "times": 1}, "ok"),
    ConvertCase("dst-upload-truncate-always", "target upload", {"fault": "truncate"},
                "DIGEST_INVALID"),
    ConvertCase("dst-upload-flip-always", "target upload", {"fault": "flip"},
                "DIGEST_INVALID"),
    ConvertCase("dst-session-hang-always", "target upload session", {"fault": "hang"},
                "sent nothing for 1s"),
    ConvertCase("dst-session-redirect-always", "target upload session",
                {"fault": "redirect"}, "answered HTTP 307"),
    ConvertCase("dst-manifest-429-once", "target manifest",
                {"fault": "rate_limit", "times": 1}, "ok"),
    ConvertCase("dst-manifest-503-always", "target manifest", {"fault": "status"},
                "manifest .* answered HTTP 503"),
]


@dataclass
class ConvertSource:
    ref: str  # through the proxy
    digest: str  # of the image a conversion without faults makes


@pytest.fixture(scope="module")
def convert_source(node, tmp_path_factory) -> ConvertSource:
    layers = [{**BUSYBOX, "etc/motd": b"hello\n"}, case_files("data")]
    image = build_layout_image(tmp_path_factory.mktemp("img") / "l", "v1", layers)
    push_layout_image(image.layout, "v1", node.registry.host, "wf/src")
    source = f"docker://{node.proxy.host}/wf/src:v1"
    done = convert(source, f"docker://{node.proxy.host}/wf/clean:v1")
    assert done.returncode == 0, done.stderr
    return ConvertSource(source, json.loads(done.stdout)["digest"])


def registry_get(registry: RegistryServer, path: str) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{registry.url}{path}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.docker.distribution.manifest.v2+json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("case", CONVERT_CASES, ids=lambda c: c.name)
def test_conversion_fails_clearly_or_succeeds_and_leaves_no_partial_image(
        node, convert_source, case) -> None:
    repository = f"wf/c-{case.name}"
    method, path, ranged = WHERE[case.where]
    rules = [WireFault(method=method, path=path.replace("TARGET", repository), ranged=ranged,
                       **case.fault)]
    if case.where == "source blob, resumed":  # a first download that breaks, to resume
        rules.insert(0, WireFault("reset", path=path, ranged=False, times=1))
    node.proxy.add(*rules)
    done = convert(convert_source.ref, f"docker://{node.proxy.host}/{repository}:v1",
                   "--timeout", "1")
    node.proxy.clear()
    status, _ = registry_get(node.registry, f"/v2/{repository}/manifests/v1")
    tags_status, tags = registry_get(node.registry, f"/v2/{repository}/tags/list")
    error = done.stderr.strip()
    said = "converted" if done.returncode == 0 else f"exit {done.returncode}: {shown(error)}"
    add_row("Conversion (`lazypull convert`), faults on the source's reads or the target's pushes",
            "| case | where | requests faulted | outcome | target tag after |",
            f"| {case.name} | {case.where} | {rules[-1].hits} | {said} | "
            f"{'present' if status == 200 else 'absent'} |")
    assert rules[-1].hits >= 1
    if case.expect == "ok":
        assert done.returncode == 0, error
        assert json.loads(done.stdout)["digest"] == convert_source.digest
        assert status == 200
    else:
        assert done.returncode != 0
        assert len(error.splitlines()) == 1 and error.startswith("lazypull convert: "), error
        assert re.search(case.expect, error), error
        assert status == 404  # no manifest, so no tag: nothing half-made to pull
        assert tags_status == 404 or not json.loads(tags).get("tags"), tags
