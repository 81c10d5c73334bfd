"""Index every gzip layer of an image and publish the indexes as referrers.

Per platform manifest:
1. download each gzip layer once (verified against its digest), index it in one
   pass (checking its diff_id against the config), keep the index open;
2. mark the files an access profile names as hot, in the layer they are read from,
   and read each layer that holds hot files again, with extra checkpoints around
   them (so a prefetch of them fetches little else: gzindex/hotplan.py);
3. push one artifact: the index blobs as its layers, the manifest as its subject.
The image's manifests, configs, layers and tags are only read, never written: its
digest stays what it was. A layer shared by several platforms is indexed once.
"""

import asyncio
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import gzindex
from estargz.errors import FormatError
from oci import mediatypes as mt
from oci.access_profile import AccessProfile, ImageProfile
from oci.image_config import ConfigError, check_config_size, diff_ids, parse_config
from oci.manifest import Descriptor, Index, Manifest, ManifestError, parse_manifest
from oci.reference import Reference
from oci.referrers import PushedArtifact, push_artifact
from oci.registry import RegistryClient

from . import hotfiles

# Layers that carry their own index already: the snapshotter reads them as they are.
_ESTARGZ_TOC = "containerd.io/snapshot/stargz/toc.digest"
_ZSTD_CHUNKED = "io.containers.zstd-chunked.manifest-checksum"
_ATTESTATION = "attestation-manifest"


class IndexingError(Exception):
    """An image that cannot be indexed; the message names the image and the layer."""


@dataclass(frozen=True)
class IndexOptions:
    spacing: int = gzindex.DEFAULT_SPACING
    profile: AccessProfile | None = None
    platforms: tuple[str, ...] = ()  # os/arch[/variant]; empty = every platform
    workdir: str | None = None


@dataclass
class LayerReport:
    index: int
    digest: str
    size: int
    skipped: str | None = None  # why it has no index
    index_digest: str | None = None
    index_size: int | None = None
    uncompressed_size: int | None = None
    spans: int | None = None
    files: int | None = None
    hot_files: int = 0
    hot_checkpoints: int = 0  # extra checkpoints placed around the hot files
    seconds: float = 0.0


@dataclass
class ManifestReport:
    digest: str
    platform: str
    layers: list[LayerReport]
    artifact: str | None = None  # digest of the artifact manifest, None if nothing indexed
    fallback_tag: str | None = None  # set where the registry has no referrers API
    missing_hot_files: list[str] = field(default_factory=list)


@dataclass
class IndexReport:
    image: str
    digest: str  # of what the reference names, unchanged
    manifests: list[ManifestReport]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def skip_reason(layer: Descriptor) -> str | None:
    """Why a layer gets no gzip index, or None if it gets one."""
    if layer.media_type in mt.FOREIGN_LAYERS or layer.urls:
        return "foreign layer"
    if layer.media_type not in mt.GZIP_LAYERS:
        return f"not gzip ({layer.media_type})"
    if _ESTARGZ_TOC in layer.annotations:
        return "eStargz: read through its own TOC"
    if _ZSTD_CHUNKED in layer.annotations:
        return "zstd:chunked: read through its own TOC"
    return None


class _Scanned:
    """One indexed layer, shared by the manifests that hold it."""

    def __init__(self, layer: gzindex.ScannedLayer, seconds: float, blob_path: str | None):
        self.layer = layer
        self.seconds = seconds
        self.blob_path = blob_path  # the downloaded layer, kept while hot files may need it
        self._paths: set[str] | None = None

    @property
    def paths(self) -> set[str]:
        """Every path the layer holds: read from its file table when a profile needs it."""
        if self._paths is None:
            self._paths = hotfiles.paths_of(entry.name for entry in self.layer.entries())
        return self._paths


class ImageIndexer:
    def __init__(self, client: RegistryClient, reference: Reference, options: IndexOptions):
        self.client = client
        self.reference = reference
        self.options = options
        self.workdir = ""
        self._scanned: dict[str, _Scanned] = {}

    @property
    def image(self) -> str:
        return str(self.reference)

    async def run(self) -> IndexReport:
        started = time.monotonic()
        self.workdir = tempfile.mkdtemp(prefix="lazypull-index-", dir=self.options.workdir)
        try:
            data, media_type, digest = await self.client.get_manifest(self.reference)
            parsed = self._parse(data, media_type, digest)
            if isinstance(parsed, Index):
                reports = await self._index_platforms(parsed)
            else:
                reports = [await self._index_manifest(parsed, Descriptor(
                    parsed.media_type, digest, len(data)), "")]
        finally:
            for scanned in self._scanned.values():
                scanned.layer.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
        return IndexReport(self.image, digest, reports, round(time.monotonic() - started, 3))

    def _parse(self, data: bytes, media_type: str, digest: str) -> Manifest | Index:
        try:
            return parse_manifest(data, media_type)
        except ManifestError as exc:
            raise IndexingError(f"{self.image}@{digest}: {exc}") from None

    async def _index_platforms(self, index: Index) -> list[ManifestReport]:
        reports = []
        for child in index.manifests:
            if child.media_type not in mt.MANIFESTS:
                continue  # nested indexes, artifacts
            if child.annotations.get("vnd.docker.reference.type") == _ATTESTATION:
                continue
            if not child.matches_platforms(self.options.platforms):
                continue
            data, media_type, digest = await self.client.get_manifest(self.reference,
                                                                      child.digest)
            manifest = self._parse(data, media_type, digest)
            if not isinstance(manifest, Manifest):
                raise IndexingError(f"{self.image}@{child.digest}: not an image manifest")
            subject = Descriptor(manifest.media_type, digest, len(data))
            reports.append(await self._index_manifest(manifest, subject, child.platform_string))
        if not reports:
            wanted = ", ".join(self.options.platforms) or "any platform"
            raise IndexingError(f"{self.image}: no image manifest for {wanted}")
        return reports

    async def _index_manifest(self, manifest: Manifest, subject: Descriptor,
                              platform: str) -> ManifestReport:
        where = f"{self.image}@{subject.digest}"
        try:
            config = await self._read_config(manifest, where)
            layer_diff_ids = diff_ids(config, manifest, where)
        except ConfigError as exc:
            raise IndexingError(str(exc)) from None
        reports = [LayerReport(i, d.digest, d.size, skipped=skip_reason(d))
                   for i, d in enumerate(manifest.layers)]
        for report, layer, diff_id in zip(reports, manifest.layers, layer_diff_ids, strict=True):
            if report.skipped is None:
                await self._scan(where, report, layer, diff_id)
        if not platform:
            platform = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
        result = ManifestReport(subject.digest, platform, reports)
        indexed = [r for r in reports if r.skipped is None]
        if not indexed:
            return result
        hot = self._plan(manifest, subject, result)
        blobs = []
        for report in indexed:
            report.hot_files = len(hot[report.index])
            blobs.append(await self._write_index(report, hot[report.index]))
        # No timestamp: the same image indexed the same way gives the same artifact,
        # so indexing again lists nothing twice.
        pushed: PushedArtifact = await push_artifact(
            self.client, self.reference, subject, gzindex.ARTIFACT_TYPE, blobs)
        result.artifact, result.fallback_tag = pushed.descriptor.digest, pushed.fallback_tag
        return result

    async def _read_config(self, manifest: Manifest, where: str) -> dict[str, Any]:
        check_config_size(manifest, where)
        data = bytearray()
        async for piece in self.client.stream_blob(self.reference, manifest.config):
            data += piece
        return parse_config(bytes(data), manifest, where)

    async def _scan(self, where: str, report: LayerReport, layer: Descriptor,
                    diff_id: object) -> None:
        scanned = self._scanned.get(layer.digest)
        if scanned is None:
            started = time.monotonic()
            path = os.path.join(self.workdir, layer.digest[7:] + ".gz")
            with open(path, "wb") as file:
                async for piece in self.client.stream_blob(self.reference, layer):
                    await asyncio.to_thread(file.write, piece)

            def scan() -> gzindex.ScannedLayer:
                with open(path, "rb") as blob:
                    return gzindex.scan_layer(blob, spacing=self.options.spacing,
                                              expected_digest=layer.digest, tmpdir=self.workdir)

            keep = self.options.profile is not None  # for a second read around hot files
            try:
                scanned = _Scanned(await asyncio.to_thread(scan),
                                   round(time.monotonic() - started, 3), path if keep else None)
            except FormatError as exc:
                keep = False
                raise IndexingError(f"{where}: layer {report.index} ({layer.digest}): "
                                    f"{exc}") from None
            finally:
                if not keep:
                    os.unlink(path)
            self._scanned[layer.digest] = scanned
        if scanned.layer.diff_id != diff_id:
            raise IndexingError(f"{where}: layer {report.index} ({layer.digest}) uncompresses "
                                f"to {scanned.layer.diff_id}, the config says {diff_id}")
        report.uncompressed_size = scanned.layer.uncompressed_size
        report.spans, report.files = scanned.layer.spans.count, scanned.layer.file_count
        report.seconds = scanned.seconds

    def _plan(self, manifest: Manifest, subject: Descriptor,
              result: ManifestReport) -> list[list[str]]:
        empty: list[list[str]] = [[] for _ in manifest.layers]
        if self.options.profile is None:
            return empty
        profile: ImageProfile = self.options.profile.for_image(
            f"{self.reference.registry}/{self.reference.repository}", {subject.digest})
        layers = []
        for layer in manifest.layers:
            scanned = self._scanned.get(layer.digest)
            ids = frozenset({layer.digest, scanned.layer.diff_id}) if scanned else frozenset()
            layers.append(hotfiles.LayerPaths(scanned.paths if scanned else set(), ids))
        per_layer, result.missing_hot_files = hotfiles.plan(layers, profile)
        return per_layer

    async def _write_index(self, report: LayerReport, hot: list[str]) -> tuple[Descriptor, str]:
        scanned = self._scanned[report.digest]
        path = os.path.join(self.workdir, f"{report.digest[7:]}-{len(hot)}.index")

        def write() -> gzindex.IndexResult:
            with open(path, "wb") as out:
                if hot and scanned.blob_path is not None:
                    with open(scanned.blob_path, "rb") as blob:
                        again = gzindex.rescan_for_hot_files(scanned.layer, blob, hot,
                                                             tmpdir=self.workdir)
                    if again is not None:
                        with again:
                            report.spans = again.spans.count
                            report.hot_checkpoints = again.hot_checkpoints
                            return again.write(out, hot)
                return scanned.layer.write(out, hot)

        try:
            written = await asyncio.to_thread(write)
        except FormatError as exc:  # the layer file changed on disk since its first read
            raise IndexingError(f"{self.image}: layer {report.index} ({report.digest}): "
                                f"{exc}") from None
        report.index_digest, report.index_size = written.digest, written.size
        annotations = {gzindex.LAYER_ANNOTATION: report.digest,
                       gzindex.SPACING_ANNOTATION: str(scanned.layer.spacing)}
        return Descriptor(gzindex.INDEX_MEDIA_TYPE, written.digest, written.size,
                          annotations=annotations), path


async def index_image(client: RegistryClient, reference: Reference,
                      options: IndexOptions) -> IndexReport:
    return await ImageIndexer(client, reference, options).run()
