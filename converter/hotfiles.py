"""Decide which files each layer should place first.

A hot path belongs to the layer a container actually reads it from: the
top-most layer holding it, unless an upper layer whites it out. A profile may
name the layer a file came from; that wins when the layer still holds the file.

Layers' paths are read as streams (a layer may hold millions), at most twice: once
to expand the patterns, once to find where the hot paths and the whiteouts that
could hide them are. Memory holds the hot paths and those names, never a layer's
paths.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .access_profile import ImageProfile
from .patterns import expand, normalize_path

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass(frozen=True)
class LayerFiles:
    """The paths one layer's tar holds (normalized, in tar order) and the ids that name
    the layer. `paths` is iterated once per pass: a list, or a listing on disk."""

    paths: Iterable[str]
    ids: frozenset[str] = frozenset()  # blob digest and diff_id


@dataclass
class HotFilePlan:
    per_layer: list[list[str]]  # bottom layer first, each in priority order
    missing: list[str]  # listed paths or patterns that no layer shows


def _hiding_names(path: str) -> Iterator[str]:
    """The names whose presence in a layer hides `path` in the layers below: a
    whiteout of the path or of a parent, or an opaque marker in a parent."""
    parts = path.split("/")
    for depth in range(len(parts)):
        parent = "/".join(parts[:depth])
        prefix = f"{parent}/" if parent else ""
        yield f"{prefix}{WHITEOUT}{parts[depth]}"
        if depth > 0:
            yield f"{prefix}{OPAQUE}"


def _all_paths(layers: list[LayerFiles]) -> Iterator[str]:
    """Every layer's paths, bottom layer first."""
    for layer in layers:
        yield from layer.paths


class _Presence:
    """Which layers hold each of a few names, as a bit mask (bit i: layer i)."""

    def __init__(self, layers: list[LayerFiles], names: set[str]):
        self.masks: dict[str, int] = {}
        if not names:
            return
        for index, layer in enumerate(layers):
            bit = 1 << index
            for path in layer.paths:
                if path in names:
                    self.masks[path] = self.masks.get(path, 0) | bit

    def holds(self, index: int, path: str) -> bool:
        return bool(self.masks.get(path, 0) >> index & 1)

    def visible_layer(self, path: str) -> int | None:
        """The top-most layer holding `path`, unless a layer above it, or that layer
        itself, hides it; None if no layer shows it."""
        holding = self.masks.get(path, 0)
        hiding = 0
        for name in _hiding_names(path):
            hiding |= self.masks.get(name, 0)
        either = holding | hiding
        if not either:
            return None
        top = either.bit_length() - 1
        return top if holding >> top & 1 else None


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

    listed: list[str] = []
    unmatched: list[str] = []
    if patterns:
        listed, unmatched = expand(patterns, _all_paths(layers))
    profiled = [(normalize_path(access.path), access) for access in profile.files] \
        if profile else []
    names: set[str] = set()
    for path in [*listed, *(path for path, _ in profiled)]:
        names.add(path)
        names.update(_hiding_names(path))
    presence = _Presence(layers, names)

    missing.extend(unmatched)
    for path in listed:
        index = presence.visible_layer(path)
        if index is None:
            missing.append(path)
        else:
            place(path, index)
    for path, access in profiled:
        named = [i for i, layer in enumerate(layers)
                 if access.layer in layer.ids and presence.holds(i, path)]
        index = named[0] if named else presence.visible_layer(path)
        if index is None:
            missing.append(access.path)
        else:
            place(path, index)
    return HotFilePlan(per_layer=per_layer, missing=missing)
