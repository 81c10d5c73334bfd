"""Whether a remote layer can be served lazily, and its verified TOC.

A layer is lazy when its descriptor in the image's manifest carries a TOC digest:
the TOC is then fetched with two range requests and verified against it. Anything
else is not lazy, and the caller falls back to an ordinary snapshot. (Which Prepare
asks for which layer is `lazy.layer_source`.)
"""

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import estargz
from estargz.footer import MAX_FOOTER_SIZE
from oci.manifest import Descriptor, Index, Manifest, ManifestError, parse_manifest
from oci.store import StoreError

from .layer_source import LayerSource, NotLazy

if TYPE_CHECKING:
    from oci.registry import RegistryClient

@dataclass
class RemoteLayer:
    source: LayerSource
    descriptor: Descriptor
    toc_digest: str
    footer: estargz.Footer
    toc_bytes: bytes  # as stored in the blob, kept so a restart needs no registry
    layer: estargz.Layer


@dataclass(frozen=True)
class FoundLayer:
    """A layer's descriptor and the platform manifest that lists it."""

    descriptor: Descriptor
    manifest: Descriptor  # digest, media type and size of that manifest


async def _manifests(client: "RegistryClient", source: LayerSource
                     ) -> list[tuple[Manifest, Descriptor]]:
    wanted = source.manifest_digest or source.reference.object
    data, media_type, digest = await client.get_manifest(source.reference, wanted)
    parsed = parse_manifest(data, media_type)
    if isinstance(parsed, Manifest):
        return [(parsed, Descriptor(media_type, digest, len(data)))]
    assert isinstance(parsed, Index)
    found: list[tuple[Manifest, Descriptor]] = []
    for child in parsed.manifests:
        data, media_type, digest = await client.get_manifest(source.reference, child.digest)
        manifest = parse_manifest(data, media_type)
        if isinstance(manifest, Manifest):
            found.append((manifest, Descriptor(media_type, digest, len(data))))
    return found


async def find_layer(client: "RegistryClient", source: LayerSource) -> FoundLayer:
    """The layer's descriptor (with its annotations) and its manifest's."""
    try:
        for manifest, described in await _manifests(client, source):
            for layer in manifest.layers:
                if layer.digest == source.layer_digest:
                    return FoundLayer(layer, described)
    except (StoreError, ManifestError) as exc:
        raise NotLazy(f"cannot read the manifest of {source.reference}: {exc}") from None
    raise NotLazy(f"layer {source.layer_digest} is not in {source.reference}'s manifest")


async def find_descriptor(client: "RegistryClient", source: LayerSource) -> Descriptor:
    """The layer's descriptor (with its annotations) from the image's manifest."""
    return (await find_layer(client, source)).descriptor


async def open_remote_layer(client: "RegistryClient", source: LayerSource,
                            max_toc_size: int = estargz.toc.DEFAULT_MAX_TOC_SIZE, *,
                            index_path: str | None = None,
                            descriptor: Descriptor | None = None) -> RemoteLayer:
    """Fetch and verify the layer's TOC and index it (at `index_path` to keep the
    index); raise NotLazy when it cannot be served lazily. `descriptor`: the layer's,
    if the caller has read the manifest already."""
    if descriptor is None:
        descriptor = await find_descriptor(client, source)
    ref, digest, size = source.reference, descriptor.digest, descriptor.size
    toc_digest = descriptor.annotations.get(estargz.TOC_DIGEST_ANNOTATION)
    try:
        tail_length = min(size, MAX_FOOTER_SIZE)
        footer = estargz.parse_footer(
            await client.fetch_range(ref, digest, size - tail_length, tail_length), size)
        if toc_digest is None:
            # A footer alone proves nothing: without a digest from the manifest the TOC
            # (and so every chunk digest) would be unverified.
            raise NotLazy(f"layer {digest} has an eStargz footer but no TOC digest annotation "
                          "to verify it against")
        if footer.toc_length > max_toc_size:
            raise NotLazy(f"layer {digest}: TOC of {footer.toc_length} bytes is too large")
        toc_bytes = await client.fetch_range(ref, digest, footer.toc_offset, footer.toc_length)
        layer = await asyncio.to_thread(estargz.load_toc, footer, toc_bytes, toc_digest,
                                        max_toc_size, index_path=index_path)
    except estargz.FooterError:
        raise NotLazy(f"layer {digest} is not eStargz or zstd:chunked") from None
    except estargz.FormatError as exc:
        raise NotLazy(f"layer {digest}: {exc}") from None
    except StoreError as exc:
        raise NotLazy(f"layer {digest}: registry: {exc}") from None
    return RemoteLayer(source, descriptor, toc_digest, footer, toc_bytes, layer)
