"""An image's config as the converter and the indexer read it (oci/image_config.py)."""

import json

import pytest

from oci.image_config import MAX_CONFIG_SIZE, ConfigError, check_config_size, diff_ids, parse_config
from oci.manifest import Descriptor, Manifest

LAYER = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", "sha256:" + "a" * 64, 10)


def manifest(config_size: int = 100, layers: int = 2) -> Manifest:
    config = Descriptor("application/vnd.oci.image.config.v1+json", "sha256:" + "c" * 64,
                        config_size)
    return Manifest("application/vnd.oci.image.manifest.v1+json", config, [LAYER] * layers)


def test_a_config_with_one_diff_id_per_layer_is_read() -> None:
    ids = ["sha256:" + "1" * 64, "sha256:" + "2" * 64]
    config = parse_config(json.dumps({"rootfs": {"type": "layers", "diff_ids": ids}}).encode(),
                          manifest(), "img")
    assert diff_ids(config, manifest(), "img") == ids


@pytest.mark.parametrize(("data", "words"), [
    (b"{not json", "img: config sha256:ccc"),
    (b"[" * 100_000 + b"]" * 100_000, "is not JSON"),  # nested past the decoder's depth
    (b"[1, 2]", "is not an object"),
])
def test_configs_that_are_not_json_objects_are_refused(data: bytes, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_config(data, manifest(), "img")


@pytest.mark.parametrize("config", [
    {}, {"rootfs": []}, {"rootfs": {"diff_ids": "sha256:1"}},
    {"rootfs": {"diff_ids": ["sha256:" + "1" * 64]}},
])
def test_diff_ids_must_be_a_list_with_one_per_layer(config: dict) -> None:
    with pytest.raises(ConfigError, match=r"img: config lists \d diff_ids for 2 layers"):
        diff_ids(config, manifest(), "img")


def test_a_config_larger_than_the_bound_is_refused_before_it_is_fetched() -> None:
    check_config_size(manifest(MAX_CONFIG_SIZE), "img")
    with pytest.raises(ConfigError, match="too large"):
        check_config_size(manifest(MAX_CONFIG_SIZE + 1), "img")
