"""Decide which files each layer should place first.

A hot path belongs to the layer a container actually reads it from: the
top-most layer holding it, unless an upper layer whites it out. A profile may
name the layer a file came from; that wins when the layer still holds the file.
"""

from dataclasses import dataclass, field

from .access_profile import ImageProfile
from .patterns import expand, normalize_path

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass
class LayerFiles:
    """The paths one layer's tar holds (normalized) and the ids that name the layer."""

    paths: list[str]
    ids: frozenset[str] = frozenset()  # blob digest and diff_id
    _set: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self._set = set(self.paths)

    def holds(self, path: str) -> bool:
        return path in self._set

    def hides(self, path: str) -> bool:
        """True if this layer whites out `path` or makes one of its parents opaque."""
        parts = path.split("/")
        for depth in range(len(parts)):
            parent = "/".join(parts[:depth])
            prefix = f"{parent}/" if parent else ""
            if f"{prefix}{WHITEOUT}{parts[depth]}" in self._set:
                return True
            if depth > 0 and f"{prefix}{OPAQUE}" in self._set:
                return True
        return False


@dataclass
class HotFilePlan:
    per_layer: list[list[str]]  # bottom layer first, each in priority order
    missing: list[str]  # listed paths or patterns that no layer shows


def _visible_layer(layers: list[LayerFiles], path: str) -> int | None:
    for index in range(len(layers) - 1, -1, -1):
        if layers[index].holds(path):
            return index
        if layers[index].hides(path):
            return None
    return None


def plan(
    layers: list[LayerFiles],
    patterns: list[str] | None = None,
    profile: ImageProfile | None = None,
) -> HotFilePlan:
    per_layer: list[list[str]] = [[] for _ in layers]
    placed: set[str] = set()
    missing: list[str] = []

    def place(path: str, index: int) -> None:
        if path not in placed:
            placed.add(path)
            per_layer[index].append(path)

    if patterns:
        union: dict[str, None] = {}
        for layer in layers:
            union.update(dict.fromkeys(layer.paths))
        paths, unmatched = expand(patterns, list(union))
        missing.extend(unmatched)
        for path in paths:
            index = _visible_layer(layers, path)
            if index is None:
                missing.append(path)
            else:
                place(path, index)
    if profile:
        for access in profile.files:
            path = normalize_path(access.path)
            named = [i for i, layer in enumerate(layers)
                     if access.layer in layer.ids and layer.holds(path)]
            index = named[0] if named else _visible_layer(layers, path)
            if index is None:
                missing.append(access.path)
            else:
                place(path, index)
    return HotFilePlan(per_layer=per_layer, missing=missing)
