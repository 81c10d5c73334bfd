"""The main job end to end on this machine: a workspace image starts from lazily
mounted layers while most of it is still in the registry.

Everything runs locally and is stopped afterwards: a docker-registry on loopback,
lazypull's snapshotter service, and a private containerd 1.6 that loads it as a
proxy plugin. The image (busybox and this interpreter's standard library) is
pushed as built, converted with `lazypull convert`, then started twice: pulled in
full with containerd's overlayfs, and pulled lazily with `lazypull pull`.
"""

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.fixtures.containerd import start_containerd, stop_containerd
from tests.fixtures.registry import start_registry
from tests.fixtures.snapshotter import SnapshotterProcess, free_tcp_port
from tests.images import File, Symlink, build_layout_image, push_layout_image

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# What the workspace reads to become ready: a few modules, as an interpreter would.
HOT = ["/bin/busybox", "/app/start.sh", "/usr/lib/python/json/__init__.py",
       "/usr/lib/python/json/decoder.py", "/usr/lib/python/logging/__init__.py",
       "/usr/lib/python/encodings/__init__.py", "/usr/lib/python/encodings/utf_8.py"]


def _stdlib_layer() -> dict[str, bytes]:
    """This interpreter's standard library (about 80 MB), as a workspace layer."""
    files: dict[str, bytes] = {}
    for path in sorted(STDLIB.rglob("*")):
        parts = path.relative_to(STDLIB).parts
        if "__pycache__" in parts or "site-packages" in parts or not path.is_file() \
                or path.is_symlink():
            continue
        files["usr/lib/python/" + "/".join(parts)] = path.read_bytes()
    return files


def _image_layers() -> list[dict]:
    busybox = {"bin/busybox": File(Path("/bin/busybox").read_bytes(), 0o755)}
    busybox.update({f"bin/{tool}": Symlink("busybox") for tool in ("sh", "cat", "echo")})
    script = "#!/bin/sh\n" + "".join(f"cat {p} > /dev/null\n" for p in HOT[2:]) + \
        "echo READY\n"
    return [busybox, _stdlib_layer(), {"app/start.sh": File(script.encode(), 0o755)}]


def _lazypull(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, check=True,
                          capture_output=True, text=True)
    return done.stdout


def _proxy_config(socket_path: str) -> str:
    text = (REPO / "manifests" / "containerd" / "proxy-plugin.toml").read_text()
    text = text.replace("/run/lazypull/snapshotter.sock", socket_path)
    return "\n".join(line for line in text.splitlines() if not line.startswith("version"))


def _fetched_bytes(metrics_port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("lazypull_fetch_bytes_total{")))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="lazypull-demo-") as tmp:
        work = Path(tmp)
        registry = start_registry(work / "registry")
        service = containerd = None
        try:
            image = build_layout_image(work / "layout", "v1", _image_layers(),
                                       cmd=["/app/start.sh"])
            plain = push_layout_image(image.layout, "v1", registry.host, "demo/workspace")
            hot = work / "hot.txt"
            hot.write_text("\n".join(HOT) + "\n")
            lazy = f"docker://{registry.host}/demo/workspace:v1-lazy"
            converted = json.loads(_lazypull("convert", plain, lazy, "--prefetch-list",
                                             str(hot), "--no-cache", "--json"))
            size = sum(layer["size"] for layer in converted["manifests"][0]["layers"])
            config = work / "lazypull.toml"
            config.write_text("background_fetch = false\n"
                              f'hosts_dir = "{work / "hosts"}"\n')
            service = SnapshotterProcess(root=work / "lazypull", address=str(work / "l.sock"),
                                         metrics_port=free_tcp_port(),
                                         log_path=work / "lazypull.log",
                                         extra_args=("--config", str(config))).start()
            containerd = start_containerd(work / "containerd", _proxy_config(service.address))

            started = time.monotonic()
            ref = plain.removeprefix("docker://")
            containerd.ctr("images", "pull", "--plain-http", ref)
            full_out = containerd.ctr("run", "--rm", ref, "full", "/app/start.sh").stdout
            full = time.monotonic() - started

            started = time.monotonic()
            lazy_ref = lazy.removeprefix("docker://")
            pulled = json.loads(_lazypull("pull", lazy_ref, "--address", containerd.address,
                                          "--json"))
            lazy_out = containerd.ctr("run", "--rm", "--snapshotter", "lazypull", lazy_ref,
                                      "lazy", "/app/start.sh").stdout
            lazy_seconds = time.monotonic() - started
            fetched = _fetched_bytes(service.metrics_port or 0)
        finally:
            if containerd is not None:
                stop_containerd(containerd)
            if service is not None:
                service.stop()
            registry.stop()
    print(f"\nworkspace image: 3 layers, {size / 1e6:.1f} MB converted "
          f"({converted['manifests'][0]['layers'][1]['hot_files']} hot files in the stdlib "
          "layer)")
    print(f"full pull + start (overlayfs):      {full:6.2f} s  -> {full_out.strip()}")
    print(f"lazy pull + start (lazypull):       {lazy_seconds:6.2f} s  -> "
          f"{lazy_out.strip()}   layers: {[layer['source'] for layer in pulled['layers']]}")
    print(f"bytes fetched by the lazy start:    {fetched / 1e6:6.2f} MB of "
          f"{size / 1e6:.1f} MB ({100 * fetched / size:.0f}%)")
    return 0 if full_out.strip() == lazy_out.strip() == "READY" else 1


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("the lazy-start demo mounts filesystems: run it as root")
    sys.exit(main())
