"""OCI image layouts (`oci:DIR[:TAG]`) as an ImageStore.

A layout is a directory holding an `oci-layout` marker file, an `index.json`
whose entries name images through the `org.opencontainers.image.ref.name`
annotation, and the blobs under `blobs/<algorithm>/<hex>`. References follow
skopeo's `oci:` transport so the same string means the same image to both.
"""

import asyncio
import json
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from . import mediatypes as mt
from .digest import (
    Digester,
    DigestMismatchError,
    is_digest,
    sha256_of,
    validate_digest,
    verify_bytes,
)
from .manifest import Descriptor, Index, ManifestError, parse_manifest
from .reference import ReferenceError
from .store import NotFoundError, StoreError

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
REF_NAME = "org.opencontainers.image.ref.name"
CHUNK_SIZE = 1 << 20
# Registries refuse larger manifests too; this stops a layer digest from being slurped whole.
MAX_MANIFEST_SIZE = 4 << 20

# skopeo's rule for the image name of an `oci:` reference (containers/image, oci/internal).
_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_IMAGE_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")


def parse_layout_reference(text: str) -> tuple[str, str | None]:
    """Split `oci:DIR[:TAG]` into (DIR, TAG or None).

    Like skopeo on Unix, DIR ends at the first ':'; so DIR cannot hold a ':'
    while TAG may (`oci:/images:example.com/app:1.0` names tag `example.com/app:1.0`).
    """
    transport, sep, rest = text.partition(":")
    if not sep or transport != "oci":
        raise ReferenceError(f"{text!r}: not an OCI layout reference (oci:DIR[:TAG])")
    directory, _, tag = rest.partition(":")
    if not directory:
        raise ReferenceError(f"{text!r}: the layout directory is empty")
    if tag and not _IMAGE_NAME.fullmatch(tag):
        raise ReferenceError(f"{text!r}: invalid image name {tag!r} in the layout")
    return directory, tag or None


def _sniff_media_type(data: bytes, what: str) -> str:
    """The media type a manifest declares, or what its shape says when it declares none."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        raise StoreError(f"{what} is not a manifest (not JSON)") from None
    if not isinstance(doc, dict):
        raise StoreError(f"{what} is not a manifest (not a JSON object)")
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    return mt.OCI_INDEX if "manifests" in doc else mt.OCI_MANIFEST


def _write_atomically(target: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a half-written one."""
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            os.fchmod(out.fileno(), 0o644)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _copy_verified(source: str, target: Path, descriptor: Descriptor) -> None:
    """Copy `source` to `target` through a temporary file, renaming only if it matches."""
    digester = Digester(descriptor.digest)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            while chunk := src.read(CHUNK_SIZE):
                digester.update(chunk)
                out.write(chunk)
            os.fchmod(out.fileno(), 0o644)
        if digester.size != descriptor.size:
            raise DigestMismatchError(
                f"{source}: {digester.size} bytes, expected {descriptor.size} "
                f"for {descriptor.digest}")
        digester.verify(source)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


class LayoutStore:
    """One OCI image layout directory; `tag` is the image a bare reference means."""

    def __init__(self, directory: str | os.PathLike[str], tag: str | None = None):
        if tag is not None and not _IMAGE_NAME.fullmatch(tag):
            raise ReferenceError(f"invalid image name {tag!r} for an OCI layout")
        self.directory = Path(directory)
        self.tag = tag

    @classmethod
    def from_reference(cls, text: str) -> "LayoutStore":
        return cls(*parse_layout_reference(text))

    @property
    def name(self) -> str:
        return f"oci:{self.directory}" + (f":{self.tag}" if self.tag else "")

    @property
    def default_object(self) -> str | None:
        return self.tag

    async def get_manifest(self, tag_or_digest: str | None = None) -> tuple[bytes, str, str]:
        """By digest, by tag, or (None / "") the layout's only image."""
        index = self._read_index()
        if tag_or_digest and is_digest(tag_or_digest):
            data = self._read_manifest_blob(tag_or_digest, None)
            listed = next((d for d in index.manifests if d.digest == tag_or_digest), None)
            media_type = listed.media_type if listed else _sniff_media_type(
                data, f"{self.name}: blob {tag_or_digest}")
            return data, media_type, tag_or_digest
        entry = self._find_entry(index, tag_or_digest or None)
        return self._read_manifest_blob(entry.digest, entry.size), entry.media_type, entry.digest

    async def get_blob(self, descriptor: Descriptor) -> AsyncIterator[bytes]:
        """Yield the blob in CHUNK_SIZE pieces; the last step checks its size and digest."""
        path = self._blob_path(descriptor.digest)
        try:
            source = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise NotFoundError(f"{self.name}: blob {descriptor.digest} not found") from None
        digester = Digester(descriptor.digest)
        what = f"{self.name}: blob {descriptor.digest}"
        try:
            while chunk := await asyncio.to_thread(source.read, CHUNK_SIZE):
                digester.update(chunk)
                if digester.size > descriptor.size:
                    raise DigestMismatchError(f"{what}: longer than {descriptor.size} bytes")
                yield chunk
        finally:
            source.close()
        if digester.size != descriptor.size:
            raise DigestMismatchError(
                f"{what}: {digester.size} bytes, expected {descriptor.size}")
        digester.verify(what)

    async def has_blob(self, descriptor: Descriptor) -> bool:
        # A size mismatch (say, a copy cut short) counts as absent so that it gets rewritten.
        try:
            return self._blob_path(descriptor.digest).stat().st_size == descriptor.size
        except FileNotFoundError:
            return False

    async def put_blob(self, descriptor: Descriptor, path: str) -> None:
        self._ensure_layout()
        target = self._blob_path(descriptor.digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_copy_verified, path, target, descriptor)

    async def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        if tag is not None and not _IMAGE_NAME.fullmatch(tag):
            raise ReferenceError(f"invalid image name {tag!r} for an OCI layout")
        self._ensure_layout()
        digest = sha256_of(data)
        target = self._blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, data)
        if tag:
            self._set_tag(tag, Descriptor(media_type, digest, len(data), {REF_NAME: tag}))
        return digest

    async def aclose(self) -> None:
        """Nothing stays open between calls."""

    # The index is read, changed and written without an await in between, so
    # concurrent tasks of one event loop cannot interleave their updates.
    def _set_tag(self, tag: str, entry: Descriptor) -> None:
        index = self._read_index()
        kept: list[Descriptor] = []
        placed = False
        for existing in index.manifests:
            if existing.annotations.get(REF_NAME) != tag:
                kept.append(existing)
            elif not placed:  # the new entry takes the old one's place
                kept.append(entry)
                placed = True
        if not placed:
            kept.append(entry)
        index.manifests = kept
        _write_atomically(self.directory / INDEX_FILE, index.to_bytes())

    def _blob_path(self, digest: str) -> Path:
        algorithm, _, encoded = validate_digest(digest).partition(":")
        return self.directory / "blobs" / algorithm / encoded

    def _read_manifest_blob(self, digest: str, size: int | None) -> bytes:
        path = self._blob_path(digest)
        what = f"{self.name}: manifest {digest}"
        try:
            if path.stat().st_size > MAX_MANIFEST_SIZE:
                raise StoreError(f"{what} is larger than {MAX_MANIFEST_SIZE} bytes")
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{what} not found") from None
        if size is not None and len(data) != size:
            raise DigestMismatchError(f"{what}: {len(data)} bytes, expected {size}")
        verify_bytes(data, digest, what)
        return data

    def _read_index(self) -> Index:
        if not self.directory.is_dir():
            raise NotFoundError(f"{self.name}: no such directory {self.directory}")
        try:
            data = (self.directory / INDEX_FILE).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(
                f"{self.name}: {self.directory} is not an OCI image layout (no {INDEX_FILE})"
            ) from None
        try:
            index = parse_manifest(data, mt.OCI_INDEX)
        except ManifestError as exc:
            raise StoreError(f"{self.name}: malformed {INDEX_FILE}: {exc}") from None
        if not isinstance(index, Index):
            raise StoreError(f"{self.name}: {INDEX_FILE} is not an image index")
        return index

    def _find_entry(self, index: Index, tag: str | None) -> Descriptor:
        if tag is None:
            if len(index.manifests) == 1:
                return index.manifests[0]
            if not index.manifests:
                raise NotFoundError(f"{self.name}: the layout holds no images")
            names = sorted({d.annotations.get(REF_NAME, "(untagged)") for d in index.manifests})
            raise StoreError(f"{self.name}: the layout holds {len(index.manifests)} images; "
                             f"name one of: {', '.join(names)}")
        for entry in index.manifests:
            if entry.annotations.get(REF_NAME) == tag:
                return entry
        raise NotFoundError(f"{self.name}: no image tagged {tag!r} in {self.directory}")

    def _ensure_layout(self) -> None:
        """Create the directory, marker and empty index if they are missing; check the version."""
        self.directory.mkdir(parents=True, exist_ok=True)
        marker = self.directory / LAYOUT_FILE
        try:
            version = json.loads(marker.read_bytes()).get("imageLayoutVersion")
        except FileNotFoundError:
            _write_atomically(marker, json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode())
        except (ValueError, AttributeError):
            raise StoreError(f"{self.name}: malformed {LAYOUT_FILE} file") from None
        else:
            if not isinstance(version, str) or not version.startswith("1."):
                raise StoreError(f"{self.name}: unsupported image layout version {version!r}")
        if not (self.directory / INDEX_FILE).exists():
            _write_atomically(self.directory / INDEX_FILE, Index(mt.OCI_INDEX, []).to_bytes())
        (self.directory / "blobs").mkdir(exist_ok=True)
