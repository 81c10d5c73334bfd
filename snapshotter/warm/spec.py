"""What the warm set holds: entries from the service's TOML (`warm_set`) and from
`warm_set_dir/*.toml` (each file `[[warm_set]]` tables too, so a ConfigMap can feed it).

Pure Python (no grpc), so the config loader can validate entries.
"""

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

POLICIES = ("prefetch", "full")
DEFAULT_NAMESPACE = "k8s.io"
DEFAULT_REFRESH_SECONDS = 900.0
_KEYS = {"ref", "policy", "namespace", "refresh_seconds", "block_readiness"}


class WarmSpecError(ValueError):
    """A warm-set entry the service cannot use."""


@dataclass(frozen=True)
class WarmSpec:
    ref: str
    policy: str = "prefetch"
    namespace: str = DEFAULT_NAMESPACE
    refresh_seconds: float = DEFAULT_REFRESH_SECONDS
    block_readiness: bool = True

    @property
    def key(self) -> str:
        """Identity of an entry: the same reference in two namespaces is two entries."""
        return f"{self.namespace}/{self.ref}"


def parse_entry(raw: Any, where: str) -> WarmSpec:
    if not isinstance(raw, Mapping):
        raise WarmSpecError(f"{where}: a warm_set entry must be a table")
    unknown = set(raw) - _KEYS
    if unknown:
        raise WarmSpecError(f"{where}: unknown warm_set key(s) {', '.join(sorted(unknown))}")
    ref = raw.get("ref")
    if not isinstance(ref, str) or not ref.strip():
        raise WarmSpecError(f"{where}: warm_set entry needs ref = \"IMAGE\"")
    policy = raw.get("policy", "prefetch")
    if policy not in POLICIES:
        raise WarmSpecError(f"{where}: {ref}: policy must be one of {', '.join(POLICIES)}")
    namespace = raw.get("namespace", DEFAULT_NAMESPACE)
    if not isinstance(namespace, str) or not namespace:
        raise WarmSpecError(f"{where}: {ref}: namespace must be a non-empty string")
    refresh = raw.get("refresh_seconds", DEFAULT_REFRESH_SECONDS)
    if isinstance(refresh, bool) or not isinstance(refresh, int | float) or refresh <= 0:
        raise WarmSpecError(f"{where}: {ref}: refresh_seconds must be a positive number")
    block = raw.get("block_readiness", True)
    if not isinstance(block, bool):
        raise WarmSpecError(f"{where}: {ref}: block_readiness must be true or false")
    from oci.reference import Reference, ReferenceError
    try:
        Reference.parse(ref.strip())
    except ReferenceError as exc:
        raise WarmSpecError(f"{where}: {exc}") from None
    return WarmSpec(ref.strip(), policy, namespace, float(refresh), block)


def parse_entries(raws: Iterable[Any], where: str) -> list[WarmSpec]:
    specs = [parse_entry(raw, where) for raw in raws]
    seen: set[str] = set()
    for spec in specs:
        if spec.key in seen:
            raise WarmSpecError(f"{where}: {spec.ref} is listed twice in namespace "
                                f"{spec.namespace}")
        seen.add(spec.key)
    return specs


def read_dir(directory: str) -> tuple[list[WarmSpec], list[str]]:
    """(entries, errors) of every DIR/*.toml; a bad file is reported and skipped, so one
    broken ConfigMap key does not empty the warm set. A missing directory is empty."""
    specs: list[WarmSpec] = []
    errors: list[str] = []
    try:
        names = sorted(n for n in os.listdir(directory)
                       if n.endswith(".toml") and not n.startswith("."))
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        return [], [f"{directory}: {exc.strerror}"]
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
            raws = doc.get("warm_set", [])
            if set(doc) - {"warm_set"} or not isinstance(raws, list):
                raise WarmSpecError(f"{path}: expected only [[warm_set]] tables")
            specs.extend(parse_entries(raws, path))
        except (OSError, tomllib.TOMLDecodeError, WarmSpecError) as exc:
            errors.append(str(exc) if isinstance(exc, WarmSpecError) else f"{path}: {exc}")
    return specs, errors


def merge(*groups: Iterable[WarmSpec]) -> list[WarmSpec]:
    """Entries in order; a later entry for the same namespace/ref replaces an earlier."""
    out: dict[str, WarmSpec] = {}
    for group in groups:
        for spec in group:
            out[spec.key] = spec
    return list(out.values())
