"""Path listings of source layers, kept on disk.

A listing holds the normalized paths of one layer's tar, in tar order: a gzip
stream of lines, a header naming the layer, one JSON string per path, and a
trailer with the count (so a listing cut short is told apart from a short one).
It is written once and read as a stream as often as the hot-file plan needs, so
a layer of a million files costs disk, not memory.
"""

import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator

FORMAT = "lazypull-listing-2"
# Listings are read more often than written, and soon deleted: fast compression.
_LEVEL = 1


class ListingError(ValueError):
    """A listing file that is not a complete listing of the layer it should be."""


def write_listing(path: str, layer_digest: str, paths: Iterable[str]) -> int:
    """Write the listing of `layer_digest` to `path` (under a temporary name, renamed
    once complete); returns how many paths it holds."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-listing-")
    count = 0
    try:
        with os.fdopen(fd, "wb") as raw, \
                gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=_LEVEL, mtime=0) as out:
            out.write(_line({"format": FORMAT, "digest": layer_digest}))
            for item in paths:
                out.write(_line(item))
                count += 1
            out.write(_line({"count": count}))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return count


def _line(value: object) -> bytes:
    # ASCII JSON: a path's newlines and odd characters are escaped, never split a line.
    return json.dumps(value).encode("ascii") + b"\n"


def read_listing(path: str, layer_digest: str) -> Iterator[str]:
    """The paths of the listing at `path`, as they are read. Raises `ListingError`
    when the file is not a whole listing of `layer_digest` (possibly after some
    paths were given out), `OSError` when it cannot be read."""
    try:
        with gzip.open(path, "rb") as lines:
            header = _parse(next(lines, b""))
            if header != {"format": FORMAT, "digest": layer_digest}:
                raise ListingError(f"{path} is not a listing of {layer_digest}")
            count = 0
            for line in lines:
                item = _parse(line)
                if isinstance(item, str):
                    count += 1
                    yield item
                    continue
                if item != {"count": count} or next(lines, None) is not None:
                    raise ListingError(f"{path}: the trailer does not close the listing")
                return
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ListingError(f"{path} is corrupt: {exc}") from None
    raise ListingError(f"{path} ends before its trailer")


def _parse(line: bytes) -> object:
    try:
        return json.loads(line)
    except ValueError:
        raise ListingError(f"malformed listing line {line[:80]!r}") from None


def is_sound(path: str, layer_digest: str) -> bool:
    """Whether `path` holds a whole, readable listing of `layer_digest`."""
    try:
        for _ in read_listing(path, layer_digest):
            pass
    except (ListingError, OSError):
        return False
    return True


class Listing:
    """The paths of one layer, on disk; each iteration reads the file again."""

    def __init__(self, path: str, layer_digest: str):
        self.path = path
        self.layer_digest = layer_digest

    def __iter__(self) -> Iterator[str]:
        return read_listing(self.path, self.layer_digest)
