"""Hot-file lists, access profiles and their placement in layers."""

import json
from pathlib import Path

import jsonschema
import pytest

from converter.access_profile import ProfileError, parse_profile
from converter.hotfiles import LayerFiles, plan
from converter.patterns import expand

SCHEMA = json.loads((Path(__file__).parents[1] / "converter" /
                     "access_profile.schema.json").read_text())
EXAMPLE = {
    "schemaVersion": 1,
    "images": [{
        "reference": "registry.example/ws/python:3.11",
        "manifestDigest": "sha256:" + "a" * 64,
        "recordedAt": "2026-11-28T10:00:00Z",
        "windowSeconds": 30,
        "files": [
            {"path": "/usr/bin/python3.11", "layer": "sha256:" + "b" * 64},
            {"path": "/usr/lib/python3.11/os.py"},
            {"path": "/usr/lib/libpython3.11.so", "ranges": [[0, 65536], [1048576, 4096]]},
        ],
    }],
}


def test_schema_and_parser_agree_on_the_documented_example() -> None:
    jsonschema.validate(EXAMPLE, SCHEMA)
    profile = parse_profile(json.dumps(EXAMPLE).encode())
    files = profile.images[0].files
    assert files[0].path == "/usr/bin/python3.11"
    assert files[2].ranges == ((0, 65536), (1048576, 4096))
    # What we write back is valid against the schema too.
    jsonschema.validate(json.loads(profile.to_json_bytes()), SCHEMA)


@pytest.mark.parametrize("broken", [
    {"schemaVersion": 2, "images": []},
    {"schemaVersion": 1},
    {"schemaVersion": 1, "images": [{"files": [{"layer": "sha256:" + "b" * 64}]}]},
    {"schemaVersion": 1, "images": [{"files": [{"path": "a", "layer": "md5:x"}]}]},
    {"schemaVersion": 1, "images": [{"files": [{"path": "a", "ranges": [[1]]}]}]},
])
def test_schema_and_parser_refuse_the_same_documents(broken) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
    with pytest.raises(ProfileError):
        parse_profile(json.dumps(broken).encode())


def test_globs() -> None:
    paths = ["usr/bin/python3", "usr/lib/python3/os.py", "usr/lib/python3/json/__init__.py",
             "usr/lib/python3/json/tool.txt", "etc/passwd"]
    found, unmatched = expand(["/etc/passwd", "usr/lib/**/*.py", "usr/bin/py?hon3", "x/*"],
                              paths)
    assert found == ["etc/passwd", "usr/lib/python3/os.py", "usr/lib/python3/json/__init__.py",
                     "usr/bin/python3"]
    assert unmatched == ["x/*"]
    assert expand(["usr/*/os.py"], paths) == ([], ["usr/*/os.py"])  # * stays in one component


def test_files_go_to_the_layer_a_container_reads() -> None:
    layers = [
        LayerFiles(["etc/passwd", "usr/bin/tool", "opt/app/data"], frozenset({"sha256:base"})),
        LayerFiles(["etc/passwd", ".wh.usr", "opt/app/.wh..wh..opq", "opt/app/new"]),
        LayerFiles(["usr/bin/tool"]),
    ]
    result = plan(layers, ["etc/passwd", "usr/bin/tool", "opt/app/data", "opt/app/new"])
    # etc/passwd: top copy in layer 1; usr/bin/tool: re-added in layer 2 after the whiteout;
    # opt/app/data: hidden by layer 1's opaque directory.
    assert result.per_layer == [[], ["etc/passwd", "opt/app/new"], ["usr/bin/tool"]]
    assert result.missing == ["opt/app/data"]
