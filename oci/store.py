"""Where images live: a registry repository or an OCI image layout, behind one interface.

The converter reads an image from one store and writes its twin to another
without caring which kind each is. References use skopeo's transports:
`docker://HOST/REPO[:TAG|@DIGEST]` and `oci:DIR[:TAG]`.
"""

from collections.abc import AsyncIterator
from typing import Protocol

from .manifest import Descriptor


class StoreError(Exception):
    """Base of store failures; the subclasses say what kind, for exit codes."""


class NotFoundError(StoreError):
    """The image, manifest or blob does not exist."""


class AuthError(StoreError):
    """Credentials are missing or refused."""


class ImageStore(Protocol):
    """One image repository: manifests by tag or digest, blobs by digest."""

    @property
    def name(self) -> str:
        """Human-readable location, for messages (never includes credentials)."""
        ...

    @property
    def default_object(self) -> str | None:
        """The tag or digest the reference named, if any."""
        ...

    async def get_manifest(self, tag_or_digest: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest); the bytes are verified against the digest."""
        ...

    def get_blob(self, descriptor: Descriptor) -> AsyncIterator[bytes]:
        """Stream a blob (`async for piece in store.get_blob(d)`); raises once the
        stream fails its digest or size."""
        ...

    async def has_blob(self, descriptor: Descriptor) -> bool: ...

    async def put_blob(self, descriptor: Descriptor, path: str) -> None:
        """Store the file at `path`, which holds exactly the descriptor's bytes."""
        ...

    async def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        """Store a manifest or index (by digest, and under `tag` if given); returns its digest."""
        ...

    async def aclose(self) -> None: ...
