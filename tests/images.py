"""Real OCI images for tests, built offline with umoci and moved about with skopeo.

`build_layout_image` makes a multi-layer image in an OCI layout: each layer is
a mapping of paths to what the layer puts there, applied to an unpacked rootfs
and committed with `umoci repack`, so layers are gzip tars with real whiteouts
and the config keeps its history. `build_two_platform_image` adds an image
index over a linux/amd64 and a linux/arm64 image, and `push_layout_image`
copies a layout image to a registry.
"""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class File:
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755


WHITEOUT = None  # as a layer entry: delete what lower layers put at that path

# bytes is shorthand for File(bytes).
LayerEntry = bytes | File | Symlink | Dir | None
Layer = Mapping[str, LayerEntry]


@dataclass(frozen=True)
class LayoutImage:
    """One image manifest in an OCI layout, with its manifest and config parsed."""

    layout: Path
    tag: str
    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]

    @property
    def reference(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    @property
    def layer_digests(self) -> list[str]:
        return [layer["digest"] for layer in self.manifest["layers"]]

    def blob_path(self, digest: str) -> Path:
        return blob_path(self.layout, digest)


@dataclass(frozen=True)
class PlatformIndex:
    """An image index in an OCI layout; `images` is keyed by "os/architecture"."""

    layout: Path
    tag: str
    index_digest: str
    index: dict[str, Any]
    images: dict[str, LayoutImage] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


def run_tool(*args: str | Path) -> str:
    """Run a command; on failure raise with its stderr, which says what went wrong."""
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {done.returncode}: {done.stderr}")
    return done.stdout


def skopeo(*args: str | Path) -> str:
    # --insecure-policy: tests must not depend on this machine's /etc/containers/policy.json.
    return run_tool("skopeo", "--insecure-policy", *args)


def skopeo_inspect(reference: str, *extra: str) -> dict[str, Any]:
    return json.loads(skopeo("inspect", *extra, reference))


def blob_path(layout: str | Path, digest: str) -> Path:
    algorithm, _, encoded = digest.partition(":")
    return Path(layout) / "blobs" / algorithm / encoded


def read_index_json(layout: str | Path) -> dict[str, Any]:
    return json.loads((Path(layout) / "index.json").read_bytes())


def tagged_entry(layout: str | Path, tag: str) -> dict[str, Any]:
    for entry in read_index_json(layout)["manifests"]:
        if entry.get("annotations", {}).get(REF_NAME) == tag:
            return entry
    raise KeyError(f"no image tagged {tag!r} in {layout}")


def load_image(layout: str | Path, tag: str) -> LayoutImage:
    layout = Path(layout)
    digest = tagged_entry(layout, tag)["digest"]
    manifest = json.loads(blob_path(layout, digest).read_bytes())
    config = json.loads(blob_path(layout, manifest["config"]["digest"]).read_bytes())
    return LayoutImage(layout, tag, digest, manifest, config)


def _apply(rootfs: Path, layer: Layer) -> None:
    for name, entry in layer.items():
        relative = os.path.normpath(name.lstrip("/"))
        if relative == "." or relative.split(os.sep)[0] == "..":
            raise ValueError(f"layer path {name!r} is not inside the rootfs")
        path = rootfs / relative
        if entry is WHITEOUT:
            if not path.exists() and not path.is_symlink():
                raise ValueError(f"cannot delete {name!r}: no lower layer has it")
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(entry, Dir):
            path.mkdir(exist_ok=True)
            path.chmod(entry.mode)
            continue
        if path.is_symlink() or path.is_file():
            path.unlink()  # replace, never write through an old symlink
        if isinstance(entry, Symlink):
            path.symlink_to(entry.target)
        else:
            file = entry if isinstance(entry, File) else File(entry)
            path.write_bytes(file.data)
            path.chmod(file.mode)


def build_layout_image(
    dest_dir: str | Path,
    tag: str,
    layers: Sequence[Layer],
    *,
    labels: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    entrypoint: Sequence[str] | None = None,
    cmd: Sequence[str] | None = None,
    workdir: str | None = None,
    user: str | None = None,
    architecture: str | None = None,
    history: Sequence[str] | None = None,
) -> LayoutImage:
    """Build `dest_dir:tag`, one gzip layer per mapping; the layout is created if missing.

    `history` gives each layer's created_by (default "test layer N"). The config
    overrides go in through one `umoci config`, which adds an empty-layer history entry.
    """
    dest = Path(dest_dir)
    if history is not None and len(history) != len(layers):
        raise ValueError("history needs one entry per layer")
    if not (dest / "index.json").exists():
        run_tool("umoci", "init", "--layout", dest)
    image = f"{dest}:{tag}"
    run_tool("umoci", "new", "--image", image)
    with tempfile.TemporaryDirectory(prefix="umoci-bundle-") as work:
        bundle = Path(work) / "bundle"
        run_tool("umoci", "unpack", "--image", image, bundle)
        for number, layer in enumerate(layers, start=1):
            _apply(bundle / "rootfs", layer)
            created_by = history[number - 1] if history else f"test layer {number}"
            # --refresh-bundle: the next repack diffs against this layer, not the empty base.
            run_tool("umoci", "repack", "--refresh-bundle", "--history.created_by", created_by,
                     "--image", image, bundle)
    overrides: list[str] = []
    for key, value in (labels or {}).items():
        overrides += ["--config.label", f"{key}={value}"]
    for key, value in (env or {}).items():
        overrides += ["--config.env", f"{key}={value}"]
    for arg in entrypoint or []:
        overrides += ["--config.entrypoint", arg]
    for arg in cmd or []:
        overrides += ["--config.cmd", arg]
    for flag, value in (("--config.workingdir", workdir), ("--config.user", user),
                        ("--architecture", architecture)):
        if value is not None:
            overrides += [flag, value]
    if overrides:
        run_tool("umoci", "config", "--image", image, *overrides)
    run_tool("umoci", "gc", "--layout", dest)  # drop the intermediate manifests and configs
    return load_image(dest, tag)


def assemble_platform_index(
    layout: str | Path, tag: str, image_tags: Sequence[str]
) -> PlatformIndex:
    """Tag an OCI image index over the images `image_tags` of one layout.

    Each entry's platform comes from its image config (os, architecture, variant).
    """
    layout = Path(layout)
    images = [load_image(layout, image_tag) for image_tag in image_tags]
    entries = []
    for image in images:
        platform = {"architecture": image.config["architecture"], "os": image.config["os"]}
        if image.config.get("variant"):
            platform["variant"] = image.config["variant"]
        size = blob_path(layout, image.manifest_digest).stat().st_size
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": image.manifest_digest, "size": size, "platform": platform})
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    data = json.dumps(index, indent=2).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path(layout, digest).write_bytes(data)
    top = read_index_json(layout)
    top["manifests"] = [m for m in top["manifests"]
                        if m.get("annotations", {}).get(REF_NAME) != tag]
    top["manifests"].append({"mediaType": OCI_INDEX, "digest": digest, "size": len(data),
                             "annotations": {REF_NAME: tag}})
    (layout / "index.json").write_text(json.dumps(top))
    by_platform = {f"{i.config['os']}/{i.config['architecture']}": i for i in images}
    return PlatformIndex(layout, tag, digest, index, by_platform)


def build_two_platform_image(
    dest_dir: str | Path,
    tag: str,
    layers: Sequence[Layer],
    arm64_layers: Sequence[Layer] | None = None,
    **config: Any,
) -> PlatformIndex:
    """Images `TAG-amd64` and `TAG-arm64` (same layers unless `arm64_layers`) under index `TAG`.

    `config` takes build_layout_image's keyword overrides, except architecture.
    """
    build_layout_image(dest_dir, f"{tag}-amd64", layers, architecture="amd64", **config)
    build_layout_image(dest_dir, f"{tag}-arm64", arm64_layers or layers, architecture="arm64",
                       **config)
    return assemble_platform_index(dest_dir, tag, [f"{tag}-amd64", f"{tag}-arm64"])


def push_layout_image(
    layout: str | Path,
    tag: str,
    registry: str,
    repository: str,
    dest_tag: str | None = None,
) -> str:
    """Copy `oci:LAYOUT:TAG` to the plain-HTTP registry at `registry` (host:port).

    Every platform of an index goes, and digests are kept, so what the registry
    serves is byte for byte what the layout holds. Returns the docker:// reference.
    """
    destination = f"docker://{registry}/{repository}:{dest_tag or tag}"
    skopeo("copy", "--dest-tls-verify=false", "--all", "--preserve-digests",
           f"oci:{layout}:{tag}", destination)
    return destination
