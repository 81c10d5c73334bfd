"""Which layer of an image each file of an access profile is read from.

A path belongs to the top-most layer that holds it, unless an upper layer whites
it out (`.wh.NAME`, or an opaque `.wh..wh..opq` in a parent). A profile may name
the layer a file came from (blob digest or diff_id); that wins when that layer
holds the file. The same rules as the converter's, over the indexes' file tables.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

from oci.access_profile import ImageProfile

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass
class LayerPaths:
    """The paths one layer's tar holds and the ids that name the layer."""

    paths: set[str]
    ids: frozenset[str] = field(default_factory=frozenset)

    def hides(self, path: str) -> bool:
        parts = path.split("/")
        for depth in range(len(parts)):
            prefix = "/".join(parts[:depth])
            prefix = f"{prefix}/" if prefix else ""
            if f"{prefix}{WHITEOUT}{parts[depth]}" in self.paths:
                return True
            if depth > 0 and f"{prefix}{OPAQUE}" in self.paths:
                return True
        return False


def normalize(path: str) -> str:
    return "/".join(p for p in path.split("/") if p not in ("", "."))


def _visible_layer(layers: list[LayerPaths], path: str) -> int | None:
    for index in range(len(layers) - 1, -1, -1):
        if path in layers[index].paths:
            return index
        if layers[index].hides(path):
            return None
    return None


def plan(layers: list[LayerPaths], profile: ImageProfile) -> tuple[list[list[str]], list[str]]:
    """(hot paths per layer, bottom layer first, in the profile's order; paths no
    layer shows)."""
    per_layer: list[list[str]] = [[] for _ in layers]
    placed: set[str] = set()
    missing: list[str] = []
    for access in profile.files:
        path = normalize(access.path)
        named = [i for i, layer in enumerate(layers)
                 if access.layer in layer.ids and path in layer.paths]
        index = named[0] if named else _visible_layer(layers, path)
        if index is None:
            missing.append(access.path)
        elif path not in placed:
            placed.add(path)
            per_layer[index].append(path)
    return per_layer, missing


def paths_of(names: Iterable[str]) -> set[str]:
    return {name for name in names if name}
