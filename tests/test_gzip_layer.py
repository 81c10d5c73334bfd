"""An unmodified gzip layer read through its gzip index with the lazy path's own
parts: the tree built into index.db, the LayerFetcher with the span decoder, the
chunk cache. (End to end through containerd: test_gzip_index_mount.py.)"""

import asyncio
import hashlib
import io
import os
import random
import tarfile
from pathlib import Path

import pytest

import gzindex
from snapshotter.lazy.chunk_cache import ChunkCache
from snapshotter.lazy.fetcher import ChunkVerificationError, LayerFetcher
from snapshotter.lazy.gzip_layer import (
    GzipLayer,
    GzipSpanDecoder,
    build_gzip_layer,
    layer_footer,
    load_gzip_layer,
)
from snapshotter.lazy.layer_chunks import wanted_digests
from snapshotter.lazy.layer_files import GZIP_INDEX_KIND, LayerRecord

from .test_gzip_index import gzip_layer, index_of, random_tar, tar_members

SPACING = 16 << 10


def _layer(tmp_path: Path, blob: bytes, index_blob: bytes, name: str = "index.db"
           ) -> GzipLayer:
    index = gzindex.GzipIndex.open(index_blob)
    digest = "sha256:" + hashlib.sha256(index_blob).hexdigest()
    layer = build_gzip_layer(index, digest, len(blob), str(tmp_path / name))
    layer.decoder = GzipSpanDecoder(index)
    return layer


def _fetcher(layer: GzipLayer, blob: bytes, cache: ChunkCache, requests: list[tuple[int, int]]
             ) -> LayerFetcher:
    async def read_range(offset: int, length: int) -> bytes:
        requests.append((offset, length))
        return blob[offset:offset + length]

    return LayerFetcher(layer, read_range, cache, decoder=layer.decoder, read_timeout=30)


async def _read_all(fetcher: LayerFetcher, layer: GzipLayer) -> dict[str, bytes]:
    out = {}
    for path, node in layer.walk():
        if node.kind == "reg":
            out[path] = await fetcher.read(node, 0, node.size)
    return out


@pytest.mark.parametrize("seed", [1, 7, 23])
def test_every_file_reads_back_as_the_tar_holds_it(tmp_path: Path, seed: int) -> None:
    tar = random_tar(seed)
    blob = gzip_layer(tar, 6, 3, random.Random(seed))
    layer = _layer(tmp_path, blob, index_of(blob, SPACING))
    members = {m.name: m for m in tar_members(tar)}
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    requests: list[tuple[int, int]] = []
    fetcher = _fetcher(layer, blob, cache, requests)
    files = asyncio.run(_read_all(fetcher, layer))
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for path, data in files.items():
            member = members[path]
            target = member if not member.islnk() else members[member.linkname]
            extracted = archive.extractfile(target)
            assert extracted is not None
            assert data == extracted.read(), path
    for path, node in layer.walk():
        if path and not node.implicit and node.kind != "reg":
            member = members[path]
            assert node.mode & 0o7777 == member.mode & 0o7777
            if node.kind == "symlink":
                assert node.link_target == member.linkname
    assert layer.lookup("d/.wh.gone") is not None
    # Files share spans: far fewer requests than files.
    assert len(requests) < len(files)
    # Slices of partial reads across span boundaries.
    big = layer.lookup("big0")
    assert big is not None
    member = members["big0"]
    start = member.offset_data
    for offset, length in [(0, 1), (SPACING - 3, 7), (big.size - 5, 100), (12345, 70_000)]:
        got = asyncio.run(fetcher.read(big, offset, length))
        assert got == tar[start + offset:start + min(offset + length, big.size)]


def test_a_flipped_blob_byte_fails_the_read_never_wrong_bytes(tmp_path: Path) -> None:
    tar = random_tar(3)
    blob = gzip_layer(tar, 6, 1, random.Random(3))
    layer = _layer(tmp_path, blob, index_of(blob, SPACING))
    node = layer.lookup("big0")
    assert node is not None
    chunk = layer.chunks(node)[1]
    bad = bytearray(blob)
    bad[(chunk.blob_offset + chunk.blob_end) // 2] ^= 0x20
    fetcher = _fetcher(layer, bytes(bad), ChunkCache(str(tmp_path / "cache"), 1 << 30), [])
    with pytest.raises(ChunkVerificationError):
        asyncio.run(fetcher.read(node, chunk.file_offset, 10))


def test_hot_files_drive_the_prefetch(tmp_path: Path) -> None:
    tar = random_tar(5)
    blob = gzip_layer(tar, 6, 1, random.Random(5))
    layer = _layer(tmp_path, blob, index_of(blob, SPACING, hot=("big0", "d/f3")))
    spans = layer.prefetch_span_ranges()
    assert spans
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    requests: list[tuple[int, int]] = []
    fetcher = _fetcher(layer, blob, cache, requests)
    asyncio.run(fetcher.prefetch())
    fetched = len(requests)
    assert fetched > 0
    for path in ("big0", "d/f3"):
        node = layer.lookup(path)
        assert node is not None
        asyncio.run(fetcher.read(node, 0, node.size))
    assert len(requests) == fetched  # the hot files were local
    # The warm set wants those spans, and all spans when full.
    assert set(wanted_digests(layer, False)) < set(wanted_digests(layer, True))
    asyncio.run(fetcher.fetch_all())
    assert fetcher.is_complete()


def test_a_layer_without_hot_files_prefetches_nothing(tmp_path: Path) -> None:
    blob = gzip_layer(random_tar(9), 6, 2, random.Random(9))
    layer = _layer(tmp_path, blob, index_of(blob, SPACING))
    requests: list[tuple[int, int]] = []
    fetcher = _fetcher(layer, blob, ChunkCache(str(tmp_path / "cache"), 1 << 30), requests)
    assert asyncio.run(fetcher.prefetch()) == 0
    assert requests == []


def test_a_stored_layer_reopens_and_rebuilds_from_the_stored_index(tmp_path: Path) -> None:
    tar = random_tar(11)
    blob = gzip_layer(tar, 6, 1, random.Random(11))
    index_blob = index_of(blob, SPACING)
    (tmp_path / "gzip-index").write_bytes(index_blob)
    digest = "sha256:" + hashlib.sha256(index_blob).hexdigest()
    record = LayerRecord("reg.example/x:1", "sha256:" + hashlib.sha256(blob).hexdigest(),
                         len(blob), "application/vnd.oci.image.layer.v1.tar+gzip", digest,
                         "gzip", len(blob), 0, len(blob), 0, None, kind=GZIP_INDEX_KIND)
    first = load_gzip_layer(str(tmp_path / "gzip-index"), record, str(tmp_path / "index.db"))
    count = first.entry_count
    first.close()
    again = load_gzip_layer(str(tmp_path / "gzip-index"), record, str(tmp_path / "index.db"))
    assert again.entry_count == count
    again.close()
    # A torn tree is built again; a stored index blob that is not the recorded one is refused.
    os.unlink(tmp_path / "index.db")
    (tmp_path / "gzip-index").write_bytes(index_of(blob, 2 * SPACING))
    with pytest.raises(gzindex.IndexFormatError):
        load_gzip_layer(str(tmp_path / "gzip-index"), record, str(tmp_path / "index.db"))
    # A tree of another index (or of a TOC) is not taken for this one.
    assert GzipLayer.open_index(str(tmp_path / "index.db"), layer_footer(len(blob)),
                                digest) is None
