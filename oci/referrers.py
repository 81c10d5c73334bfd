"""OCI 1.1 referrers: push an artifact that refers to a manifest, and find it again.

An artifact is an OCI image manifest with an `artifactType`, the OCI empty
descriptor as its config, its blobs as layers and the manifest it is about as its
`subject`. It is pushed by digest only: no tag of the subject's repository moves
and the subject's own bytes are never written.

Registries with the referrers API (GET /v2/<name>/referrers/<digest>) list it by
themselves. For those without it (docker-registry 2.8 answers that path with
404) the spec's fallback is kept up to date here: the tag `sha256-<hex of the
subject's digest>` names an OCI image index of the subject's referrers, changed
by read-modify-write so other referrers stay listed. Lookups ask the referrers API
first and read the fallback tag when the registry has none.
"""

import asyncio
import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field

from . import mediatypes as mt
from .digest import sha256_of
from .manifest import Descriptor, Index, Manifest, ManifestError, parse_manifest
from .reference import Reference
from .registry import RegistryClient
from .store import NotFoundError, StoreError

EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
EMPTY_DESCRIPTOR = Descriptor(EMPTY_MEDIA_TYPE, sha256_of(EMPTY_JSON), len(EMPTY_JSON))
# Read-modify-write of the fallback index races with other writers: it is read back
# after each write and written again, a few times, if the artifact is missing.
_FALLBACK_ATTEMPTS = 3


class ReferrersError(StoreError):
    """A referrers index or fallback tag that cannot be read or kept."""


@dataclass(frozen=True)
class PushedArtifact:
    descriptor: Descriptor  # of the artifact manifest, as referrers list it
    fallback_tag: str | None  # the tag kept up to date, None where the API lists it


@dataclass
class ArtifactManifest:
    artifact_type: str
    subject: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        doc: dict[str, object] = {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "artifactType": self.artifact_type,
            "config": EMPTY_DESCRIPTOR.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
            "subject": _subject_json(self.subject),
        }
        if self.annotations:
            doc["annotations"] = self.annotations
        return json.dumps(doc, indent=2).encode()


def _subject_json(subject: Descriptor) -> dict[str, object]:
    return {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size}


def fallback_tag(subject_digest: str) -> str:
    """The referrers tag schema's tag for a subject: `<algorithm>-<hex>`."""
    algorithm, _, encoded = subject_digest.partition(":")
    return f"{algorithm}-{encoded}"


async def _push_bytes(client: RegistryClient, reference: Reference, descriptor: Descriptor,
                      data: bytes) -> None:
    if await client.has_blob(reference, descriptor.digest):
        return
    with tempfile.NamedTemporaryFile(prefix="lazypull-blob-") as file:
        file.write(data)
        file.flush()
        await client.push_blob(reference, descriptor, file.name)


async def push_artifact(client: RegistryClient, reference: Reference, subject: Descriptor,
                        artifact_type: str, blobs: list[tuple[Descriptor, str]],
                        annotations: dict[str, str] | None = None) -> PushedArtifact:
    """Push the blobs (descriptor, local path), then the artifact manifest referring to
    `subject`, then keep the fallback tag if the registry has no referrers API."""
    for descriptor, path in blobs:
        if os.path.getsize(path) != descriptor.size:
            raise ValueError(f"{path} does not hold the {descriptor.size} bytes of "
                             f"{descriptor.digest}")
        await client.push_blob(reference, descriptor, path)
    await _push_bytes(client, reference, EMPTY_DESCRIPTOR, EMPTY_JSON)
    manifest = ArtifactManifest(artifact_type, subject, [d for d, _ in blobs],
                                dict(annotations or {}))
    data = manifest.to_bytes()
    digest = await client.put_manifest(reference, data, mt.OCI_MANIFEST)  # by digest only
    pushed = Descriptor(mt.OCI_MANIFEST, digest, len(data), annotations=dict(annotations or {}),
                        extra={"artifactType": artifact_type})
    if await client.get_referrers(reference, subject.digest) is not None:
        return PushedArtifact(pushed, None)
    tag = fallback_tag(subject.digest)
    for _ in range(_FALLBACK_ATTEMPTS):
        await _add_to_fallback(client, reference, tag, pushed)
        if any(d.digest == digest for d in await _read_fallback(client, reference, tag)):
            return PushedArtifact(pushed, tag)
    raise ReferrersError(f"{reference.registry}/{reference.repository}:{tag}: another writer "
                         f"kept replacing the referrers index; {digest} is not in it")


async def _read_fallback(client: RegistryClient, reference: Reference,
                         tag: str) -> list[Descriptor]:
    try:
        data, media_type, _ = await client.get_manifest(reference, tag)
    except NotFoundError:
        return []
    return _referrers_of(data, media_type, f"{reference.repository}:{tag}")


def _referrers_of(data: bytes, media_type: str | None, where: str) -> list[Descriptor]:
    try:
        parsed = parse_manifest(data, media_type)
    except ManifestError as exc:
        raise ReferrersError(f"{where}: not a referrers index: {exc}") from None
    if not isinstance(parsed, Index) or parsed.media_type != mt.OCI_INDEX:
        raise ReferrersError(f"{where}: holds a {parsed.media_type}, not an OCI image index of "
                             "referrers; it is left as it is")
    return parsed.manifests


async def _add_to_fallback(client: RegistryClient, reference: Reference, tag: str,
                           artifact: Descriptor) -> None:
    referrers = [d for d in await _read_fallback(client, reference, tag)
                 if d.digest != artifact.digest]
    referrers.append(artifact)
    index = Index(mt.OCI_INDEX, referrers)
    await client.put_manifest(reference, index.to_bytes(), mt.OCI_INDEX, tag)


async def find_referrers(client: RegistryClient, reference: Reference, subject_digest: str,
                         artifact_type: str | None = None, *,
                         fallback_at_once: bool = False) -> list[Descriptor]:
    """Descriptors of the manifests that refer to `subject_digest`, of `artifact_type`
    if given: from the referrers API, else from the fallback tag. Oldest first where
    the fallback index has them in the order they were pushed. `fallback_at_once`:
    read the fallback tag while the API is asked (a round trip less where the registry
    has no API, a request more where it has), its answer used only if the API has none."""
    fallback = asyncio.ensure_future(
        _read_fallback(client, reference, fallback_tag(subject_digest))) \
        if fallback_at_once else None
    try:
        data = await client.get_referrers(reference, subject_digest, artifact_type)
        if data is not None:
            referrers = _referrers_of(data, mt.OCI_INDEX, f"referrers of {subject_digest}")
        elif fallback is not None:
            referrers = await fallback
        else:
            referrers = await _read_fallback(client, reference, fallback_tag(subject_digest))
    finally:
        if fallback is not None and not fallback.done():
            fallback.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fallback
        elif fallback is not None and not fallback.cancelled():
            fallback.exception()  # retrieved: an unused failed read is no error
    if artifact_type is None:
        return referrers
    return [d for d in referrers if d.extra.get("artifactType") == artifact_type]


async def read_artifact(client: RegistryClient, reference: Reference,
                        descriptor: Descriptor) -> tuple[Manifest, Descriptor | None]:
    """An artifact manifest (checked against its digest) and the subject it names."""
    data, media_type, _ = await client.get_manifest(reference, descriptor.digest)
    try:
        parsed = parse_manifest(data, media_type)
    except ManifestError as exc:
        raise ReferrersError(f"artifact {descriptor.digest}: {exc}") from None
    if not isinstance(parsed, Manifest):
        raise ReferrersError(f"artifact {descriptor.digest} is an index, not a manifest")
    raw_subject = parsed.extra.get("subject")
    subject = None
    if raw_subject is not None:
        try:
            subject = Descriptor.from_json(raw_subject, f"artifact {descriptor.digest} subject")
        except ManifestError as exc:
            raise ReferrersError(str(exc)) from None
    return parsed, subject
