"""Hot-file lists, access profiles, their placement in layers, and the layers' path
listings on disk that the placement reads."""

import gzip
import json
import os
import random
from pathlib import Path

import jsonschema
import pytest

from converter.access_profile import FileAccess, ImageProfile, ProfileError, parse_profile
from converter.cache import ConversionCache
from converter.hotfiles import HotFilePlan, LayerFiles, plan
from converter.listing import Listing, ListingError, is_sound, read_listing, write_listing
from converter.patterns import compile_glob, expand, is_glob, normalize_path

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


# -- the plan over listings on disk is the plan over paths in memory -------------------

def reference_expand(patterns: list[str], paths: list[str]) -> tuple[list[str], list[str]]:
    """Pattern expansion as it was done over the union of paths, in memory."""
    available = set(paths)
    ordered: dict[str, None] = {}
    unmatched: list[str] = []
    for pattern in patterns:
        if not is_glob(pattern):
            path = normalize_path(pattern)
            if path in available:
                ordered.setdefault(path, None)
            else:
                unmatched.append(pattern)
            continue
        regex = compile_glob(pattern)
        hits = [p for p in paths if regex.fullmatch(p)]
        if not hits:
            unmatched.append(pattern)
        for path in hits:
            ordered.setdefault(path, None)
    return list(ordered), unmatched


def reference_plan(layers: list[tuple[list[str], frozenset[str]]], patterns: list[str],
                   profile: ImageProfile | None) -> HotFilePlan:
    """The plan as it was made with every layer's paths in a list and a set."""
    sets = [set(paths) for paths, _ in layers]

    def hides(index: int, path: str) -> bool:
        parts = path.split("/")
        for depth in range(len(parts)):
            parent = "/".join(parts[:depth])
            prefix = f"{parent}/" if parent else ""
            if f"{prefix}.wh.{parts[depth]}" in sets[index]:
                return True
            if depth > 0 and f"{prefix}.wh..wh..opq" in sets[index]:
                return True
        return False

    def visible(path: str) -> int | None:
        for index in range(len(layers) - 1, -1, -1):
            if path in sets[index]:
                return index
            if hides(index, path):
                return None
        return None

    per_layer: list[list[str]] = [[] for _ in layers]
    placed: set[str] = set()
    missing: list[str] = []

    def place(path: str, index: int) -> None:
        if path not in placed:
            placed.add(path)
            per_layer[index].append(path)

    if patterns:
        union: dict[str, None] = {}
        for paths, _ in layers:
            union.update(dict.fromkeys(paths))
        paths, unmatched = reference_expand(patterns, list(union))
        missing.extend(unmatched)
        for path in paths:
            index = visible(path)
            if index is None:
                missing.append(path)
            else:
                place(path, index)
    if profile:
        for access in profile.files:
            path = normalize_path(access.path)
            named = [i for i, (_, ids) in enumerate(layers)
                     if access.layer in ids and path in sets[i]]
            index = named[0] if named else visible(path)
            if index is None:
                missing.append(access.path)
            else:
                place(path, index)
    return HotFilePlan(per_layer=per_layer, missing=missing)


NAMES = ["a", "b", "c", "lib", "bin", "x.py", "y.py"]
GLOBS = ["a/*", "**/c", "*/?", "a/**/*.py", "[ab]/c", "[!a]*/lib", "**", "lib/**",
         "nothing/*", "**/.wh.*", "*.py"]


def generated_image(rng: random.Random) -> tuple[list[tuple[list[str], frozenset[str]]],
                                                  list[str], ImageProfile]:
    """Layers of paths over a few names (so they meet across layers), with whiteouts of
    files and directories, opaque directories and repeated paths; patterns and a
    profile over the same names."""
    def some_path() -> str:
        return "/".join(rng.choice(NAMES) for _ in range(rng.randint(1, 4)))

    layers = []
    for number in range(rng.randint(1, 5)):
        paths = []
        for _ in range(rng.randint(0, 60)):
            path = some_path()
            head, _, name = path.rpartition("/")
            roll = rng.random()
            if roll < 0.12:
                path = f"{head}/.wh.{name}" if head else f".wh.{name}"
            elif roll < 0.2 and head:
                path = f"{head}/.wh..wh..opq"
            paths.append(path)
        paths += rng.sample(paths, min(len(paths), 3))  # a tar may hold a path twice
        layers.append((paths, frozenset({f"sha256:blob{number}", f"sha256:diff{number}"})))
    patterns = [rng.choice([some_path(), "/" + some_path(), "./" + some_path() + "/",
                            rng.choice(GLOBS)]) for _ in range(rng.randint(0, 8))]
    ids = [f"sha256:{kind}{n}" for kind in ("blob", "diff") for n in range(6)]
    profile = ImageProfile(files=[
        FileAccess(rng.choice([some_path(), "/" + some_path()]),
                   rng.choice([None, *ids]))
        for _ in range(rng.randint(0, 10))])
    return layers, patterns, profile


@pytest.mark.parametrize("seed", range(300))
def test_plan_from_listings_is_the_plan_from_lists(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    layers, patterns, profile = generated_image(rng)
    on_disk = []
    for number, (paths, ids) in enumerate(layers):
        path = str(tmp_path / f"layer{number}.paths.gz")
        write_listing(path, f"sha256:blob{number}", paths)
        on_disk.append(LayerFiles(Listing(path, f"sha256:blob{number}"), ids))
    for use_profile in (False, True):
        chosen = profile if use_profile else None
        want = reference_plan(layers, patterns, chosen)
        assert plan(on_disk, patterns, chosen) == want
        assert plan([LayerFiles(p, ids) for p, ids in layers], patterns, chosen) == want


def test_plan_reads_listings_at_most_twice_and_not_at_all_without_hot_files() -> None:
    class Counted:
        def __init__(self, paths: list[str]):
            self.paths, self.reads = paths, 0

        def __iter__(self):
            self.reads += 1
            return iter(self.paths)

    listings = [Counted(["a/b", "a/.wh.c"]), Counted(["a/c", "d"])]
    layers = [LayerFiles(listing) for listing in listings]
    assert plan(layers) == HotFilePlan([[], []], [])
    assert [x.reads for x in listings] == [0, 0]
    result = plan(layers, ["a/*", "d"], ImageProfile([FileAccess("/a/b")]))
    assert result == HotFilePlan([["a/b", "a/.wh.c"], ["a/c", "d"]], [])
    assert [x.reads for x in listings] == [2, 2]


# -- listings --------------------------------------------------------------------------

ODD_PATHS = ["plain", "with\nnewline", 'quote"and\\slash', "ünïcode/日本", "tab\there",
             "\u2028line-separator", ".wh..wh..opq"]


def test_listing_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "l.paths.gz")
    assert write_listing(path, "sha256:x", iter(ODD_PATHS)) == len(ODD_PATHS)
    assert list(Listing(path, "sha256:x")) == ODD_PATHS
    assert list(Listing(path, "sha256:x")) == ODD_PATHS  # read again
    write_listing(path, "sha256:empty", [])
    assert list(Listing(path, "sha256:empty")) == []
    assert [p.name for p in tmp_path.iterdir()] == ["l.paths.gz"]  # no temporary left


def test_listing_refuses_what_is_not_a_whole_listing_of_its_layer(tmp_path: Path) -> None:
    path = tmp_path / "l.paths.gz"
    write_listing(str(path), "sha256:x", ODD_PATHS)
    whole = path.read_bytes()
    lines = gzip.decompress(whole).splitlines(keepends=True)
    broken = {
        "other layer": whole,
        "cut short": whole[: len(whole) // 2],
        "no trailer": gzip.compress(b"".join(lines[:-1])),
        "wrong count": gzip.compress(b"".join([*lines[:-2], lines[-1]])),
        "after the trailer": gzip.compress(b"".join([*lines, b'"more"\n'])),
        "not JSON": gzip.compress(b"".join([*lines[:2], b"plain\n", *lines[2:]])),
        "not gzip": b"".join(lines),
        "empty": b"",
    }
    for what, data in broken.items():
        path.write_bytes(data)
        digest = "sha256:y" if what == "other layer" else "sha256:x"
        with pytest.raises(ListingError):
            list(read_listing(str(path), digest))
        assert not is_sound(str(path), digest), what


def test_listing_of_a_failing_source_leaves_nothing(tmp_path: Path) -> None:
    def paths():
        yield "a"
        raise OSError("the tar went away")

    with pytest.raises(OSError):
        write_listing(str(tmp_path / "l.paths.gz"), "sha256:x", paths())
    assert list(tmp_path.iterdir()) == []


def test_cached_listings(tmp_path: Path) -> None:
    cache = ConversionCache(str(tmp_path / "cache"))
    made, copy = str(tmp_path / "made.gz"), str(tmp_path / "copy.gz")
    assert not cache.get_listing("sha256:x", copy)
    write_listing(made, "sha256:x", ODD_PATHS)
    cache.put_listing("sha256:x", made)
    assert cache.get_listing("sha256:x", copy)
    assert list(Listing(copy, "sha256:x")) == ODD_PATHS
    # A damaged entry is a miss, and leaves no copy behind.
    os.unlink(copy)
    (entry,) = (tmp_path / "cache" / "listings").iterdir()
    entry.write_bytes(entry.read_bytes()[:-9])
    assert not cache.get_listing("sha256:x", copy)
    assert not os.path.exists(copy)
