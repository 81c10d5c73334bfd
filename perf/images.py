"""Realistic multi-layer OCI images for benchmarks, written straight into an OCI layout.

Each layer is a PAX tar of a slice of a real tree on this machine (perf/corpus.py),
compressed to one gzip stream at level 6 (what BuildKit and Docker push). The layout
is written directly, not through umoci: an image of a few hundred MB never passes
through memory or an unpacked rootfs, and the same trees always give the same image
(fixed timestamps, gzip header without a name or mtime).
"""

import hashlib
import json
import os
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from perf.corpus import LayerTar, Source, build_layer_tar

OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
CREATED = "2024-01-01T00:00:00Z"
GZIP_LEVEL = 6
READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class LayerSpec:
    """One layer: `share` of the image's uncompressed size, taken from `sources` in order."""

    name: str  # what the config's history says created it
    share: float
    sources: list[Source]


@dataclass
class BuiltLayer:
    name: str
    tar: LayerTar  # its path is gone once the layer is compressed
    digest: str  # of the gzip blob
    size: int  # bytes of the gzip blob
    diff_id: str  # of the tar


@dataclass
class BuiltImage:
    layout: Path
    tag: str
    manifest_digest: str
    manifest_size: int
    config_size: int
    layers: list[BuiltLayer] = field(default_factory=list)

    @property
    def reference(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    @property
    def uncompressed_bytes(self) -> int:
        return sum(layer.tar.size for layer in self.layers)

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def short(self) -> bool:
        return any(layer.tar.short for layer in self.layers)


def python_stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_layer_specs() -> list[LayerSpec]:
    """A Python application image: OS libraries, shared data, the Python runtime and
    a small top layer. Every layer takes its share from the start of its trees, in
    sorted order, so no file lands in two layers."""
    stdlib = python_stdlib()
    perl = [Path(p) for p in ("/usr/share/perl", "/usr/share/perl5")]
    specs = [
        LayerSpec("os libraries", 0.40, [Source(Path("/usr/lib/x86_64-linux-gnu"))]),
        LayerSpec("shared data", 0.20, [Source(Path("/usr/share"), frozenset(perl))]),
        LayerSpec(
            "python runtime",
            0.35,
            [Source(stdlib, frozenset({stdlib / "site-packages", stdlib / "dist-packages"}))],
        ),
        LayerSpec("application", 0.05, [Source(p) for p in perl]),
    ]
    return [
        LayerSpec(s.name, s.share, [src for src in s.sources if src.root.is_dir()])
        for s in specs
        if any(src.root.is_dir() for src in s.sources)
    ]


def _write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return "sha256:" + digest, len(data)


def _gzip_layer(tar: Path, layout: Path) -> tuple[str, int, str]:
    """Compress `tar` into a blob of the layout: (blob digest, blob size, diff_id)."""
    # wbits 16+: a gzip wrapper with no file name and mtime 0, so the blob is reproducible.
    deflater = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    plain, packed = hashlib.sha256(), hashlib.sha256()
    staging = layout / "blobs" / "sha256" / ".layer.tmp"
    size = 0
    with open(tar, "rb") as src, open(staging, "wb") as dst:
        while block := src.read(READ_BLOCK):
            plain.update(block)
            out = deflater.compress(block)
            packed.update(out)
            dst.write(out)
            size += len(out)
        out = deflater.flush()
        packed.update(out)
        dst.write(out)
        size += len(out)
    digest = packed.hexdigest()
    os.replace(staging, layout / "blobs" / "sha256" / digest)
    return "sha256:" + digest, size, "sha256:" + plain.hexdigest()


def build_image(
    layout: Path, tag: str, specs: list[LayerSpec], total_bytes: int, scratch: Path
) -> BuiltImage:
    """Write `layout:tag`, an OCI image of about `total_bytes` of layer tars split
    between `specs` by their shares. Tars are built in `scratch` and deleted once
    compressed."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps(OCI_LAYOUT))
    shares = sum(s.share for s in specs)
    layers: list[BuiltLayer] = []
    for number, spec in enumerate(specs, start=1):
        target = int(total_bytes * spec.share / shares)
        tar = build_layer_tar(scratch / f"layer-{number}.tar", spec.sources, target)
        digest, size, diff_id = _gzip_layer(tar.path, layout)
        tar.path.unlink()
        layers.append(BuiltLayer(spec.name, tar, digest, size, diff_id))
    config = {
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": [str(python_stdlib().parent.parent / "bin" / "python3")],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": CREATED, "created_by": layer.name} for layer in layers],
    }
    config_digest, config_size = _write_blob(layout, json.dumps(config, indent=2).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],
    }
    manifest_digest, manifest_size = _write_blob(layout, json.dumps(manifest, indent=2).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {REF_NAME: tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index, indent=2))
    return BuiltImage(layout, tag, manifest_digest, manifest_size, config_size, layers)

