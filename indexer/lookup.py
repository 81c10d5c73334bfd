"""Find the gzip indexes published for an image manifest, and fetch one.

For the snapshotter (it reads layers through them) and for `lazypull index --show`.
"""

import asyncio
from dataclasses import dataclass

import gzindex
from oci.digest import DigestMismatchError
from oci.manifest import Descriptor, Manifest
from oci.reference import Reference
from oci.referrers import find_referrers, read_artifact
from oci.registry import RegistryClient

MAX_INDEX_SIZE = 1 << 30
ARTIFACTS_AT_ONCE = 8  # artifact manifests read at once (a registry may list many)


@dataclass(frozen=True)
class LayerIndex:
    layer_digest: str
    descriptor: Descriptor  # of the index blob
    artifact: str  # digest of the artifact manifest that lists it


async def find_layer_indexes(client: RegistryClient, reference: Reference,
                             manifest_digest: str, *, fallback_at_once: bool = False
                             ) -> dict[str, LayerIndex]:
    """Layer digest -> its index, from the artifacts that refer to the manifest; a
    later artifact's index of a layer wins over an earlier one's. `fallback_at_once`:
    see find_referrers. The artifact manifests are read a few at once."""
    found: dict[str, LayerIndex] = {}
    artifacts = await find_referrers(client, reference, manifest_digest,
                                     gzindex.ARTIFACT_TYPE, fallback_at_once=fallback_at_once)
    slots = asyncio.Semaphore(ARTIFACTS_AT_ONCE)

    async def read(artifact: Descriptor) -> tuple[Manifest, Descriptor | None]:
        async with slots:
            return await read_artifact(client, reference, artifact)

    read_all = await asyncio.gather(*(read(a) for a in artifacts))
    for artifact, (manifest, subject) in zip(artifacts, read_all, strict=True):
        if subject is None or subject.digest != manifest_digest:
            continue  # an index that lists what does not refer to this manifest
        for layer in manifest.layers:
            target = layer.annotations.get(gzindex.LAYER_ANNOTATION)
            if layer.media_type == gzindex.INDEX_MEDIA_TYPE and target:
                found[target] = LayerIndex(target, layer, artifact.digest)
    return found


async def fetch_index(client: RegistryClient, reference: Reference, index: LayerIndex,
                      path: str) -> gzindex.GzipIndex:
    """Download an index blob to `path` (verified against its digest) and open it;
    refuses one that indexes another layer than the one it is listed for."""
    if index.descriptor.size > MAX_INDEX_SIZE:
        raise DigestMismatchError(f"index {index.descriptor.digest} of "
                                  f"{index.descriptor.size} bytes is larger than allowed")
    with open(path, "wb") as file:  # stream_blob checks the digest at the end
        async for piece in client.stream_blob(reference, index.descriptor):
            file.write(piece)
    opened = gzindex.GzipIndex.open(path)
    if opened.layer_digest != index.layer_digest:
        opened.close()
        raise gzindex.IndexFormatError(f"index {index.descriptor.digest} is of layer "
                                       f"{opened.layer_digest}, not {index.layer_digest}")
    return opened
