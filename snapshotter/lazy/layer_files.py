"""A lazy layer's files on disk, stored with its snapshot in ROOT/snapshots/<id>/:
`toc` (the TOC as the blob holds it), `layer.json` (where the blob is and how to
verify it), `index.db` (the tree built from the TOC, reopened as it is after a
restart) and `fs`, a symlink to the layer's directory in the FUSE mount. So a
restart remounts every layer from local state, without the registry. A layer wanted
local for good is also written out as `tree`, a plain directory (materialize.py).

Kept apart from the FUSE side: the service reads these files and never mounts, and
it loads the format library only if it opens a layer (the FUSE manager does).
"""

import json
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import estargz
    from estargz.footer import Footer

    from .remote import RemoteLayer

LAYER_FILE = "layer.json"
TOC_FILE = "toc"
INDEX_FILE = "index.db"  # the layer's tree, built from the TOC
GZIP_INDEX_FILE = "gzip-index"  # an unmodified gzip layer's index blob, in place of a TOC
TREE_DIR = "tree"  # the layer written out as a plain directory
TOC_KIND = "toc"
GZIP_INDEX_KIND = "gzip-index"


@dataclass(frozen=True)
class LayerRecord:
    """What a restart needs to serve a lazy layer again."""

    reference: str
    digest: str
    size: int
    media_type: str
    toc_digest: str
    compression: str
    toc_offset: int
    toc_length: int
    payload_end: int
    footer_size: int
    toc_uncompressed_size: int | None
    manifest_digest: str | None = None  # of the image's platform manifest, when labelled
    # How the layer is read: through its TOC, or (an unmodified gzip layer) through its
    # gzip index, whose digest is then `toc_digest`.
    kind: str = TOC_KIND

    @classmethod
    def of(cls, remote: "RemoteLayer") -> "LayerRecord":
        f = remote.footer
        return cls(str(remote.source.reference), remote.descriptor.digest,
                   remote.descriptor.size, remote.descriptor.media_type, remote.toc_digest,
                   str(f.compression), f.toc_offset, f.toc_length, f.payload_end, f.footer_size,
                   f.toc_uncompressed_size, remote.source.manifest_digest)

    @property
    def footer(self) -> "Footer":
        from estargz.footer import Compression, Footer

        return Footer(Compression(self.compression), self.toc_offset, self.toc_length,
                      self.payload_end, self.footer_size, self.toc_uncompressed_size)


def write_layer_files(directory: str, remote: "RemoteLayer") -> None:
    with open(os.path.join(directory, TOC_FILE), "wb") as f:
        f.write(remote.toc_bytes)
    write_layer_record(directory, LayerRecord.of(remote))


def write_layer_record(directory: str, record: LayerRecord) -> None:
    with open(os.path.join(directory, LAYER_FILE), "w") as f:
        json.dump(asdict(record), f)


def tree_path(directory: str) -> str:
    return os.path.join(directory, TREE_DIR)


def is_lazy_snapshot_dir(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, LAYER_FILE))


def read_layer_record(directory: str) -> LayerRecord:
    with open(os.path.join(directory, LAYER_FILE)) as f:
        return LayerRecord(**json.load(f))


def load_layer_files(directory: str) -> tuple[LayerRecord, "estargz.Layer"]:
    """The layer stored in `directory`: its kept index, or one built again from the
    TOC (after a crash during a build, or by an older version)."""
    import estargz

    record = read_layer_record(directory)
    index_path = os.path.join(directory, INDEX_FILE)
    if record.kind == GZIP_INDEX_KIND:
        from .gzip_layer import load_gzip_layer

        return record, load_gzip_layer(os.path.join(directory, GZIP_INDEX_FILE), record,
                                       index_path)
    layer = estargz.Layer.open_index(index_path, record.footer, record.toc_digest)
    if layer is not None:
        return record, layer
    with open(os.path.join(directory, TOC_FILE), "rb") as f:
        return record, estargz.load_toc(record.footer, f, record.toc_digest,
                                        index_path=index_path)
