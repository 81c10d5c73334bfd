"""Whether a remote layer can be served lazily, and its verified TOC.

A layer is lazy when its descriptor in the image's manifest carries a TOC digest:
the TOC is then fetched with one range request for the blob's tail (two if the TOC
is larger than that tail) and verified against it. A zstd:chunked descriptor also
says where its TOC starts, and then that tail is the TOC and the footer, nothing
more. Anything else is not lazy, and the caller falls back to an ordinary snapshot.
(Which Prepare asks for which layer is `lazy.layer_source`.)
"""

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import estargz
from estargz.footer import MAX_FOOTER_SIZE, ZSTD_FOOTER_SIZE
from estargz.writer import ZSTD_MANIFEST_POSITION_ANNOTATION
from oci.manifest import Descriptor, Index, Manifest, ManifestError, parse_manifest
from oci.reference import Reference
from oci.store import StoreError

from .index_build import IndexBuilder, build_index
from .layer_source import LayerSource, NotLazy

if TYPE_CHECKING:
    from oci.registry import RegistryClient

    from .toc_ahead import TocAhead

# The tail fetched first: the footer and, for most layers, the whole TOC (the 51 MB
# eStargz layer of the node workspace image has one of 340 kB), a round trip saved per
# layer for at most this many bytes of payload fetched with it.
TAIL_BYTES = 512 << 10
# A tail (or TOC) larger than this comes in up to TAIL_PARTS range requests side by side,
# on connections the pull has opened (RegistryClient.preconnect): each starts with TCP's
# initial window, so 324 kB over 100 Mbit at 40 ms took 0.24 s as one request and
# 0.17 s as four.
TAIL_PART_BYTES = 64 << 10
TAIL_PARTS = 4
# Where zstd:chunked descriptors say their TOC starts ("offset:length:size:type"):
# stargz-snapshotter's key, then containers/storage's.
_TOC_POSITION_ANNOTATIONS = (ZSTD_MANIFEST_POSITION_ANNOTATION,
                             "io.github.containers.zstd-chunked.manifest-position")

log = logging.getLogger(__name__)


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


Manifests = list[tuple[Manifest, Descriptor]]  # each platform manifest, and its descriptor


async def fetch_manifests(client: "RegistryClient", source: LayerSource) -> Manifests:
    """The image's platform manifests: the one the source names, or every one of its index."""
    wanted = source.manifest_digest or source.reference.object
    data, media_type, digest = await client.get_manifest(source.reference, wanted)
    parsed = parse_manifest(data, media_type)
    if isinstance(parsed, Manifest):
        return [(parsed, Descriptor(media_type, digest, len(data)))]
    assert isinstance(parsed, Index)
    found: Manifests = []
    for child in parsed.manifests:
        data, media_type, digest = await client.get_manifest(source.reference, child.digest)
        manifest = parse_manifest(data, media_type)
        if isinstance(manifest, Manifest):
            found.append((manifest, Descriptor(media_type, digest, len(data))))
    return found


def layer_in(manifests: Manifests, source: LayerSource) -> FoundLayer:
    for manifest, described in manifests:
        for layer in manifest.layers:
            if layer.digest == source.layer_digest:
                return FoundLayer(layer, described)
    raise NotLazy(f"layer {source.layer_digest} is not in {source.reference}'s manifest")


async def find_layer(client: "RegistryClient", source: LayerSource) -> FoundLayer:
    """The layer's descriptor (with its annotations) and its manifest's."""
    try:
        manifests = await fetch_manifests(client, source)
    except (StoreError, ManifestError) as exc:
        raise NotLazy(f"cannot read the manifest of {source.reference}: {exc}") from None
    return layer_in(manifests, source)


@dataclass(frozen=True)
class FetchedToc:
    """A layer's footer and its TOC as the blob holds them, not verified yet."""

    footer: estargz.Footer
    toc_bytes: bytes


async def fetch_toc(client: "RegistryClient", reference: Reference, descriptor: Descriptor,
                    max_toc_size: int = estargz.toc.DEFAULT_MAX_TOC_SIZE) -> FetchedToc:
    """The layer's footer and TOC: one request for the blob's tail, which holds both when
    the TOC is under TAIL_BYTES, else a second one for the TOC. NotLazy when the blob
    has no footer, its TOC is too large or the manifest vouches for none."""
    digest, size = descriptor.digest, descriptor.size
    try:
        tail_offset = tail_start(descriptor, max_toc_size)
        tail_length = size - tail_offset
        tail = await fetch_in_parts(client, reference, digest, tail_offset, tail_length)
        footer = estargz.parse_footer(tail, size)
        if estargz.TOC_DIGEST_ANNOTATION not in descriptor.annotations:
            # A footer alone proves nothing: without a digest from the manifest the TOC
            # (and so every chunk digest) would be unverified.
            raise NotLazy(f"layer {digest} has an eStargz footer but no TOC digest annotation "
                          "to verify it against")
        if footer.toc_length > max_toc_size:
            raise NotLazy(f"layer {digest}: TOC of {footer.toc_length} bytes is too large")
        start = footer.toc_offset - tail_offset
        if start >= 0 and start + footer.toc_length <= len(tail):
            toc_bytes = tail[start:start + footer.toc_length]
        else:
            toc_bytes = await fetch_in_parts(client, reference, digest, footer.toc_offset,
                                             footer.toc_length)
    except estargz.FooterError:
        raise NotLazy(f"layer {digest} is not eStargz or zstd:chunked") from None
    except StoreError as exc:
        raise NotLazy(f"layer {digest}: registry: {exc}") from None
    return FetchedToc(footer, toc_bytes)


def parts_of(offset: int, length: int) -> list[tuple[int, int]]:
    """(offset, length) of each part `fetch_in_parts` requests for these bytes."""
    parts = max(1, min(TAIL_PARTS, length // TAIL_PART_BYTES))
    step = max(1, -(-length // parts))
    return [(start, min(step, offset + length - start))
            for start in range(offset, offset + length, step)] or [(offset, 0)]


async def fetch_in_parts(client: "RegistryClient", reference: Reference, digest: str,
                         offset: int, length: int) -> bytes:
    """Bytes offset..offset+length of the blob, in parts of at least TAIL_PART_BYTES
    requested at once (at most TAIL_PARTS)."""
    parts_asked = [asyncio.ensure_future(client.fetch_range(reference, digest, start, size))
                   for start, size in parts_of(offset, length)]
    try:
        return b"".join(await asyncio.gather(*parts_asked))
    except BaseException:
        for part in parts_asked:  # one failed: the others are not wanted
            part.cancel()
        raise


def tail_start(descriptor: Descriptor, max_toc_size: int) -> int:
    """Where the first request for a layer's footer and TOC starts: at the TOC when the
    descriptor says where that is, so that nothing before it comes along and a TOC
    larger than TAIL_BYTES takes one request too; else TAIL_BYTES before the end. The
    manifest's digest covers the annotation, and the TOC is checked against its own
    digest wherever it was found; a position that cannot hold a TOC of at most
    `max_toc_size` bytes and the footer's frame is not followed."""
    size = descriptor.size
    footer_frame = max(ZSTD_FOOTER_SIZE + 8, MAX_FOOTER_SIZE)  # any footer, whole
    for key in _TOC_POSITION_ANNOTATIONS:
        offset = descriptor.annotations.get(key, "").partition(":")[0]
        if offset.isascii() and offset.isdigit() and (
                size - footer_frame - max_toc_size <= int(offset) <= size - footer_frame):
            return int(offset)
    return max(0, size - max(MAX_FOOTER_SIZE, TAIL_BYTES))


async def open_remote_layer(client: "RegistryClient", source: LayerSource,
                            max_toc_size: int = estargz.toc.DEFAULT_MAX_TOC_SIZE, *,
                            index_path: str | None = None,
                            descriptor: Descriptor | None = None,
                            ahead: "TocAhead | None" = None,
                            builder: IndexBuilder | None = None) -> RemoteLayer:
    """Fetch and verify the layer's TOC and index it (at `index_path` to keep the
    index); raise NotLazy when it cannot be served lazily. `descriptor`: the layer's,
    if the caller has read the manifest already. With `ahead`, the manifest and TOC
    come from what it fetched (or fetches) for the whole image. `builder`: the
    template the processes that build indexes are forked from (lazy.index_build)."""
    if descriptor is None:
        found = await (ahead.find_layer(source) if ahead is not None
                       else find_layer(client, source))
        descriptor = found.descriptor
    if ahead is not None:
        fetched = await ahead.toc(source.reference, descriptor)
    else:
        fetched = await fetch_toc(client, source.reference, descriptor, max_toc_size)
    toc_digest = descriptor.annotations[estargz.TOC_DIGEST_ANNOTATION]
    try:
        built = await build_index(fetched.footer, fetched.toc_bytes, toc_digest, max_toc_size,
                                  index_path=index_path, builder=builder)
    except estargz.FormatError as exc:
        raise NotLazy(f"layer {descriptor.digest}: {exc}") from None
    log.info("layer %s: TOC verified, %s", descriptor.digest, built.describe())
    return RemoteLayer(source, descriptor, toc_digest, fetched.footer, fetched.toc_bytes,
                       built.layer)
