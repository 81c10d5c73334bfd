"""What a profiled prefetch through a gzip index fetches, with and without hot
checkpoints, and what they cost in index bytes; offline, from an OCI layout.

For an image in an OCI layout directory (one manifest) and an access profile, each
gzip layer is indexed at the given spacing; the profile's files are placed in their
layers as `lazypull index` places them. Per layer and in total it reports the index
size without and with hot checkpoints, and the compressed bytes of the spans that
hold the hot files' data (what the snapshotter's prefetch fetches). Figures are
reported, never asserted.

    python -m perf gzip-hot-spans LAYOUT PROFILE [--spacing BYTES] [--gap BYTES]
"""

import argparse
import io
import json
from pathlib import Path

import gzindex
from gzindex.builder import DEFAULT_MERGE_GAP, HOT_INDEX_SHARE, rescan_for_hot_files
from indexer import hotfiles
from oci.access_profile import parse_profile


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _prefetched(index: gzindex.GzipIndex, hot: list[str]) -> tuple[int, int]:
    """(compressed bytes, spans) holding the hot files' data."""
    entries = {entry.name: entry for entry in index.entries()}
    numbers: set[int] = set()
    for path in hot:
        entry = entries.get(path)
        if entry is not None and entry.type == "hardlink":
            entry = entries.get(entry.link_name)
        if entry is not None and entry.type == "reg" and entry.size:
            numbers.update(index.spans_for(entry.offset, entry.end))
    return sum(index.span(n).compressed_end - index.span(n).compressed_offset
               for n in numbers), len(numbers)


def _write(layer: gzindex.ScannedLayer, hot: list[str]) -> tuple[gzindex.GzipIndex, int]:
    out = io.BytesIO()
    layer.write(out, hot)
    return gzindex.GzipIndex.open(out.getvalue()), out.tell()


def measure(layout: Path, profile_path: Path, spacing: int, gap: int) -> dict:
    top = json.loads((layout / "index.json").read_text())["manifests"][0]
    manifest = json.loads(_blob(layout, top["digest"]).read_text())
    digests = [layer["digest"] for layer in manifest["layers"]]
    scanned = []
    for digest in digests:
        with open(_blob(layout, digest), "rb") as blob:
            scanned.append(gzindex.scan_layer(blob, spacing=spacing))
    profile = parse_profile(profile_path.read_bytes()).for_image("", {top["digest"]})
    paths = [hotfiles.LayerPaths(hotfiles.paths_of(e.name for e in s.entries()),
                                 frozenset({d, s.diff_id})) for d, s in zip(digests, scanned,
                                                                            strict=True)]
    per_layer, missing = hotfiles.plan(paths, profile)
    layers = []
    for digest, layer, hot in zip(digests, scanned, per_layer, strict=True):
        plain, plain_size = _write(layer, hot)
        with open(_blob(layout, digest), "rb") as blob:
            again = rescan_for_hot_files(layer, blob, hot, gap=gap) if hot else None
        cut, cut_size = _write(again, hot) if again else (plain, plain_size)
        before, after = _prefetched(plain, hot), _prefetched(cut, hot)
        layers.append({"digest": digest, "size": layer.layer_size, "hot_files": len(hot),
                       "spans": [plain.span_count, cut.span_count],
                       "index_bytes": [plain_size, cut_size],
                       "prefetch_bytes": [before[0], after[0]],
                       "prefetch_spans": [before[1], after[1]]})
        if again:
            again.close()
        layer.close()
    total = {key: [sum(layer[key][i] for layer in layers) for i in (0, 1)]
             for key in ("index_bytes", "prefetch_bytes", "prefetch_spans", "spans")}
    size = sum(layer["size"] for layer in layers)
    return {"spacing": spacing, "gap": gap, "index_share_limit": HOT_INDEX_SHARE,
            "layers": layers, "total": total, "layer_bytes": size,
            "index_share": [round(b / size, 5) for b in total["index_bytes"]],
            "missing_hot_files": len(missing)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf gzip-hot-spans",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("layout", type=Path, help="OCI layout directory of the image")
    parser.add_argument("profile", type=Path, help="access profile (docs/access-profile.md)")
    parser.add_argument("--spacing", type=int, default=gzindex.DEFAULT_SPACING)
    parser.add_argument("--gap", type=int, default=DEFAULT_MERGE_GAP,
                        help="hot extents closer than this share a run")
    args = parser.parse_args(argv)
    result = measure(args.layout, args.profile, args.spacing, args.gap)
    print(json.dumps(result, indent=1))
    return 0
