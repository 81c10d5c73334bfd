"""On-disk conversion cache, so converting the same image again is cheap.

Two kinds of entries, both named by content:
- the path listing of a source layer (see listing.py), keyed by the layer's digest;
- a converted blob with its build result, keyed by the conversion key (source
  digest + format options + the hot files placed in that layer).
Entries are written to a temporary name and renamed, so a crash never leaves a
half-written entry that looks complete.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from .listing import is_sound


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lazypull", "convert")


@dataclass(frozen=True)
class CachedBlob:
    path: str
    result: dict[str, Any]


def _name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ConversionCache:
    def __init__(self, root: str):
        self.root = root
        for sub in ("listings", "blobs"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)

    def _atomic_write(self, path: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    # -- listings ----------------------------------------------------------

    def _listing_path(self, layer_digest: str) -> str:
        # Listings of the earlier form (one JSON document, .json.gz) are never read:
        # loading one took memory for every path.
        return os.path.join(self.root, "listings", _name(layer_digest) + ".paths.gz")

    def get_listing(self, layer_digest: str, dest: str) -> bool:
        """Copy the layer's cached listing to `dest`, if there is a sound one. The copy
        is the one checked, so what the caller reads is what was checked."""
        try:
            shutil.copyfile(self._listing_path(layer_digest), dest)
        except OSError:
            return False
        if is_sound(dest, layer_digest):
            return True
        os.unlink(dest)
        return False

    def put_listing(self, layer_digest: str, listing_path: str) -> None:
        """Keep a copy of the listing file at `listing_path`."""
        path = self._listing_path(layer_digest)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        os.close(fd)
        shutil.copyfile(listing_path, tmp)
        os.replace(tmp, path)

    # -- converted blobs ---------------------------------------------------

    def get_blob(self, key: str) -> CachedBlob | None:
        base = os.path.join(self.root, "blobs", _name(key))
        try:
            with open(base + ".json", encoding="utf-8") as f:
                meta = json.load(f)
            size = os.path.getsize(base + ".blob")
        except (OSError, ValueError):
            return None
        if meta.get("key") != key or meta.get("result", {}).get("blob_size") != size:
            return None
        return CachedBlob(base + ".blob", meta["result"])

    def put_blob(self, key: str, blob_path: str, result: dict[str, Any]) -> CachedBlob:
        base = os.path.join(self.root, "blobs", _name(key))
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(base), prefix=".tmp-")
        os.close(fd)
        shutil.copyfile(blob_path, tmp)
        os.replace(tmp, base + ".blob")
        # The metadata lands last: an entry counts only once both files exist.
        self._atomic_write(base + ".json", json.dumps({"key": key, "result": result}).encode())
        return CachedBlob(base + ".blob", result)
