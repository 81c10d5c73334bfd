"""The labels and names containerd's pull and unpack use, computed the way containerd does.

- chain IDs of an image's layers (OCI image-spec identity.ChainID);
- garbage-collection references between content (images.ChildGCLabels) and from
  the config to the unpacked snapshot (the unpacker's gc.ref.snapshot label);
- `containerd.io/distribution.source.<host>` (remotes/docker AppendDistributionSourceLabel);
- the snapshot labels a remote snapshotter reads in Prepare: containerd's own
  `containerd.io/snapshot.ref`, the CRI family (pkg/snapshotters AppendInfoHandlerWrapper)
  and stargz-snapshotter's `remote/stargz.*` family (AppendDefaultLabelsHandlerWrapper);
- the normalized image name containerd's CRI plugin records (ParseDockerRef).
"""

import base64
import secrets
import time
from collections.abc import Sequence

from oci.digest import sha256_of
from oci.reference import Reference

# containerd's label size limit: key and value together (labels.Validate).
MAX_LABEL_SIZE = 4096

SNAPSHOT_REF = "containerd.io/snapshot.ref"
UNCOMPRESSED = "containerd.io/uncompressed"
GC_CONFIG = "containerd.io/gc.ref.content.config"
GC_LAYER_PREFIX = "containerd.io/gc.ref.content.l."
GC_MANIFEST_PREFIX = "containerd.io/gc.ref.content.m."
GC_SNAPSHOT_PREFIX = "containerd.io/gc.ref.snapshot."
DISTRIBUTION_SOURCE_PREFIX = "containerd.io/distribution.source."

CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"

STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"

# The labels containerd's metadata layer passes on to a snapshotter: the rest stay
# in containerd's own database (snapshots.FilterInheritedLabels).
INHERITED_PREFIX = "containerd.io/snapshot/"


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """ChainID of each layer: chain_0 = diff_0, chain_i = sha256(chain_{i-1} + " " + diff_i)."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append(sha256_of(f"{out[-1]} {diff_id}".encode()))
    return out


def fits(key: str, value: str) -> bool:
    return len(key) + len(value) <= MAX_LABEL_SIZE


def layers_label(key: str, digests: Sequence[str], *, stargz: bool = False) -> str:
    """Comma-separated digests, as many as fit in one label, in order.

    containerd's CRI handler checks the list as it would be stored; stargz-snapshotter
    checks it with a trailing comma (which it then trims), so near the limit it may keep
    one digest fewer. Dropping digests only loses prefetch hints, never correctness.
    """
    value = ""
    for digest in digests:
        if stargz:
            candidate = f"{value}{digest},"
            if not fits(key, candidate):
                break
            value = candidate
        else:
            candidate = f"{value},{digest}" if value else digest
            if not fits(key, candidate):
                break
            value = candidate
    return value.removesuffix(",")


def is_inherited(key: str) -> bool:
    """Whether containerd passes a snapshot label on to the snapshotter."""
    return key == SNAPSHOT_REF or key.startswith(INHERITED_PREFIX)


def snapshot_labels(image_ref: str, manifest_digest: str, layer_digests: Sequence[str],
                    index: int, chain_id: str) -> dict[str, str]:
    """The Prepare (and Commit) labels for layer `index`: containerd's snapshot.ref,
    then what CRI and stargz-snapshotter's rpull put on layer descriptors. Both
    families list this layer and the ones above it, not the ones below."""
    digest, remaining = layer_digests[index], layer_digests[index:]
    return {
        SNAPSHOT_REF: chain_id,
        CRI_IMAGE_REF: image_ref,
        CRI_LAYER_DIGEST: digest,
        CRI_IMAGE_LAYERS: layers_label(CRI_IMAGE_LAYERS, remaining),
        CRI_MANIFEST_DIGEST: manifest_digest,
        STARGZ_REFERENCE: image_ref,
        STARGZ_DIGEST: digest,
        STARGZ_LAYERS: layers_label(STARGZ_LAYERS, remaining, stargz=True),
    }


def unpack_key(chain_id: str) -> str:
    """A fresh key for an extraction snapshot, in containerd's format
    (`extract-<nanoseconds>-<random> <chainID>`)."""
    unique = f"{time.time_ns() % 1_000_000_000}-" \
             f"{base64.urlsafe_b64encode(secrets.token_bytes(3)).decode()}"
    return f"extract-{unique} {chain_id}"


def manifest_gc_labels(config_digest: str, layer_digests: Sequence[str]) -> dict[str, str]:
    labels = {GC_CONFIG: config_digest}
    labels.update({f"{GC_LAYER_PREFIX}{i}": d for i, d in enumerate(layer_digests)})
    return labels


def index_gc_labels(manifest_digests: Sequence[str]) -> dict[str, str]:
    return {f"{GC_MANIFEST_PREFIX}{i}": d for i, d in enumerate(manifest_digests)}


def distribution_source_key(registry: str) -> str:
    """The label key for a registry: its host name without the port, as containerd's
    url.Hostname() gives it ("127.0.0.1:5000" -> "127.0.0.1")."""
    if registry.startswith("["):
        host = registry[1:].split("]", 1)[0]
    else:
        host = registry.rsplit(":", 1)[0] if ":" in registry else registry
    return DISTRIBUTION_SOURCE_PREFIX + host


def merge_distribution_source(existing: str | None, repository: str) -> str:
    """The repositories a blob came from: sorted, without duplicates."""
    repos = {r for r in (existing or "").split(",") if r}
    repos.add(repository)
    return ",".join(sorted(repos))


def image_name(reference: Reference) -> str:
    """The name containerd's CRI plugin (docker.ParseDockerRef) gives an image:
    "x" -> "docker.io/library/x:latest"; with a digest, the tag is dropped."""
    base = f"{reference.registry}/{reference.repository}"
    if reference.digest:
        return f"{base}@{reference.digest}"
    return f"{base}:{reference.tag or 'latest'}"
