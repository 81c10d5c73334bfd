"""Registry reads for the service's pulls: manifests and small blobs (image configs).

The FUSE manager has a registry client loaded, its connections warm from the TOCs
and chunks it fetches; a pull handed to the service reads through it instead of
loading a second HTTP client into the service (about 7 MB of the service's memory).
The request names the registry settings of the pull (hosts directory, plain HTTP,
Docker config): those of the manager's own client reuse it, others get a client of
their own, kept for the next pull. Answers carry the bytes in base64; the service
checks them against their digests again.
"""

import base64
from collections.abc import Callable
from typing import Any

from oci.digest import DigestMismatchError
from oci.docker_config import CredentialStore, default_config_path
from oci.hosts import HostsConfig
from oci.manifest import Descriptor, ManifestError
from oci.reference import Reference, ReferenceError
from oci.registry import RegistryClient
from oci.store import AuthError, NotFoundError, StoreError

from .protocol import (
    INVALID,
    REGISTRY_AUTH,
    REGISTRY_DIGEST,
    REGISTRY_FAILED,
    REGISTRY_NOT_FOUND,
    RELAY_MAX_BLOB,
    ManagerError,
)

RegistryKey = tuple[str | None, bool, str]  # hosts dir, plain HTTP, Docker config file


def registry_key(hosts_dir: str | None, plain_http: bool, docker_config: str | None
                 ) -> RegistryKey:
    return (hosts_dir or None, bool(plain_http), docker_config or default_config_path())


def _wire_error(exc: Exception) -> ManagerError:
    """The registry's failure as the service's pull must see it (its exit code)."""
    if isinstance(exc, AuthError):
        return ManagerError(REGISTRY_AUTH, str(exc))
    if isinstance(exc, NotFoundError):
        return ManagerError(REGISTRY_NOT_FOUND, str(exc))
    if isinstance(exc, DigestMismatchError):
        return ManagerError(REGISTRY_DIGEST, str(exc))
    return ManagerError(REGISTRY_FAILED, str(exc))


class RegistryRelay:
    def __init__(self, own: RegistryClient, own_key: RegistryKey, stall_seconds: float):
        self._clients: dict[RegistryKey, RegistryClient] = {own_key: own}
        self._own = own
        self._stall_seconds = stall_seconds
        # Told (reference) as a pull asks for a manifest, and (reference, data, media
        # type, digest) of each manifest read for it.
        self.before_manifest: Callable[[Reference], None] | None = None
        self.on_manifest: Callable[[Reference, bytes, str, str], None] | None = None

    def _client(self, registry: dict[str, Any]) -> RegistryClient:
        try:
            key = registry_key(registry["hosts_dir"], registry["plain_http"],
                               registry["docker_config"])
        except (KeyError, TypeError) as exc:
            raise ManagerError(INVALID, f"bad registry settings: {exc}") from None
        client = self._clients.get(key)
        if client is None:
            client = RegistryClient(hosts=HostsConfig(key[0], plain_http=key[1]),
                                    credentials=CredentialStore(key[2]),
                                    timeout=self._stall_seconds)
            self._clients[key] = client
        return client

    async def manifest(self, registry: dict[str, Any], reference: str,
                       tag_or_digest: str | None = None) -> dict[str, str]:
        client, ref = self._client(registry), _reference(reference)
        if self.before_manifest is not None:
            self.before_manifest(ref)
        try:
            data, media_type, digest = await client.get_manifest(ref, tag_or_digest)
        except (StoreError, DigestMismatchError) as exc:
            raise _wire_error(exc) from None
        if self.on_manifest is not None:
            self.on_manifest(ref, data, media_type, digest)
        return {"data": base64.b64encode(data).decode(), "media_type": media_type,
                "digest": digest}

    async def blob(self, registry: dict[str, Any], reference: str,
                   descriptor: dict[str, Any]) -> dict[str, str]:
        client, ref = self._client(registry), _reference(reference)
        try:
            wanted = Descriptor.from_json(descriptor, "relayed blob")
        except ManifestError as exc:
            raise ManagerError(INVALID, str(exc)) from None
        if wanted.size > RELAY_MAX_BLOB:
            raise ManagerError(INVALID, f"blob {wanted.digest} of {wanted.size} bytes is over "
                                        f"the {RELAY_MAX_BLOB} relayed")
        try:
            data = b"".join([part async for part in client.stream_blob(ref, wanted)])
        except (StoreError, DigestMismatchError) as exc:
            raise _wire_error(exc) from None
        return {"data": base64.b64encode(data).decode()}

    async def aclose(self) -> None:
        """Close the clients made here (the manager closes its own)."""
        for client in self._clients.values():
            if client is not self._own:
                await client.aclose()
        self._clients.clear()


def _reference(text: str) -> Reference:
    try:
        return Reference.parse(text)
    except (ReferenceError, TypeError) as exc:
        raise ManagerError(INVALID, f"bad reference: {exc}") from None
