"""Convert one image (a manifest, or every chosen platform of an index).

Per platform manifest:
1. list every source layer's paths into a file (from the cache, or by downloading and
   decompressing it, checking its diff_id against the config);
2. decide which hot files each layer places first;
3. convert the layers in parallel (or take them from the cache, or pass through
   layers converted before with the same options), and push them;
4. rewrite the config's diff_ids and the manifest's layers, push both.
The tag (or the index that carries it) is pushed last, so a failure never leaves
a tag that points at a half-pushed image.
"""

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import estargz
from estargz import BuildOptions, Compression
from estargz.prefetch_region import (
    MAX_REGION_RANGES,
    PREFETCH_REGION_ANNOTATION,
    encode_region,
    region_to_fetch,
)
from estargz.read_ranges import READ_RANGES_ANNOTATION, ReadRanges, encode_read_ranges
from estargz.reader import read_footer
from oci import mediatypes as mt
from oci.digest import DigestMismatchError, sha256_of
from oci.image_config import ConfigError, check_config_size, diff_ids, parse_config
from oci.manifest import Descriptor, Index, Manifest, ManifestError, parse_manifest
from oci.store import ImageStore

from . import hotfiles
from .access_profile import AccessProfile, ImageProfile
from .cache import ConversionCache
from .listing import Listing, write_listing
from .patterns import normalize_path
from .progress import NoProgress, Progress
from .source_layer import LayerFormatError, decompress_layer, iter_paths

T = TypeVar("T")
CONVERSION_ANNOTATION = "dev.lazypull.conversion"
# Annotations of an earlier conversion that must not survive onto a new blob.
_STALE_ANNOTATIONS = (
    estargz.TOC_DIGEST_ANNOTATION,
    estargz.UNCOMPRESSED_SIZE_ANNOTATION,
    READ_RANGES_ANNOTATION,
    "io.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-position",
    CONVERSION_ANNOTATION,
    PREFETCH_REGION_ANNOTATION,
)
_ATTESTATION = "attestation-manifest"
# A source blob that fails its digest is downloaded once more: a proxy or cache on the
# way may have handed out bad bytes once. Twice is not chance.
_DOWNLOAD_ATTEMPTS = 2


class ConversionError(Exception):
    """A layer or manifest that cannot be converted; the message names image and layer."""


@dataclass(frozen=True)
class ConvertOptions:
    compression: Compression = Compression.GZIP
    chunk_size: int = estargz.writer.DEFAULT_CHUNK_SIZE
    level: int | None = None
    prefetch_patterns: tuple[str, ...] = ()
    profile: AccessProfile | None = None
    platforms: tuple[str, ...] = ()  # os/arch[/variant]; empty = every platform
    jobs: int = 2  # layers converted at once
    cache_dir: str | None = None  # None: no cache
    workdir: str | None = None

    def fingerprint(self) -> str:
        """What, besides the hot files, decides the bytes of a converted layer."""
        level = BuildOptions(compression=self.compression, level=self.level).effective_level
        return f"{self.compression}:chunk={self.chunk_size}:level={level}:v1"


@dataclass
class LayerReport:
    index: int
    source_digest: str
    digest: str
    media_type: str
    size: int
    uncompressed_size: int | None
    toc_digest: str | None
    prefetch_size: int | None
    hot_files: int
    passthrough: bool = False
    cached: bool = False
    seconds: float = 0.0


@dataclass
class ManifestReport:
    platform: str
    source_digest: str
    digest: str
    size: int
    media_type: str
    layers: list[LayerReport]
    missing_hot_files: list[str] = field(default_factory=list)


@dataclass
class ConvertReport:
    source: str
    destination: str
    digest: str
    media_type: str
    tag: str | None
    manifests: list[ManifestReport]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def layer_settings(fingerprint: str, hot: list[str]) -> str:
    """How a layer was converted: recorded on it, so converting it again with the
    same settings passes it through."""
    hot_digest = hashlib.sha256("\n".join(hot).encode()).hexdigest()
    return f"{fingerprint}:hot=sha256:{hot_digest}"


def cache_key(source_digest: str, settings: str) -> str:
    """Names a converted layer by everything that decides its bytes."""
    return f"{source_digest}|{settings}"


class _LayerWork:
    """Files and facts of one source layer while its manifest converts."""

    def __init__(self, index: int, descriptor: Descriptor, diff_id: str):
        self.index = index
        self.descriptor = descriptor
        self.diff_id = diff_id
        self.tar_path: str | None = None


class ImageConverter:
    def __init__(self, source: ImageStore, destination: ImageStore, options: ConvertOptions,
                 progress: Progress | None = None):
        self.source = source
        self.destination = destination
        self.options = options
        self.progress = progress or NoProgress()
        self.cache = ConversionCache(options.cache_dir) if options.cache_dir else None
        self.limit = asyncio.Semaphore(max(1, options.jobs))
        self.workdir = ""

    async def run(self) -> ConvertReport:
        started = time.monotonic()
        tag = self.destination.default_object or "latest"
        if tag.startswith("sha256:"):
            raise ConversionError(f"{self.destination.name}: a destination needs a tag, "
                                  "not a digest")
        self.workdir = tempfile.mkdtemp(prefix="lazypull-convert-", dir=self.options.workdir)
        try:
            wanted = self.source.default_object or "latest"
            data, media_type, digest = await self.source.get_manifest(wanted)
            try:
                parsed = parse_manifest(data, media_type)
            except ManifestError as exc:
                raise ConversionError(f"{self.source.name}: {exc}") from None
            if isinstance(parsed, Index):
                reports, top = await self._convert_index(parsed, tag)
            else:
                report = await self._convert_manifest(parsed, digest, "", tag)
                reports, top = [report], (report.digest, report.media_type)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return ConvertReport(
            source=self.source.name,
            destination=self.destination.name,
            digest=top[0],
            media_type=top[1],
            tag=tag,
            manifests=reports,
            seconds=round(time.monotonic() - started, 3),
        )

    # -- index -------------------------------------------------------------

    async def _convert_index(self, index: Index, tag: str) -> tuple[list[ManifestReport],
                                                                    tuple[str, str]]:
        reports: list[ManifestReport] = []
        children: list[Descriptor] = []
        for child in index.manifests:
            if child.media_type in mt.INDEXES:
                raise ConversionError(f"{self.source.name}: nested index {child.digest} "
                                      "is not supported")
            if child.annotations.get("vnd.docker.reference.type") == _ATTESTATION:
                self.progress.message(f"dropping attestation manifest {child.digest} "
                                      "(it describes the unconverted image)")
                continue
            if not child.matches_platforms(self.options.platforms):
                continue
            data, media_type, digest = await self.source.get_manifest(child.digest)
            try:
                manifest = parse_manifest(data, media_type)
            except ManifestError as exc:
                raise ConversionError(f"{self.source.name}@{child.digest}: {exc}") from None
            if not isinstance(manifest, Manifest):
                raise ConversionError(f"{self.source.name}@{child.digest}: not a manifest")
            report = await self._convert_manifest(manifest, digest, child.platform_string, None)
            reports.append(report)
            children.append(Descriptor(report.media_type, report.digest, report.size,
                                       annotations=dict(child.annotations),
                                       platform=child.platform, extra=dict(child.extra)))
        if not children:
            raise ConversionError(f"{self.source.name}: no platform matches "
                                  f"{', '.join(self.options.platforms)}")
        index_type = index.media_type
        if any(c.media_type == mt.OCI_MANIFEST for c in children):
            index_type = mt.OCI_INDEX
        new_index = Index(index_type, children, dict(index.annotations), dict(index.extra))
        digest = await self.destination.put_manifest(new_index.to_bytes(), index_type, tag)
        return reports, (digest, index_type)

    # -- one platform ------------------------------------------------------

    async def _convert_manifest(self, manifest: Manifest, source_digest: str, platform: str,
                                tag: str | None) -> ManifestReport:
        image = f"{self.source.name}@{source_digest}"
        config = await self._read_config(manifest, image)
        try:
            layer_diff_ids = diff_ids(config, manifest, image)
        except ConfigError as exc:
            raise ConversionError(str(exc)) from None
        works = [_LayerWork(i, d, layer_diff_ids[i]) for i, d in enumerate(manifest.layers)]
        for work in works:
            self._check_layer_type(image, work)
        listings = await _all_or_none(*(self._list_layer(image, w) for w in works))
        plan = await self._plan(works, listings, source_digest)
        to_oci = self.options.compression is Compression.ZSTD
        layer_type = self._layer_media_type(manifest.media_type)
        read = _read_ranges(self._profile_for(source_digest))
        results = await _all_or_none(
            *(self._convert_layer(image, w, plan.per_layer[w.index], layer_type, read)
              for w in works)
        )
        config["rootfs"]["diff_ids"] = [diff_id for _, _, diff_id in results]  # a dict: checked
        config_bytes = json.dumps(config, separators=(",", ":")).encode()
        config_type = mt.OCI_CONFIG if to_oci else manifest.config.media_type
        config_desc = Descriptor(config_type, sha256_of(config_bytes), len(config_bytes),
                                 annotations=dict(manifest.config.annotations))
        await self._push_bytes(config_desc, config_bytes)
        manifest_type = mt.OCI_MANIFEST if to_oci else manifest.media_type
        new_manifest = Manifest(manifest_type, config_desc, [d for d, _, _ in results],
                                dict(manifest.annotations), dict(manifest.extra))
        data = new_manifest.to_bytes()
        digest = await self.destination.put_manifest(data, manifest_type, tag)
        return ManifestReport(platform=platform or _config_platform(config),
                              source_digest=source_digest, digest=digest, size=len(data),
                              media_type=manifest_type, layers=[r for _, r, _ in results],
                              missing_hot_files=plan.missing)

    async def _read_config(self, manifest: Manifest, image: str) -> dict[str, Any]:
        try:
            check_config_size(manifest, image)
        except ConfigError as exc:
            raise ConversionError(str(exc)) from None
        path = os.path.join(self.workdir, manifest.config.digest[7:] + ".config")
        await self._save_blob(manifest.config, path)
        with open(path, "rb") as f:
            data = f.read()
        try:
            return parse_config(data, manifest, image)
        except ConfigError as exc:
            raise ConversionError(str(exc)) from None

    def _check_layer_type(self, image: str, work: _LayerWork) -> None:
        d = work.descriptor
        where = f"{image}: layer {work.index} ({d.digest})"
        if d.media_type in mt.FOREIGN_LAYERS or d.urls:
            raise ConversionError(f"{where} is a foreign layer ({d.media_type}); "
                                  "it cannot be redistributed, so it cannot be converted")
        if d.media_type not in mt.LAYERS:
            raise ConversionError(f"{where} has unknown media type {d.media_type}")

    def _layer_media_type(self, manifest_type: str) -> str:
        if self.options.compression is Compression.ZSTD:
            return mt.OCI_LAYER_ZSTD
        return mt.DOCKER_LAYER_GZIP if manifest_type == mt.DOCKER_MANIFEST else mt.OCI_LAYER_GZIP

    # -- layers ------------------------------------------------------------

    def _path(self, work: _LayerWork, kind: str) -> str:
        return os.path.join(self.workdir, f"{work.descriptor.digest[7:23]}-{work.index}.{kind}")

    async def _download(self, work: _LayerWork) -> str:
        path = self._path(work, "src")
        await self._save_blob(work.descriptor, path,
                              f"layer {work.index} {work.descriptor.digest[7:19]}")
        return path

    async def _save_blob(self, descriptor: Descriptor, path: str, key: str | None = None
                         ) -> None:
        """Download a source blob into `path`, verified against its digest (showing
        progress under `key`)."""
        for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
            if key:
                self.progress.start(key, "download", descriptor.size)
            try:
                with open(path, "wb") as f:
                    async for piece in self.source.get_blob(descriptor):
                        await asyncio.to_thread(f.write, piece)
                        if key:
                            self.progress.advance(key, len(piece))
                break
            except DigestMismatchError as exc:
                if attempt == _DOWNLOAD_ATTEMPTS:
                    raise
                self.progress.message(f"{exc}; downloading it again")
        if key:
            self.progress.finish(key)

    async def _ensure_tar(self, image: str, work: _LayerWork) -> str:
        if work.tar_path:
            return work.tar_path
        src = await self._download(work)
        tar_path = self._path(work, "tar")
        where = f"{image}: layer {work.index} ({work.descriptor.digest})"
        try:
            diff_id, _ = await asyncio.to_thread(decompress_layer, src, work.descriptor.media_type,
                                                 tar_path)
        except LayerFormatError as exc:
            raise ConversionError(f"{where}: {exc}") from None
        finally:
            os.unlink(src)
        if diff_id != work.diff_id:
            raise ConversionError(f"{where}: uncompressed content is {diff_id} but the config "
                                  f"says {work.diff_id}")
        work.tar_path = tar_path
        return tar_path

    async def _list_layer(self, image: str, work: _LayerWork) -> Listing:
        """The layer's paths, in a file of the workdir."""
        digest = work.descriptor.digest
        path = self._path(work, "paths.gz")
        if self.cache and await asyncio.to_thread(self.cache.get_listing, digest, path):
            return Listing(path, digest)
        async with self.limit:
            tar_path = await self._ensure_tar(image, work)
            try:
                await asyncio.to_thread(write_listing, path, digest, iter_paths(tar_path))
            except estargz.FormatError as exc:
                raise ConversionError(f"{image}: layer {work.index} ({digest}): {exc}") from None
        if self.cache:
            await asyncio.to_thread(self.cache.put_listing, digest, path)
        return Listing(path, digest)

    def _profile_for(self, source_digest: str) -> ImageProfile | None:
        if self.options.profile is None:
            return None
        reference = getattr(self.source, "reference", None)  # registry stores have one
        repository = f"{reference.registry}/{reference.repository}" if reference else None
        return self.options.profile.for_image(repository, {source_digest})

    async def _plan(self, works: list[_LayerWork], listings: list[Listing],
                    source_digest: str) -> hotfiles.HotFilePlan:
        profile = self._profile_for(source_digest)
        layers = [hotfiles.LayerFiles(listing, frozenset({w.descriptor.digest, w.diff_id}))
                  for w, listing in zip(works, listings, strict=True)]
        # Reading the listings takes a while for large layers: off the event loop.
        return await asyncio.to_thread(hotfiles.plan, layers,
                                       list(self.options.prefetch_patterns), profile)

    async def _convert_layer(self, image: str, work: _LayerWork, hot: list[str],
                             media_type: str, read: ReadRanges | None = None
                             ) -> tuple[Descriptor, LayerReport, str]:
        started = time.monotonic()
        source = work.descriptor
        settings = layer_settings(self.options.fingerprint(), hot)
        key = cache_key(source.digest, settings)
        report = LayerReport(index=work.index, source_digest=source.digest, digest=source.digest,
                             media_type=source.media_type, size=source.size,
                             uncompressed_size=None, toc_digest=None, prefetch_size=None,
                             hot_files=len(hot))
        if source.annotations.get(CONVERSION_ANNOTATION) == settings:
            report.passthrough = True
            report.toc_digest = source.annotations.get(estargz.TOC_DIGEST_ANNOTATION)
            await self._copy_blob(source)
            report.seconds = round(time.monotonic() - started, 3)
            return source, report, work.diff_id
        async with self.limit:
            cached = self.cache.get_blob(key) if self.cache else None
            if cached is not None:
                report.cached = True
                blob_path, result = cached.path, cached.result
            else:
                blob_path, result = await self._build(image, work, hot, key)
        annotations = {k: v for k, v in source.annotations.items()
                       if k not in _STALE_ANNOTATIONS}
        annotations.update(result["annotations"])
        annotations[CONVERSION_ANNOTATION] = settings
        # Parts of large hot files the profile saw read: a prefetch fetches only those.
        layer_read = {path: read[path] for path in hot if read and path in read}
        if layer_read:
            annotations[READ_RANGES_ANNOTATION] = encode_read_ranges(layer_read)
        # ...and the region that leaves, so a node may request it before the TOC.
        region = await asyncio.to_thread(_prefetch_region, blob_path, result, layer_read)
        if 0 < len(region) <= MAX_REGION_RANGES:
            annotations[PREFETCH_REGION_ANNOTATION] = encode_region(region)
        descriptor = Descriptor(media_type, result["blob_digest"], result["blob_size"],
                                annotations=annotations)
        await self._push_file(descriptor, blob_path)
        if not report.cached and not self.cache:
            os.unlink(blob_path)
        report.digest, report.media_type = descriptor.digest, media_type
        report.size, report.uncompressed_size = descriptor.size, result["uncompressed_size"]
        report.toc_digest, report.prefetch_size = result["toc_digest"], result["prefetch_size"]
        report.seconds = round(time.monotonic() - started, 3)
        return descriptor, report, result["diff_id"]

    async def _build(self, image: str, work: _LayerWork, hot: list[str],
                     key: str) -> tuple[str, dict[str, Any]]:
        tar_path = await self._ensure_tar(image, work)
        out_path = self._path(work, "blob")
        options = BuildOptions(compression=self.options.compression,
                               chunk_size=self.options.chunk_size, level=self.options.level,
                               prioritized_files=hot)
        label = f"layer {work.index} {work.descriptor.digest[7:19]}"
        self.progress.start(label, "convert", os.path.getsize(tar_path))

        def run() -> estargz.BuildResult:
            with open(tar_path, "rb") as tar, open(out_path, "wb") as out:
                return estargz.build(tar, out, options)

        try:
            result = await asyncio.to_thread(run)
        except estargz.FormatError as exc:
            raise ConversionError(f"{image}: layer {work.index} ({work.descriptor.digest}): "
                                  f"{exc}") from None
        finally:
            os.unlink(tar_path)
            work.tar_path = None
        self.progress.finish(label, f"{result.blob_size / 1e6:.1f}MB")
        doc = asdict(result)
        doc["compression"] = str(result.compression)
        if self.cache:
            cached = self.cache.put_blob(key, out_path, doc)
            os.unlink(out_path)
            return cached.path, doc
        return out_path, doc

    # -- pushing -----------------------------------------------------------

    async def _push_file(self, descriptor: Descriptor, path: str) -> None:
        if not await self.destination.has_blob(descriptor):
            await self.destination.put_blob(descriptor, path)

    async def _push_bytes(self, descriptor: Descriptor, data: bytes) -> None:
        if await self.destination.has_blob(descriptor):
            return
        path = os.path.join(self.workdir, descriptor.digest[7:] + ".bytes")
        with open(path, "wb") as f:
            f.write(data)
        await self.destination.put_blob(descriptor, path)
        os.unlink(path)

    async def _copy_blob(self, descriptor: Descriptor) -> None:
        if await self.destination.has_blob(descriptor):
            return
        path = os.path.join(self.workdir, descriptor.digest[7:] + ".copy")
        await self._save_blob(descriptor, path)
        await self.destination.put_blob(descriptor, path)
        os.unlink(path)


async def _all_or_none(*coroutines: Awaitable[T]) -> list[T]:
    """Run the coroutines together. If one fails the others are cancelled before its
    error is raised: they must not go on using a work directory that is being removed."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _read_ranges(profile: ImageProfile | None) -> ReadRanges:
    """Path (as hot lists name it) -> the ranges the profile saw read of it."""
    if profile is None:
        return {}
    return {normalize_path(access.path): [tuple(r) for r in access.ranges]
            for access in profile.files if access.ranges}


def _config_platform(config: dict[str, Any]) -> str:
    text = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    return f"{text}/{config['variant']}" if config.get("variant") else text


def _prefetch_region(blob_path: str, result: dict[str, Any], read: ReadRanges
                     ) -> list[tuple[int, int]]:
    """The built blob's prefetch region (estargz.prefetch_region): up to its landmark,
    and with read ranges less the members they leave unread, which takes the TOC (read
    only up to MAX_TOC_JSON_BYTES: a conversion's memory stays the writer's)."""
    if not result.get("prefetch_size"):
        return []
    if not read:
        return [(0, result["prefetch_size"])]
    with estargz.FileSource.open(blob_path) as blob:
        footer = read_footer(blob)
        toc = blob.read_at(footer.toc_offset, footer.toc_length)
    return region_to_fetch(footer, toc, result["toc_digest"], estargz.toc.DEFAULT_MAX_TOC_SIZE,
                           read)
