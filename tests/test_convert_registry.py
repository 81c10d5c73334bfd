"""`lazypull convert` end to end: real registry, skopeo, and plain containerd + runc."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from estargz import FileSource
from estargz.verify import verify_blob

from .fixtures.registry import PASSWORD, USER
from .images import (
    File,
    Symlink,
    build_layout_image,
    build_two_platform_image,
    push_layout_image,
    skopeo_inspect,
)

TOC = "containerd.io/snapshot/stargz/toc.digest"
BUSYBOX = Path("/bin/busybox")
LAYERS = [
    {"bin/busybox": File(BUSYBOX.read_bytes(), 0o755), "bin/sh": Symlink("busybox"),
     "bin/cat": Symlink("busybox"), "bin/ls": Symlink("busybox"),
     "etc/motd": b"base layer\n", "var/cache/big": os.urandom(200_000)},
    {"etc/hello": b"hello from layer 2\n", "usr/share/data.bin": os.urandom(3_000_000)},
    {"app/run.sh": File(b"#!/bin/sh\ncat /etc/hello\n", 0o755), "var/cache/big": None},
]


def raw_manifest(reference: str, *extra: str) -> dict:
    flags = ["--tls-verify=false"] if reference.startswith("docker://") else []
    done = subprocess.run(["skopeo", "inspect", "--raw", *flags, *extra, reference],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def lazypull(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory):
    return build_layout_image(tmp_path_factory.mktemp("img") / "layout", "v1", LAYERS,
                              labels={"org.example.team": "workspaces"}, cmd=["/app/run.sh"])


def test_convert_registry_to_registry_then_run_with_plain_containerd(
        image, registry, containerd, tmp_path) -> None:
    src = push_layout_image(image.layout, "v1", registry.host, "ws/app")
    dst = f"docker://{registry.host}/ws/app:v1-esgz"
    hot = tmp_path / "hot.txt"
    hot.write_text("# hot files\n/app/run.sh\n/etc/hello\nbin/*\n/not/there\n")
    done = lazypull("convert", src, dst, "--prefetch-list", str(hot), "--json",
                    "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["manifests"][0]["missing_hot_files"] == ["/not/there"]
    assert [layer["hot_files"] for layer in report["manifests"][0]["layers"]] == [4, 1, 1]

    inspected = skopeo_inspect(dst, "--tls-verify=false")
    assert inspected["Labels"] == {"org.example.team": "workspaces"}
    assert inspected["Digest"] == report["digest"]
    for layer in raw_manifest(dst)["layers"]:
        with FileSource.open(str(registry.blob_data_path(layer["digest"]))) as blob:
            verify_blob(blob, layer["annotations"][TOC])

    # Plain containerd pulls it with overlayfs (checking every diff_id) and runs it.
    ref = dst.removeprefix("docker://")
    containerd.ctr("images", "pull", "--plain-http", ref)
    run = containerd.ctr("run", "--rm", ref, "convert-e2e", "/app/run.sh")
    assert run.stdout == "hello from layer 2\n"
    listing = containerd.ctr("run", "--rm", ref, "convert-e2e-2", "/bin/ls", "/var/cache")
    assert listing.stdout.strip() == ""  # the whiteout in layer 3 still hides var/cache/big


def test_convert_registry_to_oci_layout_and_zstd(image, registry, tmp_path) -> None:
    src = push_layout_image(image.layout, "v1", registry.host, "ws/layout-src")
    out = tmp_path / "out"
    done = lazypull("convert", src, f"oci:{out}:lazy", "--format", "zstdchunked", "--no-cache",
                    "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert len(skopeo_inspect(f"oci:{out}:lazy")["Layers"]) == 3
    manifest = raw_manifest(f"oci:{out}:lazy")
    assert {layer["mediaType"] for layer in manifest["layers"]} == \
        {"application/vnd.oci.image.layer.v1.tar+zstd"}
    assert all("io.containers.zstd-chunked.manifest-checksum" in layer["annotations"]
               for layer in manifest["layers"])


def test_multi_platform_index_keeps_both_platforms(registry, tmp_path) -> None:
    index = build_two_platform_image(tmp_path / "multi", "m", LAYERS[:2])
    src = push_layout_image(index.layout, "m", registry.host, "ws/multi")
    dst = f"docker://{registry.host}/ws/multi:m-esgz"
    done = lazypull("convert", src, dst, "--json", "--no-cache")
    assert done.returncode == 0, done.stderr
    index = raw_manifest(dst)
    assert sorted(m["platform"]["architecture"] for m in index["manifests"]) == ["amd64", "arm64"]
    for entry in index["manifests"]:
        manifest = raw_manifest(f"docker://{registry.host}/ws/multi@{entry['digest']}")
        assert all(TOC in layer["annotations"] for layer in manifest["layers"])


def test_basic_auth_from_docker_config(image, basic_auth_registry, tmp_path) -> None:
    server = basic_auth_registry
    subprocess.run(["skopeo", "copy", "--insecure-policy", "--dest-tls-verify=false",
                    "--dest-creds", f"{USER}:{PASSWORD}", image.reference,
                    f"docker://{server.host}/ws/private:v1"], check=True, capture_output=True)
    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    import base64
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (config_dir / "config.json").write_text(json.dumps({"auths": {server.host: {"auth": auth}}}))
    src, dst = (f"docker://{server.host}/ws/private:v1",
                f"docker://{server.host}/ws/private:v1-esgz")
    ok = lazypull("convert", src, dst, "--no-cache", "--quiet",
                  env={"DOCKER_CONFIG": str(config_dir)})
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    wrong = base64.b64encode(f"{USER}:wrong".encode()).decode()
    (bad / "config.json").write_text(json.dumps({"auths": {server.host: {"auth": wrong}}}))
    refused = lazypull("convert", src, dst, "--no-cache", env={"DOCKER_CONFIG": str(bad)})
    assert refused.returncode == 3, refused.stderr
    assert "authentication failed" in refused.stderr and "wrong" not in refused.stderr
    assert "Traceback" not in refused.stderr


def test_exit_codes_for_missing_images_and_bad_usage(registry, tmp_path) -> None:
    missing = lazypull("convert", f"docker://{registry.host}/ws/none:v1",
                       f"docker://{registry.host}/ws/none:v2", "--no-cache")
    assert missing.returncode == 4, missing.stderr
    assert "ws/none" in missing.stderr
    usage = lazypull("convert", "ftp://x/y", f"oci:{tmp_path}/o:t")
    assert usage.returncode == 2 and "docker://" in usage.stderr
    assert lazypull("convert", "only-one-arg").returncode == 2


def test_failed_conversion_tags_nothing(image, registry, tmp_path) -> None:
    # A config whose diff_id lies about layer 1: the conversion must stop before any tag.
    src_layout = tmp_path / "liar"
    subprocess.run(["cp", "-a", str(image.layout), str(src_layout)], check=True)
    from .test_convert_layout import _rewrite
    _rewrite(src_layout, "v1",
             lambda m, c: c["rootfs"]["diff_ids"].__setitem__(1, "sha256:" + "1" * 64))
    src = push_layout_image(src_layout, "v1", registry.host, "ws/liar")
    dst = f"docker://{registry.host}/ws/liar:v1-esgz"
    done = lazypull("convert", src, dst, "--no-cache")
    assert done.returncode == 5, done.stderr
    assert "layer 1" in done.stderr and "config says sha256:1111" in done.stderr
    probe = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", dst],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "manifest unknown" in probe.stderr


def test_progress_bars_on_a_terminal(image, registry, tmp_path) -> None:
    import pty
    src = push_layout_image(image.layout, "v1", registry.host, "ws/tty")
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "convert", src,
         f"docker://{registry.host}/ws/tty:v1-esgz", "--no-cache"],
        stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    output = b""
    while True:
        try:
            piece = os.read(controller, 65536)
        except OSError:  # the terminal closes when the process exits
            break
        if not piece:
            break
        output += piece
    assert process.wait(timeout=120) == 0
    os.close(controller)
    text = output.decode(errors="replace")
    assert "download" in text and "convert" in text and "[" in text and "MB" in text
    assert "\x1b[" in text  # bars are redrawn in place
