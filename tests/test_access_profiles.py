"""Access profiles recorded by the node service, exported, and fed back to the converter.

Unit tests drive the recorder with a fake clock; one test drives the filesystem's
open/read handlers without a mount; the end-to-end test runs a converted image
(without a prefetch list) through containerd, exports what the service recorded
and converts the image again with that profile: node -> build.
"""

import asyncio
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import pytest

from converter.access_profile import AccessProfile as ConverterAccessProfile
from converter.access_profile import parse_profile as converter_parse_profile
from estargz import BlobReader, BuildOptions, FileSource, Node, build
from oci.access_profile import AccessProfile, FileAccess, ImageProfile, parse_profile
from snapshotter.lazy.profiles import (
    ProfileRecorder,
    add_range,
    find_profile,
    list_profiles,
    profile_path,
)

from .fixtures.containerd import start_containerd, stop_containerd
from .images import File, Symlink, build_layout_image, push_layout_image
from .test_snapshotter_containerd import proxy_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO_ROOT / "converter" / "access_profile.schema.json").read_text())
REF = "registry.example/ws/app:v1"
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reg(path: str, size: int = 10) -> Node:
    return Node(path=path, kind="reg", size=size)


def recorder(tmp_path: Path, clock: Clock, **options: object) -> ProfileRecorder:
    return ProfileRecorder(str(tmp_path / "profiles"), clock=clock,
                           wall_clock=lambda: 1_800_000_000.0, **options)


def written(tmp_path: Path, reference: str = REF) -> dict:
    doc = json.loads(Path(profile_path(str(tmp_path / "profiles"), reference)).read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["schemaVersion"] == 1 and len(doc["images"]) == 1
    return doc["images"][0]


# -- the recorder -------------------------------------------------------------


def test_files_in_first_access_order_each_once(tmp_path) -> None:
    clock = Clock()
    rec = recorder(tmp_path, clock)
    lower = rec.attach("1", REF, D1, "sha256:" + "a" * 64)
    upper = rec.attach("2", REF, D2)
    c, b, a = reg("etc/c"), reg("usr/lib/b"), reg("opt/a")
    clock.now += 100  # the window starts at the first access, not at the mount
    lower(c, 0, 0)  # open
    lower(c, 0, 10)
    clock.now += 0.5
    upper(b, 0, 0)
    upper(b, 0, 10)
    lower(c, 0, 0)  # opened again: still once, at its first time
    clock.now += 0.25
    lower(a, 0, 10)  # a read without an open we saw counts too
    rec.flush_now()
    image = written(tmp_path)
    assert image["reference"] == REF
    assert image["manifestDigest"] == "sha256:" + "a" * 64
    assert image["recordedAt"] == "2027-01-15T08:00:00Z"
    assert [(f["path"], f["layer"], f["at"]) for f in image["files"]] == [
        ("/etc/c", D1, 0.0), ("/usr/lib/b", D2, 0.5), ("/opt/a", D1, 0.75)]
    assert all("ranges" not in f for f in image["files"])  # small files: no ranges
    # What the service writes, the converter reads (through its own module's names).
    parsed = converter_parse_profile(Path(profile_path(str(tmp_path / "profiles"),
                                                       REF)).read_bytes())
    assert isinstance(parsed, ConverterAccessProfile)
    assert [f.path for f in parsed.images[0].files] == ["/etc/c", "/usr/lib/b", "/opt/a"]


def test_the_window_closes_and_later_reads_are_not_recorded(tmp_path) -> None:
    clock = Clock()
    rec = recorder(tmp_path, clock, window_seconds=10.0)
    observe = rec.attach("1", REF, D1)
    observe(reg("a"), 0, 1)
    clock.now += 9.9
    observe(reg("b"), 0, 1)
    clock.now += 0.2
    observe(reg("c"), 0, 1)  # past the window: closes it, not recorded
    observe(reg("d"), 0, 1)
    rec.flush_now()
    image = written(tmp_path)
    assert [f["path"] for f in image["files"]] == ["/a", "/b"]
    assert image["windowSeconds"] == 10.0
    # Written once: nothing new to write afterwards.
    path = Path(profile_path(str(tmp_path / "profiles"), REF))
    path.unlink()
    rec.flush_now()
    assert not path.exists()


def test_expire_closes_an_idle_window_and_a_new_pull_records_again(tmp_path) -> None:
    clock = Clock()
    rec = recorder(tmp_path, clock, window_seconds=5.0)
    first = rec.attach("1", REF, D1)
    first(reg("a"), 0, 1)
    clock.now += 2
    rec.flush_now()  # periodic write while the window is open
    assert written(tmp_path)["windowSeconds"] == 2.0
    clock.now += 4
    rec.expire()
    rec.flush_now()
    assert written(tmp_path)["windowSeconds"] == 5.0
    first(reg("b"), 0, 1)  # after the window: ignored
    # A layer of the same image served again after a restart: a profile exists, keep it.
    rec.attach("2", REF, D2, fresh=False)(reg("c"), 0, 1)
    rec.flush_now()
    assert [f["path"] for f in written(tmp_path)["files"]] == ["/a"]
    # A fresh mount (the image pulled again) records anew.
    rec.attach("3", REF, D2)(reg("d"), 0, 1)
    first(reg("e"), 0, 1)  # the old layer belongs to the image: it is recorded too
    rec.flush_now()
    assert [f["path"] for f in written(tmp_path)["files"]] == ["/d", "/e"]


def test_restored_layers_record_when_the_image_has_no_profile(tmp_path) -> None:
    clock = Clock()
    rec = recorder(tmp_path, clock)
    rec.attach("1", REF, D1, fresh=False)(reg("a"), 0, 1)
    rec.flush_now()
    assert [f["path"] for f in written(tmp_path)["files"]] == ["/a"]


def test_unmounting_the_last_layer_ends_the_recording(tmp_path) -> None:
    clock = Clock()
    rec = recorder(tmp_path, clock, window_seconds=60.0)
    one = rec.attach("1", REF, D1)
    rec.attach("2", REF, D2)
    one(reg("a"), 0, 1)
    clock.now += 3
    rec.detach("1")
    one(reg("b"), 0, 1)  # the image still has layer 2: still recording
    rec.detach("2")
    clock.now += 3
    one(reg("c"), 0, 1)
    rec.flush_now()
    image = written(tmp_path)
    assert [f["path"] for f in image["files"]] == ["/a", "/b"]
    assert image["windowSeconds"] == 3.0
    # Armed but never used: nothing is written.
    rec.attach("3", "registry.example/other:v1", D1)
    rec.detach("3")
    rec.flush_now()
    assert not Path(profile_path(str(tmp_path / "profiles"), "registry.example/other:v1")).exists()


def test_images_are_recorded_apart(tmp_path) -> None:
    clock = Clock()
    rec = recorder(tmp_path, clock)
    other = "registry.example/ws/other:v2"
    rec.attach("1", REF, D1)(reg("a"), 0, 1)
    rec.attach("2", other, D2)(reg("b"), 0, 1)
    rec.flush_now()
    assert [f["path"] for f in written(tmp_path)["files"]] == ["/a"]
    assert [f["path"] for f in written(tmp_path, other)["files"]] == ["/b"]


def test_bookkeeping_and_shadowed_copies_never_appear(tmp_path) -> None:
    clock = Clock()
    rec = recorder(tmp_path, clock)
    upper = rec.attach("2", REF, D2)
    lower = rec.attach("1", REF, D1)
    for path in (".no.prefetch.landmark", ".prefetch.landmark", "etc/.wh.passwd",
                 ".wh..wh..opq", "opt/.wh..wh..opq"):
        upper(reg(path), 0, 1)
    upper(reg("etc/hosts"), 0, 1)
    lower(reg("etc/hosts"), 0, 1)  # the same path from another layer: the first one counts
    rec.flush_now()
    assert [(f["path"], f["layer"]) for f in written(tmp_path)["files"]] == [("/etc/hosts", D2)]


def test_the_number_of_files_is_bounded(tmp_path) -> None:
    clock = Clock()
    rec = recorder(tmp_path, clock, max_files=3)
    observe = rec.attach("1", REF, D1)
    nodes = [reg(f"f{i}") for i in range(5)]
    for node in nodes:
        observe(node, 0, 1)
    observe(nodes[0], 0, 1)
    rec.flush_now()
    assert [f["path"] for f in written(tmp_path)["files"]] == ["/f0", "/f1", "/f2"]


def test_ranges_of_large_files_are_merged_and_bounded(tmp_path) -> None:
    clock = Clock()
    rec = recorder(tmp_path, clock, large_file_bytes=MIB, max_ranges=3)
    observe = rec.attach("1", REF, D1)
    big, small = reg("big", 8 * MIB), reg("small", MIB)
    observe(big, 0, 0)  # open: no range
    for offset, length in [(4 * MIB, 4096), (0, 65536), (65536, 65536),  # adjacent: merged
                           (4 * MIB - 4096, 8192), (30000, 100)]:  # overlapping, inside
        observe(big, offset, length)
    observe(small, 0, MIB)  # exactly the threshold: small
    rec.flush_now()
    files = {f["path"]: f for f in written(tmp_path)["files"]}
    assert files["/big"]["ranges"] == [[0, 131072], [4 * MIB - 4096, 8192]]
    assert "ranges" not in files["/small"]
    # Past max_ranges, the closest neighbours merge.
    observe(big, 6 * MIB, 4096)
    observe(big, 6 * MIB + 8192, 4096)  # gap of 4096 to the previous: the smallest
    rec.flush_now()
    assert [list(r) for r in written(tmp_path)["files"][0]["ranges"]] == [
        [0, 131072], [4 * MIB - 4096, 8192], [6 * MIB, 12288]]


@pytest.mark.parametrize(("adds", "want"), [
    ([(10, 20), (0, 5)], [(0, 5), (10, 20)]),
    ([(10, 20), (5, 10)], [(5, 20)]),
    ([(10, 20), (20, 30)], [(10, 30)]),
    ([(0, 5), (10, 15), (20, 25), (3, 22)], [(0, 25)]),
    ([(0, 5), (10, 15), (12, 13)], [(0, 5), (10, 15)]),
    ([(5, 5), (7, 6)], []),
])
def test_add_range(adds, want) -> None:
    ranges: list[tuple[int, int]] = []
    for start, end in adds:
        add_range(ranges, start, end, 100)
    assert ranges == want


def test_a_failed_write_is_tried_again(tmp_path) -> None:
    clock = Clock()
    rec = recorder(tmp_path, clock, window_seconds=5.0)
    (tmp_path / "profiles").write_text("in the way")  # the directory cannot be made
    rec.attach("1", REF, D1)(reg("a"), 0, 1)
    clock.now += 6
    rec.expire()
    rec.flush_now()
    (tmp_path / "profiles").unlink()
    rec.flush_now()
    assert [f["path"] for f in written(tmp_path)["files"]] == ["/a"]


def test_window_timer_writes_the_profile_in_a_loop(tmp_path) -> None:
    async def go() -> None:
        rec = ProfileRecorder(str(tmp_path / "profiles"), window_seconds=0.3,
                              flush_seconds=30.0)
        await rec.start()
        observe = rec.attach("1", REF, D1)
        observe(reg("a"), 0, 1)
        path = Path(profile_path(str(tmp_path / "profiles"), REF))
        for _ in range(100):
            if path.exists():
                break
            await asyncio.sleep(0.05)
        observe(reg("b"), 0, 1)  # the window has closed
        await rec.close()

    asyncio.run(go())
    image = written(tmp_path)
    assert [f["path"] for f in image["files"]] == ["/a"]
    assert image["windowSeconds"] == 0.3


def test_close_writes_the_open_window(tmp_path) -> None:
    async def go() -> None:
        rec = ProfileRecorder(str(tmp_path / "profiles"), window_seconds=60.0)
        await rec.start()
        rec.attach("1", REF, D1)(reg("a"), 0, 1)
        await rec.close()

    asyncio.run(go())
    assert [f["path"] for f in written(tmp_path)["files"]] == ["/a"]
    assert not [p for p in (tmp_path / "profiles").iterdir() if p.name.startswith(".")]


# -- the filesystem hook -------------------------------------------------------


def test_filesystem_tells_the_observer_of_opens_and_reads(tmp_path) -> None:
    import pyfuse3

    from snapshotter.lazy.filesystem import LazyFilesystem

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/a", b"alpha"), ("etc/.wh.gone", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob_path = tmp_path / "blob"
    with open(blob_path, "wb") as out:
        result = build(io.BytesIO(buf.getvalue()), out, BuildOptions())
    seen: list[tuple[str, int, int]] = []

    async def go() -> None:
        with FileSource.open(str(blob_path)) as source:
            reader = BlobReader.open(source, result.toc_digest)

            async def read(node: Node, offset: int, length: int) -> bytes:
                return reader.read_file(node, offset, length)

            fs = LazyFilesystem(str(tmp_path / "mnt"))
            fs.add_layer("l1", reader.layer, read)
            fs.observe_layer("l1", lambda node, off, length: seen.append((node.path, off,
                                                                           length)))
            root = await fs.lookup(1, b"l1", None)
            etc = await fs.lookup(root.st_ino, b"etc", None)
            a = await fs.lookup(etc.st_ino, b"a", None)
            gone = await fs.lookup(etc.st_ino, b"gone", None)  # a whiteout, shown as 0/0
            info = await fs.open(a.st_ino, os.O_RDONLY, None)
            assert await fs.read(info.fh, 1, 100) == b"lpha"
            assert await fs.read(info.fh, 5, 10) == b""  # at EOF: nothing fetched or told
            with pytest.raises(pyfuse3.FUSEError):  # a whiteout cannot be opened
                await fs.open(gone.st_ino, os.O_RDONLY, None)
            fs.observe_layer("l1", lambda *a: 1 / 0)  # a failing observer is dropped
            assert await fs.read(info.fh, 0, 5) == b"alpha"
            fs.observe_layer("l1", None)
            assert await fs.read(info.fh, 0, 5) == b"alpha"

    asyncio.run(go())
    assert seen == [("etc/a", 0, 0), ("etc/a", 1, 4)]


# -- the shared model and the CLI ------------------------------------------------


def test_converter_keeps_its_names() -> None:
    import converter.access_profile as converter_model
    import oci.access_profile as shared

    for name in ("AccessProfile", "ImageProfile", "FileAccess", "ProfileError",
                 "parse_profile", "SCHEMA_VERSION"):
        assert getattr(converter_model, name) is getattr(shared, name)
    profile = AccessProfile([ImageProfile([FileAccess("/a", D1, ((0, 4),), at=0.5)],
                                          reference=REF)])
    doc = json.loads(profile.to_json_bytes())
    jsonschema.validate(doc, SCHEMA)
    assert parse_profile(profile.to_json_bytes()).images[0].files[0].at == 0.5


def test_config_options(tmp_path) -> None:
    from snapshotter.config import Config, ConfigError, load_config

    assert (Config().profile_window_seconds, Config().profile_max_files) == (60.0, 10_000)
    path = tmp_path / "config.toml"
    path.write_text("profile_window_seconds = 5\nprofile_max_files = 100\n")
    config = load_config(str(path))
    assert (config.profile_window_seconds, config.profile_max_files) == (5.0, 100)
    assert config.profiles_dir == "/var/lib/lazypull/profiles"
    assert Config().with_overrides(profile_window_seconds=0.0).validate()  # 0: off
    for bad in ("profile_window_seconds = -1\n", "profile_max_files = 0\n"):
        path.write_text(bad)
        with pytest.raises(ConfigError):
            load_config(str(path))


def lazypull(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=300)


def test_export_and_list(tmp_path) -> None:
    clock = Clock()
    rec = ProfileRecorder(str(tmp_path / "profiles"), clock=clock)
    hub = "docker.io/library/alpine:latest"  # as Reference normalizes "alpine"
    rec.attach("1", hub, D1)(reg("bin/sh"), 0, 1)
    rec.attach("2", REF, D2)(reg("etc/os-release"), 0, 1)
    rec.flush_now()
    for name in ("alpine", hub):
        done = lazypull("profile", "export", name, "--root", str(tmp_path))
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        jsonschema.validate(doc, SCHEMA)
        assert doc["images"][0]["reference"] == hub
        assert doc["images"][0]["files"][0]["path"] == "/bin/sh"
    out = tmp_path / "out.json"
    done = lazypull("profile", "export", REF, "--root", str(tmp_path), "-o", str(out))
    assert done.returncode == 0 and done.stdout == ""
    assert parse_profile(out.read_bytes()).images[0].files[0].path == "/etc/os-release"
    # A recorded reference that no longer maps to its file name is still found.
    path = Path(profile_path(str(tmp_path / "profiles"), REF))
    path.rename(path.with_name("renamed.json"))
    assert find_profile(str(tmp_path / "profiles"), REF) is not None
    missing = lazypull("profile", "export", "registry.example/none:v1", "--root", str(tmp_path))
    assert missing.returncode == 1 and missing.stdout == ""
    assert "no access profile recorded for registry.example/none:v1" in missing.stderr
    listing = lazypull("profile", "list", "--root", str(tmp_path))
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["IMAGE", "FILES", "RECORDED", "WINDOW"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted([hub, REF])
    assert len(list_profiles(str(tmp_path / "profiles"))) == 2
    empty = lazypull("profile", "list", "--root", str(tmp_path / "nothing"))
    assert empty.returncode == 0 and "no access profiles" in empty.stderr


# -- end to end: node -> build ----------------------------------------------------

BIG = 4 * MIB
OFFSET = 2 * MIB
LAYERS = [
    {"bin/busybox": File(Path("/bin/busybox").read_bytes(), 0o755), "bin/sh": Symlink("busybox"),
     "etc/motd": b"base\n"},
    {"data/big.bin": os.urandom(BIG), "etc/c": b"c" * 300, "etc/d": b"d" * 10,
     "opt/a": b"a" * 100},
    {"usr/lib/aa": b"not read\n", "usr/lib/b": b"b" * 200},
]
WORKLOAD = ("cat /etc/c /usr/lib/b /opt/a > /dev/null && "
            f"dd if=/data/big.bin bs=4096 skip={OFFSET // 4096} count=1 2>/dev/null | wc -c")
READ_ORDER = ["/etc/c", "/usr/lib/b", "/opt/a", "/data/big.bin"]


def layer_of(path: str) -> int:
    """The layer a container reads `path` from: the top-most one that has it."""
    return max(i for i, layer in enumerate(LAYERS) if layer.get(path.lstrip("/")) is not None)


def prefetched_files(registry, layer: dict) -> list[str]:
    """Regular files before the prefetch landmark of a converted layer, in blob order."""
    with FileSource.open(str(registry.blob_data_path(layer["digest"]))) as source:
        reader = BlobReader.open(source, layer["toc_digest"])
        tree, entries = reader.layer, list(reader.toc_entries())
    files = []
    for entry in entries:
        if entry.name in (".prefetch.landmark", ".no.prefetch.landmark"):
            assert entry.name == ".prefetch.landmark" or not files
            return files
        if entry.type == "reg":
            assert entry.offset < tree.prefetch_end
            files.append("/" + entry.name)
    raise AssertionError("no landmark")


@pytest.fixture
def node(snapshotter_factory, registry, tmp_path_factory):
    config = tmp_path_factory.mktemp("cfg") / "config.toml"
    config.write_text("background_fetch = false\nprefetch_timeout_seconds = 30.0\n"
                      "profile_window_seconds = 120.0\n"
                      f'hosts_dir = "{tmp_path_factory.mktemp("hosts")}"\n')
    service = snapshotter_factory(None, False, None, "--config", str(config))
    daemon = start_containerd(tmp_path_factory.mktemp("ctrd"), proxy_config(service.address))
    yield {"service": service, "daemon": daemon}
    stop_containerd(daemon)


def test_recorded_profile_orders_the_next_conversion(node, registry, tmp_path) -> None:
    service, daemon = node["service"], node["daemon"]
    image = build_layout_image(tmp_path / "layout", "v1", LAYERS, cmd=["/bin/sh"])
    plain = push_layout_image(image.layout, "v1", registry.host, "ws/profiled")
    # Converted without a prefetch list: every layer in tar order, after the
    # .no.prefetch.landmark.
    lazy = f"{registry.host}/ws/profiled:v1-esgz"
    done = lazypull("convert", plain, f"docker://{lazy}", "--no-cache", "--json")
    assert done.returncode == 0, done.stderr
    first = json.loads(done.stdout)["manifests"][0]
    assert not any(layer["prefetch_size"] for layer in first["layers"])

    pulled = lazypull("pull", lazy, "--address", daemon.address, "--json")
    assert pulled.returncode == 0, pulled.stderr
    assert [layer["source"] for layer in json.loads(pulled.stdout)["layers"]] == ["remote"] * 3
    run = daemon.ctr("run", "--rm", "--snapshotter", "lazypull", lazy, "prof1", "/bin/sh", "-c",
                     WORKLOAD)
    assert run.stdout == "4096\n"
    assert service.stop() == 0  # SIGTERM: the service writes what it recorded

    exported = tmp_path / "exported.json"
    done = lazypull("profile", "export", lazy, "--root", str(service.root), "-o", str(exported))
    assert done.returncode == 0, done.stderr
    doc = json.loads(exported.read_text())
    jsonschema.validate(doc, SCHEMA)
    [recorded] = doc["images"]
    assert recorded["reference"] == lazy
    assert recorded["manifestDigest"] == first["digest"]
    assert 0 < recorded["windowSeconds"] <= 120
    paths = [f["path"] for f in recorded["files"]]
    assert len(paths) == len(set(paths))
    assert [p for p in paths if p in READ_ORDER] == READ_ORDER  # in the order read
    assert "/usr/lib/aa" not in paths and "/etc/d" not in paths  # never read
    assert not [p for p in paths if ".wh." in p or "landmark" in p]
    digests = [layer["digest"] for layer in first["layers"]]
    for entry in recorded["files"]:
        assert entry["layer"] == digests[layer_of(entry["path"])], entry
    big = next(f for f in recorded["files"] if f["path"] == "/data/big.bin")
    assert any(start <= OFFSET and start + length >= OFFSET + 4096
               for start, length in big["ranges"]), big
    assert sum(length for _, length in big["ranges"]) < BIG  # only what was read
    listing = lazypull("profile", "list", "--root", str(service.root))
    assert lazy in listing.stdout

    # Build: convert the original image with the exported profile.
    hot = f"{registry.host}/ws/profiled:v1-hot"
    done = lazypull("convert", plain, f"docker://{hot}", "--no-cache", "--json",
                    "--prefetch-profile", str(exported))
    assert done.returncode == 0, done.stderr
    second = json.loads(done.stdout)["manifests"][0]
    assert second["missing_hot_files"] == []
    for index, layer in enumerate(second["layers"]):
        want = [p for p in paths if layer_of(p) == index]
        assert prefetched_files(registry, layer) == want, index
        assert layer["hot_files"] == len(want)
    assert prefetched_files(registry, second["layers"][1])[:3] == ["/etc/c", "/opt/a",
                                                                   "/data/big.bin"]
    assert prefetched_files(registry, second["layers"][2]) == ["/usr/lib/b"]
