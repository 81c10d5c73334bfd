"""Manifests, indexes and descriptors, parsed strictly and written back faithfully.

Unknown fields are kept, so rewriting one part of a manifest (its layers, say)
leaves everything else of the image as it was.
"""

import json
from dataclasses import dataclass, field
from typing import Any

from . import mediatypes as mt
from .digest import validate_digest


class ManifestError(ValueError):
    """A manifest or index that is malformed or of a kind lazypull does not handle."""


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None
    urls: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: object, where: str) -> "Descriptor":
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: descriptor is not an object")
        media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise ManifestError(f"{where}: descriptor has no mediaType")
        try:
            validate_digest(digest)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ManifestError(f"{where}: descriptor size {size!r} is not a byte count")
        annotations = _annotations(raw, where)
        platform = raw.get("platform")
        if platform is not None and not isinstance(platform, dict):
            raise ManifestError(f"{where}: platform is not an object")
        urls = raw.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
            raise ManifestError(f"{where}: urls must be a list of strings")
        known = {"mediaType", "digest", "size", "annotations", "platform", "urls"}
        return cls(
            media_type=media_type,
            digest=digest,  # type: ignore[arg-type]
            size=size,
            annotations=annotations,
            platform=platform,
            urls=list(urls),
            extra={k: v for k, v in raw.items() if k not in known},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.urls:
            out["urls"] = self.urls
        if self.annotations:
            out["annotations"] = self.annotations
        if self.platform is not None:
            out["platform"] = self.platform
        out.update(self.extra)
        return out

    @property
    def platform_string(self) -> str:
        p = self.platform or {}
        text = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
        return f"{text}/{p['variant']}" if p.get("variant") else text

    def matches_platforms(self, wanted: tuple[str, ...]) -> bool:
        """Whether this manifest's platform is one of `wanted` (`os/arch` matches every
        variant of it); an empty `wanted` matches every platform."""
        have = self.platform_string
        return not wanted or any(have == w or have.startswith(w + "/") for w in wanted)


@dataclass
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type,
                               "config": self.config.to_json(),
                               "layers": [layer.to_json() for layer in self.layers]}
        if self.annotations:
            doc["annotations"] = self.annotations
        doc.update(self.extra)
        return json.dumps(doc, indent=2).encode()


@dataclass
class Index:
    media_type: str
    manifests: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type,
                               "manifests": [m.to_json() for m in self.manifests]}
        if self.annotations:
            doc["annotations"] = self.annotations
        doc.update(self.extra)
        return json.dumps(doc, indent=2).encode()


def _annotations(doc: dict[str, Any], where: str) -> dict[str, str]:
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise ManifestError(f"{where}: annotations must map strings to strings")
    return dict(annotations)


def _media_type(doc: dict[str, Any], declared: str | None) -> str:
    inner = doc.get("mediaType")
    if inner is not None and not isinstance(inner, str):
        raise ManifestError(f"mediaType {inner!r} is not a string")
    if declared in mt.SCHEMA1 or inner in mt.SCHEMA1 or doc.get("schemaVersion") == 1:
        raise ManifestError("Docker schema 1 manifests are not supported; "
                            "push the image again with a current client")
    if doc.get("schemaVersion") != 2:
        raise ManifestError(f"unsupported schemaVersion {doc.get('schemaVersion')!r}")
    if inner and declared and declared not in (inner, "application/json") and \
            declared != "application/octet-stream":
        raise ManifestError(f"manifest says it is {inner} but was served as {declared}")
    kind = inner or declared
    if not kind or kind in ("application/json", "application/octet-stream"):
        # OCI allows mediaType to be absent: tell manifest and index apart by shape.
        kind = mt.OCI_INDEX if "manifests" in doc else mt.OCI_MANIFEST
    return kind


def parse_manifest(data: bytes, declared_media_type: str | None = None) -> Manifest | Index:
    """Parse a manifest or index; `declared_media_type` is the Content-Type it came with."""
    try:
        doc = json.loads(data)
    except ValueError:
        snippet = data[:40].decode("utf-8", "replace")
        raise ManifestError(f"manifest is not JSON (starts with {snippet!r})") from None
    except RecursionError:  # the decoder recurses once per level of nesting
        raise ManifestError("manifest JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    kind = _media_type(doc, declared_media_type)
    annotations = _annotations(doc, "manifest")
    if kind in mt.INDEXES:
        raw = doc.get("manifests")
        if not isinstance(raw, list):
            raise ManifestError("index has no manifests list")
        extra = {k: v for k, v in doc.items()
                 if k not in ("schemaVersion", "mediaType", "manifests", "annotations")}
        return Index(kind, [Descriptor.from_json(m, f"manifests[{i}]") for i, m in
                            enumerate(raw)], annotations, extra)
    if kind in mt.MANIFESTS:
        raw_layers = doc.get("layers")
        if not isinstance(raw_layers, list):
            raise ManifestError("manifest has no layers list")
        extra = {k: v for k, v in doc.items()
                 if k not in ("schemaVersion", "mediaType", "config", "layers", "annotations")}
        return Manifest(
            kind,
            Descriptor.from_json(doc.get("config"), "config"),
            [Descriptor.from_json(layer, f"layers[{i}]") for i, layer in enumerate(raw_layers)],
            annotations,
            extra,
        )
    raise ManifestError(f"unknown manifest media type {kind!r}")
