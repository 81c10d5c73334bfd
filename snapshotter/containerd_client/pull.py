"""Pull an image into containerd and unpack it with the remote-snapshot handshake.

What stargz-snapshotter's `ctr-remote rpull` does with containerd's Go client, done
here over containerd's gRPC API with lazypull's own registry client:

1. resolve the reference (an index to the platform's manifest) and fetch the
   manifest and config from the registry, verified against their digests;
2. under a lease, write index, manifest and config into containerd's content store
   with containerd's garbage-collection and distribution-source labels;
3. for each layer, unless its chain's snapshot exists: Prepare an extraction snapshot
   with `containerd.io/snapshot.ref` = chainID and the CRI and stargz layer labels.
   ALREADY_EXISTS means the snapshotter mounted the layer remotely (lazily) and
   committed the chainID itself; mounts mean it did not, so the layer blob is
   downloaded into the content store, applied by containerd's diff service onto the
   mounts and committed as the chainID (the key is removed on any failure);
4. label the config with `containerd.io/gc.ref.snapshot.<snapshotter>` = top chainID,
   create or update the image record, and let the lease go.
"""

import asyncio
import contextlib
import json
import platform as host_platform
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from oci import mediatypes as mt
from oci.digest import validate_digest
from oci.manifest import Descriptor, Index, Manifest, ManifestError, parse_manifest
from oci.reference import Reference
from oci.store import NotFoundError

from . import labels as lb
from .client import ContainerdClient, ContentDescriptor
from .errors import AlreadyExists, ContainerdError, InvalidArgument

MAX_CONFIG_SIZE = 64 << 20
PREPARE_ATTEMPTS = 3  # as containerd's unpacker: a key can collide, a chainID vanish


class Registry(Protocol):
    """What a pull reads from the registry: oci.registry.RegistryClient, or the
    service's relay through the FUSE manager (snapshotter.relayed_registry). Not the
    client itself here, so that loading the pull does not load an HTTP client."""

    async def get_manifest(self, reference: Reference,
                           tag_or_digest: str | None = None) -> tuple[bytes, str, str]: ...

    def stream_blob(self, reference: Reference,
                    descriptor: Descriptor) -> AsyncIterator[bytes]: ...


class PullError(Exception):
    """The image cannot be pulled as it is (bad config, wrong diff ID, ...)."""


class PlatformNotFoundError(NotFoundError):
    """The index has no manifest for the requested platform."""


class SnapshotterNotFoundError(PullError):
    """containerd has no snapshotter of that name loaded."""


class LayerSource(StrEnum):
    REMOTE = "remote"  # the snapshotter mounted it lazily: never downloaded by us
    FETCHED = "fetched+applied"  # downloaded into the content store, applied, committed
    PRESENT = "present"  # its snapshot was already there


# -- platforms ---------------------------------------------------------------------------

_ARCH = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm",
         "armel": "arm", "i386": "386", "i686": "386"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {text!r}: use OS/ARCH[/VARIANT]")
        arch = _ARCH.get(parts[1], parts[1])
        return cls(parts[0], arch, parts[2] if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> "Platform":
        machine = host_platform.machine().lower()
        arch = _ARCH.get(machine, machine)
        variant = ""
        if machine.startswith("armv") and machine[4:5].isdigit():
            arch, variant = "arm", f"v{machine[4]}"
        return cls(host_platform.system().lower() or "linux", arch, variant)

    def matches(self, raw: Mapping[str, Any] | None) -> bool:
        """Whether an index entry's platform is this one (containerd's matching, simplified:
        an unstated variant matches any, and arm64 without a variant means arm64/v8)."""
        if not raw:
            return False
        theirs_arch = str(raw.get("architecture", ""))
        if raw.get("os") != self.os or _ARCH.get(theirs_arch, theirs_arch) != self.architecture:
            return False
        mine, theirs = self.variant, str(raw.get("variant") or "")
        if self.architecture == "arm64":
            return (mine or "v8") == (theirs or "v8")
        return not mine or not theirs or mine == theirs

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


def choose_manifest(index: Index, wanted: Platform) -> Descriptor:
    for entry in index.manifests:
        if entry.media_type in mt.MANIFESTS and wanted.matches(entry.platform):
            return entry
    offered = ", ".join(e.platform_string for e in index.manifests if e.platform) or "none"
    raise PlatformNotFoundError(f"the image has no manifest for platform {wanted} "
                                f"(it has: {offered}); see --platform")


# -- plan and results --------------------------------------------------------------------


@dataclass
class PullPlan:
    """What was resolved in the registry: everything but the layer blobs."""

    name: str  # the image record's name, normalized as containerd names images
    reference: Reference
    platform: Platform
    top: ContentDescriptor  # the index if there is one, else the manifest
    index: tuple[bytes, Index] | None
    manifest_descriptor: ContentDescriptor
    manifest_bytes: bytes
    manifest: Manifest
    config_bytes: bytes
    diff_ids: list[str]
    chain_ids: list[str]

    @property
    def layers(self) -> list[Descriptor]:
        return self.manifest.layers

    @property
    def top_chain_id(self) -> str:
        return self.chain_ids[-1] if self.chain_ids else ""


@dataclass
class LayerResult:
    index: int
    digest: str
    size: int
    diff_id: str
    chain_id: str
    source: LayerSource
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "digest": self.digest, "size": self.size,
                "diff_id": self.diff_id, "chain_id": self.chain_id, "source": str(self.source),
                "seconds": round(self.seconds, 3)}


@dataclass
class PullResult:
    name: str
    snapshotter: str
    platform: str
    target: ContentDescriptor
    manifest_digest: str
    config_digest: str
    chain_id: str
    image_created: bool
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, source: LayerSource) -> int:
        return sum(1 for layer in self.layers if layer.source is source)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "snapshotter": self.snapshotter, "platform": self.platform,
                "target": {"mediaType": self.target.media_type, "digest": self.target.digest,
                           "size": self.target.size},
                "manifest": self.manifest_digest, "config": self.config_digest,
                "chain_id": self.chain_id, "image_created": self.image_created,
                "layers": [layer.to_json() for layer in self.layers],
                "seconds": round(self.seconds, 3)}


class PullProgress:
    """Told what happens during a pull; the default does nothing."""

    def manifest_chosen(self, name: str, descriptor: ContentDescriptor,
                        manifest: Manifest) -> None:
        """The image's (platform) manifest is known; its config is still to be read."""

    def resolved(self, plan: PullPlan) -> None:
        pass

    def prepared(self, index: int, key: str, labels: Mapping[str, str], remote: bool) -> None:
        """Prepare answered: ALREADY_EXISTS (remote) or mounts (the active snapshot `key`
        now exists and is about to be filled)."""

    def layer_done(self, layer: LayerResult) -> None:
        pass


# -- the pull ----------------------------------------------------------------------------


class Puller:
    def __init__(self, containerd: ContainerdClient, registry: Registry, *,
                 snapshotter: str = "lazypull", platform: Platform | None = None,
                 progress: PullProgress | None = None):
        self.containerd = containerd
        self.registry = registry
        self.snapshotter = snapshotter
        self.platform = platform or Platform.host()
        self.progress = progress or PullProgress()

    async def pull(self, ref: str | Reference) -> PullResult:
        started = time.monotonic()
        reference = ref if isinstance(ref, Reference) else Reference.parse(ref)
        plan = await self.resolve(reference)
        self.progress.resolved(plan)
        await self._check_snapshotter(plan)
        async with self.containerd.lease():
            await self._store_metadata(plan)
            layers = []
            for i in range(len(plan.layers)):
                layer = await self._unpack_layer(plan, i)
                layers.append(layer)
                self.progress.layer_done(layer)
            if plan.top_chain_id:
                await self.containerd.update_content_labels(
                    plan.manifest.config.digest,
                    {lb.GC_SNAPSHOT_PREFIX + self.snapshotter: plan.top_chain_id})
            _, created = await self.containerd.create_or_update_image(plan.name, plan.top)
        return PullResult(name=plan.name, snapshotter=self.snapshotter,
                          platform=str(plan.platform), target=plan.top,
                          manifest_digest=plan.manifest_descriptor.digest,
                          config_digest=plan.manifest.config.digest,
                          chain_id=plan.top_chain_id, image_created=created, layers=layers,
                          seconds=time.monotonic() - started)

    # -- resolving ------------------------------------------------------------------------

    async def resolve(self, reference: Reference) -> PullPlan:
        data, media_type, digest = await self.registry.get_manifest(reference)
        top = ContentDescriptor(media_type, digest, len(data))
        try:
            doc = parse_manifest(data, media_type)
            index = None
            manifest_bytes, manifest_descriptor = data, top
            if isinstance(doc, Index):
                index = (data, doc)
                entry = choose_manifest(doc, self.platform)
                manifest_bytes, mtype, mdigest = await self.registry.get_manifest(
                    reference, entry.digest)
                manifest_descriptor = ContentDescriptor(mtype, mdigest, len(manifest_bytes))
                doc = parse_manifest(manifest_bytes, mtype)
                if not isinstance(doc, Manifest):
                    raise PullError(f"{reference}: index entry {mdigest} is not an image "
                                    "manifest")
        except ManifestError as exc:
            raise PullError(f"{reference}: {exc}") from None
        manifest, name = doc, lb.image_name(reference)
        self.progress.manifest_chosen(name, manifest_descriptor, manifest)
        config_bytes = await self._read_config(reference, manifest.config)
        diff_ids = _diff_ids(config_bytes, len(manifest.layers), manifest.config.digest)
        return PullPlan(name=name, reference=reference,
                        platform=self.platform, top=top, index=index,
                        manifest_descriptor=manifest_descriptor, manifest_bytes=manifest_bytes,
                        manifest=manifest, config_bytes=config_bytes, diff_ids=diff_ids,
                        chain_ids=lb.chain_ids(diff_ids))

    async def _read_config(self, reference: Reference, config: Descriptor) -> bytes:
        if config.size > MAX_CONFIG_SIZE:
            raise PullError(f"image config {config.digest} is {config.size} bytes, more than "
                            f"the {MAX_CONFIG_SIZE} allowed")
        parts = [chunk async for chunk in self.registry.stream_blob(reference, config)]
        return b"".join(parts)

    async def _check_snapshotter(self, plan: PullPlan) -> None:
        if not plan.chain_ids:
            return
        try:
            await self.containerd.stat_snapshot(self.snapshotter, plan.top_chain_id)
        except InvalidArgument as exc:
            if "not loaded" in str(exc):
                raise SnapshotterNotFoundError(
                    f"containerd has no snapshotter {self.snapshotter!r} ({exc})") from None
            raise

    # -- content ----------------------------------------------------------------------

    def _source_key(self, plan: PullPlan) -> str:
        return lb.distribution_source_key(plan.reference.registry)

    async def _put(self, plan: PullPlan, kind: str, descriptor: ContentDescriptor,
                   data: AsyncIterator[bytes] | list[bytes],
                   labels: Mapping[str, str]) -> bool:
        """Write a blob with its labels; if containerd has it already, set the labels on
        it (the distribution source merged with the repositories it names). True if
        the bytes were written."""
        key, repo = self._source_key(plan), plan.reference.repository
        written = await self.containerd.write_content(
            f"{kind}-{descriptor.digest}", descriptor.digest, descriptor.size, data,
            {**labels, key: repo})
        if not written:
            info = await self.containerd.content_info(descriptor.digest)
            existing = info.labels.get(key) if info is not None else None
            await self.containerd.update_content_labels(
                descriptor.digest, {**labels, key: lb.merge_distribution_source(existing, repo)})
        return written

    async def _store_metadata(self, plan: PullPlan) -> None:
        """Config, manifest, then index: each object lands after what it references."""
        config = plan.manifest.config
        await self._put(plan, "config", ContentDescriptor(config.media_type, config.digest,
                                                          config.size),
                        [plan.config_bytes], {})
        await self._put(plan, "manifest", plan.manifest_descriptor, [plan.manifest_bytes],
                        lb.manifest_gc_labels(config.digest, [d.digest for d in plan.layers]))
        if plan.index is not None:
            data, index = plan.index
            await self._put(plan, "index", plan.top, [data],
                            lb.index_gc_labels([m.digest for m in index.manifests]))

    # -- unpacking --------------------------------------------------------------------

    async def _unpack_layer(self, plan: PullPlan, i: int) -> LayerResult:
        started = time.monotonic()
        layer, diff_id, chain_id = plan.layers[i], plan.diff_ids[i], plan.chain_ids[i]
        parent = plan.chain_ids[i - 1] if i else ""
        sn = self.snapshotter

        def result(source: LayerSource) -> LayerResult:
            return LayerResult(i, layer.digest, layer.size, diff_id, chain_id, source,
                               time.monotonic() - started)

        if await self.containerd.stat_snapshot(sn, chain_id) is not None:
            return result(LayerSource.PRESENT)
        # As containerd's unpacker: the layer's own containerd.io/snapshot/* annotations,
        # then the labels a remote snapshotter reads.
        labels = {k: v for k, v in layer.annotations.items() if lb.is_inherited(k)}
        labels.update(lb.snapshot_labels(plan.name, plan.manifest_descriptor.digest,
                                         [d.digest for d in plan.layers], i, chain_id))
        key = ""
        for _attempt in range(PREPARE_ATTEMPTS):
            key = lb.unpack_key(chain_id)
            try:
                mounts = await self.containerd.prepare_snapshot(sn, key, parent, labels)
                break
            except AlreadyExists:
                # The snapshotter (or a concurrent pull) made the chainID's snapshot.
                if await self.containerd.stat_snapshot(sn, chain_id) is not None:
                    self.progress.prepared(i, key, labels, True)
                    return result(LayerSource.REMOTE)
        else:
            raise PullError(f"layer {i} ({layer.digest}): Prepare kept answering ALREADY_EXISTS "
                            f"but snapshot {chain_id} does not exist")
        self.progress.prepared(i, key, labels, False)
        try:
            await self._fetch_layer(plan, layer)
            applied = await self.containerd.apply(
                ContentDescriptor(layer.media_type, layer.digest, layer.size), mounts)
            if applied.digest != diff_id:
                raise PullError(f"layer {i} ({layer.digest}) unpacks to {applied.digest}, but "
                                f"the image config says its diff ID is {diff_id}")
            try:
                await self.containerd.commit_snapshot(sn, chain_id, key, labels)
            except AlreadyExists:  # committed meanwhile by a concurrent pull: use that one
                await self._remove(key)
                return result(LayerSource.PRESENT)
        except BaseException:
            await asyncio.shield(self._remove(key))
            raise
        await self.containerd.update_content_labels(layer.digest, {lb.UNCOMPRESSED: diff_id})
        return result(LayerSource.FETCHED)

    async def _fetch_layer(self, plan: PullPlan, layer: Descriptor) -> None:
        """Download the layer blob into containerd's content store, which checks its digest
        and size on commit; if containerd has it already, nothing is downloaded."""
        descriptor = ContentDescriptor(layer.media_type, layer.digest, layer.size)
        await self._put(plan, "layer", descriptor,
                        self.registry.stream_blob(plan.reference, layer), {})

    async def _remove(self, key: str) -> None:
        # If this fails too, containerd's GC removes the orphan once the lease is gone.
        with contextlib.suppress(ContainerdError):
            await self.containerd.remove_snapshot(self.snapshotter, key)


def _diff_ids(config_bytes: bytes, layer_count: int, digest: str) -> list[str]:
    try:
        config = json.loads(config_bytes)
        diff_ids = config["rootfs"]["diff_ids"]
        if not isinstance(diff_ids, list):
            raise TypeError
        for d in diff_ids:
            validate_digest(d)
    except (ValueError, KeyError, TypeError, RecursionError):
        raise PullError(f"image config {digest} has no valid rootfs.diff_ids") from None
    if len(diff_ids) != layer_count:
        raise PullError(f"image config {digest} lists {len(diff_ids)} diff IDs for "
                        f"{layer_count} layers")
    return list(diff_ids)


async def pull(containerd: ContainerdClient, registry: Registry, ref: str, *,
               snapshotter: str = "lazypull", platform: str | Platform | None = None,
               progress: PullProgress | None = None) -> PullResult:
    """Pull `ref` into containerd and unpack it for `snapshotter` (see the module doc)."""
    if isinstance(platform, str):
        platform = Platform.parse(platform)
    puller = Puller(containerd, registry, snapshotter=snapshotter, platform=platform,
                    progress=progress)
    return await puller.pull(ref)


__all__: Sequence[str] = ["LayerResult", "LayerSource", "Platform", "PlatformNotFoundError",
                          "PullError", "PullPlan", "PullProgress", "PullResult", "Puller",
                          "Registry", "SnapshotterNotFoundError", "pull"]
