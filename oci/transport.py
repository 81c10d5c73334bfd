"""Open an image store from a skopeo-style reference: `docker://...` or `oci:DIR[:TAG]`."""

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from .hosts import HostsConfig
from .layout import LayoutStore
from .reference import Reference, ReferenceError
from .registry import RegistryClient, RegistryStore
from .store import ImageStore

DOCKER = "docker://"
LAYOUT = "oci:"


class TransportError(ValueError):
    """A reference whose transport or syntax lazypull does not understand."""


@asynccontextmanager
async def registry_client(hosts_dir: str | None = None, plain_http: bool = False,
                          insecure: Iterable[str] = (), timeout: float = 60.0
                          ) -> AsyncIterator[RegistryClient]:
    """A registry client configured like containerd (hosts.toml) and Docker (credentials);
    a connection silent for `timeout` seconds is given up (and the request retried)."""
    client = RegistryClient(hosts=HostsConfig(hosts_dir, insecure=insecure,
                                              plain_http=plain_http), timeout=timeout)
    try:
        yield client
    finally:
        await client.aclose()


def parse_registry_reference(text: str) -> Reference:
    try:
        return Reference.parse(text.removeprefix(DOCKER))
    except ReferenceError as exc:
        raise TransportError(str(exc)) from None


def open_store(text: str, client: RegistryClient | None = None,
               mount_from: Iterable[str] = ()) -> ImageStore:
    """The store `text` names. `client` is needed for `docker://` references;
    `mount_from` names repositories of the same registry that may hold its blobs."""
    if text.startswith(LAYOUT):
        try:
            return LayoutStore.from_reference(text)
        except ReferenceError as exc:
            raise TransportError(str(exc)) from None
    if text.startswith(DOCKER):
        if client is None:
            raise TransportError(f"{text}: no registry client to reach it")
        return RegistryStore(parse_registry_reference(text), client, mount_from=mount_from)
    raise TransportError(f"{text!r}: use docker://HOST/REPO[:TAG] or oci:DIR[:TAG]")


def same_registry_repository(source: str, destination: str) -> str | None:
    """The source repository when both references name the same registry (for mounts)."""
    if not (source.startswith(DOCKER) and destination.startswith(DOCKER)):
        return None
    src, dst = parse_registry_reference(source), parse_registry_reference(destination)
    return src.repository if src.registry == dst.registry else None
