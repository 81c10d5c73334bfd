"""The registry as a pull handed to the service reads it: through the FUSE manager.

Manifests and image configs are read by the manager's registry client (loaded there
already, its connections warm), so a pull whose layers are all served lazily loads
no HTTP client into the service. A blob too large to relay (a layer downloaded
whole, the ordinary way) is streamed by a client of the service's own, made on
first need; so is everything while the manager cannot be reached. Relayed bytes are
checked against their digests here too: the manager is trusted to fetch, and a
byte changed on the way would still be caught.
"""

import base64
import binascii
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from oci.digest import Digester, DigestMismatchError, is_digest
from oci.manifest import Descriptor
from oci.reference import Reference
from oci.store import AuthError, NotFoundError, StoreError

from .errors import Unavailable
from .fusemanager.protocol import (
    REGISTRY_AUTH,
    REGISTRY_DIGEST,
    REGISTRY_NOT_FOUND,
    RELAY_MAX_BLOB,
    ManagerError,
)

if TYPE_CHECKING:
    from oci.registry import RegistryClient

    from .fusemanager.client import FuseManagerClient

log = logging.getLogger(__name__)


class RelayedRegistry:
    """`settings`: the pull's hosts_dir, plain_http and docker_config, as the manager
    needs them; `own_client`: the service's own client for these settings."""

    def __init__(self, manager: "FuseManagerClient", settings: dict[str, Any],
                 own_client: Callable[[], "RegistryClient"]):
        self.manager = manager
        self.settings = settings
        self.own_client = own_client

    async def _relay(self, op: str, **args: Any) -> dict[str, Any] | None:
        """The manager's answer; None if it cannot be reached (the caller reads itself)."""
        try:
            return await self.manager.call_as_sent(op, registry=self.settings, **args)
        except Unavailable as exc:
            log.warning("the FUSE manager cannot read for this pull (%s): reading here", exc)
            return None
        except ManagerError as exc:
            raise _registry_error(exc) from None

    async def get_manifest(self, reference: Reference,
                           tag_or_digest: str | None = None) -> tuple[bytes, str, str]:
        answer = await self._relay("registry_manifest", reference=str(reference),
                                   tag_or_digest=tag_or_digest)
        if answer is None:
            return await self.own_client().get_manifest(reference, tag_or_digest)
        data, media_type, digest = _bytes(answer), answer.get("media_type"), answer.get("digest")
        if not isinstance(media_type, str) or not isinstance(digest, str) or \
                not is_digest(digest):
            raise StoreError(f"the FUSE manager's answer for {reference} is malformed")
        wanted = tag_or_digest or reference.object
        _verify(data, digest, f"manifest {reference}")
        if wanted is not None and is_digest(wanted) and wanted != digest:
            raise DigestMismatchError(f"manifest {reference}: content is {digest}, "
                                      f"expected {wanted}")
        return data, media_type, digest

    async def stream_blob(self, reference: Reference,
                          descriptor: Descriptor) -> AsyncIterator[bytes]:
        if descriptor.size <= RELAY_MAX_BLOB:
            answer = await self._relay("registry_blob", reference=str(reference),
                                       descriptor=descriptor.to_json())
            if answer is not None:
                data = _bytes(answer)
                if len(data) != descriptor.size:
                    raise DigestMismatchError(f"blob {descriptor.digest}: {len(data)} bytes, "
                                              f"expected {descriptor.size}")
                _verify(data, descriptor.digest, f"blob {descriptor.digest}")
                yield data
                return
        log.info("reading blob %s (%d bytes) of %s with the service's own registry client",
                 descriptor.digest, descriptor.size, reference)
        async for part in self.own_client().stream_blob(reference, descriptor):
            yield part


def _bytes(answer: dict[str, Any]) -> bytes:
    try:
        return base64.b64decode(answer["data"], validate=True)
    except (KeyError, TypeError, binascii.Error):
        raise StoreError("the FUSE manager's answer holds no bytes") from None


def _verify(data: bytes, digest: str, what: str) -> None:
    digester = Digester(digest)
    digester.update(data)
    digester.verify(what)


def _registry_error(exc: ManagerError) -> Exception:
    """The registry's failure, as the pull's exit code needs it (pull_protocol.classify)."""
    if exc.kind == REGISTRY_AUTH:
        return AuthError(str(exc))
    if exc.kind == REGISTRY_NOT_FOUND:
        return NotFoundError(str(exc))
    if exc.kind == REGISTRY_DIGEST:
        return DigestMismatchError(str(exc))
    return StoreError(f"FUSE manager: {exc}")
