"""Access profiles: which files a workload read first, recorded on nodes.

The data model shared by the node service (which records profiles) and the
converter (which reads them to place those files first). The schema is
`converter/access_profile.schema.json`, documented in docs/access-profile.md.
"""

import json
import re
from dataclasses import dataclass, field

SCHEMA_VERSION = 1
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class ProfileError(ValueError):
    """A profile file that does not follow the schema."""


@dataclass(frozen=True)
class FileAccess:
    path: str
    layer: str | None = None  # blob digest or diff_id of the layer it was read from
    ranges: tuple[tuple[int, int], ...] = ()
    at: float | None = None  # seconds after the recording window opened: first read


@dataclass
class ImageProfile:
    files: list[FileAccess]
    reference: str | None = None
    manifest_digest: str | None = None
    recorded_at: str | None = None
    window_seconds: float | None = None

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {}
        for key, value in (("reference", self.reference), ("manifestDigest", self.manifest_digest),
                           ("recordedAt", self.recorded_at),
                           ("windowSeconds", self.window_seconds)):
            if value is not None:
                doc[key] = value
        files = []
        for access in self.files:
            entry: dict[str, object] = {"path": access.path}
            if access.layer:
                entry["layer"] = access.layer
            if access.ranges:
                entry["ranges"] = [list(r) for r in access.ranges]
            if access.at is not None:
                entry["at"] = access.at
            files.append(entry)
        doc["files"] = files
        return doc


@dataclass
class AccessProfile:
    images: list[ImageProfile] = field(default_factory=list)

    def to_json_bytes(self) -> bytes:
        doc = {"schemaVersion": SCHEMA_VERSION, "images": [i.to_json() for i in self.images]}
        return json.dumps(doc, indent=2).encode()

    def for_image(self, repository: str | None, manifest_digests: set[str]) -> ImageProfile:
        """The profile recorded for this image: by manifest digest, then by repository,
        else the only one there is."""
        for image in self.images:
            if image.manifest_digest and image.manifest_digest in manifest_digests:
                return image
        if repository:
            for image in self.images:
                if image.reference and _repository_of(image.reference) == repository:
                    return image
        if len(self.images) == 1:
            return self.images[0]
        known = ", ".join(i.reference or i.manifest_digest or "?" for i in self.images)
        raise ProfileError(f"profile has no entry for this image (it has: {known or 'none'})")


def _repository_of(reference: str) -> str:
    name = reference.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        name = name.rsplit(":", 1)[0]
    return name


def _fail(where: str, what: str) -> ProfileError:
    return ProfileError(f"access profile {where}: {what}")


def _parse_file(raw: object, where: str) -> FileAccess:
    if not isinstance(raw, dict):
        raise _fail(where, "is not an object")
    path = raw.get("path")
    if not isinstance(path, str) or not path:
        raise _fail(where, "has no path")
    layer = raw.get("layer")
    if layer is not None and not (isinstance(layer, str) and _DIGEST.fullmatch(layer)):
        raise _fail(where, f"layer {layer!r} is not a sha256 digest")
    ranges = []
    for item in raw.get("ranges") or []:
        ok = isinstance(item, list) and len(item) == 2 and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in item)
        if not ok:
            raise _fail(where, f"range {item!r} is not [offset, length]")
        ranges.append((item[0], item[1]))
    at = raw.get("at")
    if at is not None and not (isinstance(at, int | float) and not isinstance(at, bool)
                               and at >= 0):
        raise _fail(where, f"at {at!r} is not a number of seconds")
    return FileAccess(path=path, layer=layer, ranges=tuple(ranges), at=at)


def parse_profile(data: bytes) -> AccessProfile:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise ProfileError(f"access profile is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != SCHEMA_VERSION:
        raise ProfileError(f"access profile must be an object with schemaVersion {SCHEMA_VERSION}")
    images = doc.get("images")
    if not isinstance(images, list):
        raise ProfileError("access profile has no images list")
    out = AccessProfile()
    for i, raw in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("files"), list):
            raise _fail(where, "needs a files list")
        files = [_parse_file(f, f"{where}.files[{j}]") for j, f in enumerate(raw["files"])]
        window = raw.get("windowSeconds")
        out.images.append(ImageProfile(
            files=files,
            reference=raw.get("reference") if isinstance(raw.get("reference"), str) else None,
            manifest_digest=raw.get("manifestDigest")
            if isinstance(raw.get("manifestDigest"), str) else None,
            recorded_at=raw.get("recordedAt") if isinstance(raw.get("recordedAt"), str) else None,
            window_seconds=window if isinstance(window, int | float) else None,
        ))
    return out
