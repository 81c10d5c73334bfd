"""The TOCs of an image's layers, fetched all at once when its first layer is mounted.

containerd prepares an image's layers one after another, and each lazy mount waits for
its layer's manifest, footer and TOC: round trips and the TOC's transfer, per layer.
The first mount of an image finds every layer in the manifest, so it starts fetching
all their TOCs at once; the mounts that follow find theirs fetched or on the way.
Only bytes are fetched ahead: each mount still verifies its TOC against the TOC digest
of its own descriptor. Manifests named by digest are kept for a while too (a digest
names one content), so the image's further layers need no manifest request.

What no mount claims within KEEP_SECONDS is dropped: layers whose snapshots existed
already cost memory only that long.
"""

import asyncio
import logging
import weakref
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import estargz
from oci.manifest import Descriptor, Manifest, ManifestError, parse_manifest
from oci.reference import Reference
from oci.store import StoreError

from .layer_source import LayerSource, NotLazy
from .remote import FetchedToc, FoundLayer, Manifests, fetch_manifests, fetch_toc, layer_in

if TYPE_CHECKING:
    from oci.registry import RegistryClient

log = logging.getLogger(__name__)
T = TypeVar("T")
KEEP_SECONDS = 120.0
MAX_LAYERS_AHEAD = 64  # TOCs held at once for one image, at most
BlobKey = tuple[str, str, str]  # registry, repository, digest


def _key(reference: Reference, digest: str) -> BlobKey:
    return reference.registry, reference.repository, digest


def _failed(task: asyncio.Task[Any]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


class TocAhead:
    def __init__(self, client: "RegistryClient",
                 max_toc_size: int = estargz.toc.DEFAULT_MAX_TOC_SIZE,
                 keep_seconds: float = KEEP_SECONDS):
        self.client = client
        self.max_toc_size = max_toc_size
        self.keep_seconds = keep_seconds
        self._manifests: dict[BlobKey, asyncio.Task[Manifests]] = {}
        self._tocs: dict[BlobKey, asyncio.Task[FetchedToc]] = {}

    def _start(self, table: dict[BlobKey, asyncio.Task[T]], key: BlobKey,
               work: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(work())
        # A fetch nobody awaits must not log "exception never retrieved".
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        table[key] = task
        # A weak reference: once a mount has claimed the task (and its TOC bytes), the
        # timer must not keep them alive until it fires.
        asyncio.get_running_loop().call_later(self.keep_seconds, self._expire, table, key,
                                              weakref.ref(task))
        return task

    @staticmethod
    def _expire(table: dict[BlobKey, asyncio.Task[Any]], key: BlobKey,
                ref: "weakref.ref[asyncio.Task[Any]]") -> None:
        task = ref()
        if task is not None and table.get(key) is task:
            del table[key]

    async def find_layer(self, source: LayerSource) -> FoundLayer:
        """The layer's descriptor and its manifest's. The first mount of a manifest
        named by digest starts the TOC fetches of all its lazy layers."""
        try:
            manifests, first = await self._manifests_of(source)
        except (StoreError, ManifestError) as exc:
            raise NotLazy(f"cannot read the manifest of {source.reference}: {exc}") from None
        found = layer_in(manifests, source)
        if first:
            for manifest, _ in manifests:
                if found.descriptor in manifest.layers:
                    self._fetch_ahead(source.reference, manifest.layers)
        return found

    async def image_layers(self, source: LayerSource) -> list[Descriptor]:
        """The layers of the manifest that lists the source's layer, as `find_layer`
        finds it (so a first call starts the TOC fetches)."""
        found = await self.find_layer(source)
        manifests, _ = await self._manifests_of(source)
        return next(m.layers for m, d in manifests if d.digest == found.manifest.digest)

    async def _manifests_of(self, source: LayerSource) -> tuple[Manifests, bool]:
        """The manifests, and whether this call is the first to ask for them."""
        if not source.manifest_digest:  # a tag may move: asked each time, nothing ahead
            return await fetch_manifests(self.client, source), False
        key = _key(source.reference, source.manifest_digest)
        task = self._manifests.get(key)
        first = task is None or _failed(task)
        if task is None or first:
            task = self._start(self._manifests, key,
                               lambda: fetch_manifests(self.client, source))
        return await asyncio.shield(task), first

    def remember(self, reference: Reference, data: bytes, media_type: str,
                 digest: str) -> None:
        """An image manifest the registry client has just read for a pull (`digest`
        checked against `data`): kept as if read here, so the pull's announcement
        (lazy.pull_ahead) finds its layers without asking the registry again, a round
        trip before any TOC is requested. An index is not kept: pulls name the platform
        manifest, and the mounts' labels too."""
        key = _key(reference, digest)
        known = self._manifests.get(key)
        if known is not None and not _failed(known):
            return
        try:
            parsed = parse_manifest(data, media_type)
        except ManifestError:
            return  # the pull reports it
        if not isinstance(parsed, Manifest):
            return
        manifests: Manifests = [(parsed, Descriptor(media_type, digest, len(data)))]

        async def read_already() -> Manifests:
            return manifests
        self._start(self._manifests, key, read_already)

    def _fetch_ahead(self, reference: Reference, layers: list[Descriptor]) -> None:
        lazy = [d for d in layers if estargz.TOC_DIGEST_ANNOTATION in d.annotations]
        for descriptor in lazy[:MAX_LAYERS_AHEAD]:
            key = _key(reference, descriptor.digest)
            if key not in self._tocs:  # (another image's mount may have started it)
                self._start(self._tocs, key, lambda d=descriptor: fetch_toc(
                    self.client, reference, d, self.max_toc_size))

    async def toc(self, reference: Reference, descriptor: Descriptor) -> FetchedToc:
        """The layer's footer and TOC bytes: the ones fetched ahead (claimed: a later mount
        of the same blob fetches again), or fetched now if none were or that fetch failed
        (the registry may be back)."""
        task = self._tocs.pop(_key(reference, descriptor.digest), None)
        if task is not None:
            try:
                return await task
            except (NotLazy, StoreError) as exc:
                log.info("layer %s: TOC fetched ahead failed (%s); fetching it again",
                         descriptor.digest, exc)
        return await fetch_toc(self.client, reference, descriptor, self.max_toc_size)
