"""Open an image store from a skopeo-style reference: `docker://...` or `oci:DIR[:TAG]`."""

from .layout import LayoutStore
from .reference import Reference, ReferenceError
from .store import ImageStore


class TransportError(ValueError):
    """A reference whose transport or syntax lazypull does not understand."""


def open_store(text: str, registry: "object | None" = None) -> ImageStore:
    """`registry` is a RegistryClient, needed for `docker://` references."""
    try:
        if text.startswith("oci:"):
            return LayoutStore.from_reference(text)
        if text.startswith("docker://"):
            if registry is None:
                raise TransportError(f"{text}: no registry client to reach it")
            from .registry import RegistryStore

            return RegistryStore(Reference.parse(text[len("docker://"):]), registry)
    except ReferenceError as exc:
        raise TransportError(str(exc)) from None
    raise TransportError(f"{text!r}: use docker://HOST/REPO[:TAG] or oci:DIR[:TAG]")
