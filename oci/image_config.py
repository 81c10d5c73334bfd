"""An image's config blob, as the converter and the indexer read it: a JSON object of
bounded size whose `rootfs.diff_ids` lists one digest per layer of the manifest."""

import json
from typing import Any

from .manifest import Manifest

MAX_CONFIG_SIZE = 8 << 20


class ConfigError(ValueError):
    """A config that cannot be used; the message names the image (`where`)."""


def check_config_size(manifest: Manifest, where: str) -> None:
    """Refuse a config too large to read into memory, before fetching it."""
    if manifest.config.size > MAX_CONFIG_SIZE:
        raise ConfigError(f"{where}: config of {manifest.config.size} bytes is too large")


def parse_config(data: bytes, manifest: Manifest, where: str) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        raise ConfigError(f"{where}: config {manifest.config.digest} is not JSON") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config {manifest.config.digest} is not an object")
    return config


def diff_ids(config: dict[str, Any], manifest: Manifest, where: str) -> list[Any]:
    """The config's diff_ids, one per layer of the manifest (entries unchecked: the
    caller compares each with the layer it unpacks)."""
    rootfs = config.get("rootfs")
    found = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(found, list) or len(found) != len(manifest.layers):
        raise ConfigError(f"{where}: config lists {len(found or [])} diff_ids for "
                          f"{len(manifest.layers)} layers")
    return found
