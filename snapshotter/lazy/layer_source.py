"""Which Prepare asks for a remote layer, and where that layer comes from.

containerd's unpacker (and the CRI plugin, and `lazypull pull`) label a Prepare
with the snapshot it wants (`containerd.io/snapshot.ref`) and where the layer
comes from. Both label families are understood: stargz-snapshotter's
`containerd.io/snapshot/remote/stargz.*` and CRI's `containerd.io/snapshot/cri.*`.

Apart from `lazy.remote` (which fetches TOCs, in the FUSE manager) so that the
service, which only reads labels, does not load the format library.
"""

from dataclasses import dataclass

from oci.reference import Reference, ReferenceError

REF_LABEL = "containerd.io/snapshot.ref"
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"


class NotLazy(Exception):
    """The layer cannot be served lazily; the message says why (for the log)."""


@dataclass(frozen=True)
class LayerSource:
    """Where a requested layer comes from, as the Prepare labels say."""

    target: str  # the committed snapshot containerd wants (the layer's chainID)
    reference: Reference
    layer_digest: str
    manifest_digest: str | None = None


def layer_source(labels: dict[str, str]) -> LayerSource | None:
    """The remote layer a Prepare asks for, or None for an ordinary Prepare."""
    target = labels.get(REF_LABEL)
    image = labels.get(STARGZ_REFERENCE) or labels.get(CRI_IMAGE_REF)
    digest = labels.get(STARGZ_DIGEST) or labels.get(CRI_LAYER_DIGEST)
    if not (target and image and digest):
        return None
    try:
        reference = Reference.parse(image)
    except ReferenceError:
        return None
    return LayerSource(target, reference, digest, labels.get(CRI_MANIFEST_DIGEST) or None)
