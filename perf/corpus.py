"""Realistic layer tars for benchmarks, built from directory trees on this machine.

Synthetic data compresses either far better (repeated bytes) or far worse (random
bytes) than a real image, and has none of its many small files; a slice of a real
tree gives both a realistic compression ratio and a realistic member count.
"""

import os
import stat
import sysconfig
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import BinaryIO

# Stop once this share of the target is in: what is left would take many tiny files.
FULL = 0.99
# A regular file's tar headers (PAX record plus ustar block) rarely take more than this.
HEADER_ROOM = 3 * 512


@dataclass(frozen=True)
class Source:
    root: Path
    exclude: frozenset[Path] = frozenset()


@dataclass
class LayerTar:
    path: Path
    size: int = 0  # bytes of the tar file
    entries: int = 0
    regular_files: int = 0
    roots: list[str] = field(default_factory=list)  # the sources that went in
    short: bool = False  # the sources ran out before the target was reached


def default_sources() -> list[Source]:
    """The running interpreter's stdlib, then Perl's and the shared-library trees for
    when a larger tar is asked for. site-packages is left out: it is third-party and
    differs from machine to machine, the stdlib does not."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = frozenset({stdlib / "site-packages", stdlib / "dist-packages"})
    extra = [*sorted(glob("/usr/share/perl*")), "/usr/lib/x86_64-linux-gnu"]
    return [Source(stdlib, skip)] + [Source(Path(p)) for p in extra if os.path.isdir(p)]


def build_layer_tar(dest: Path, sources: list[Source], target_bytes: int) -> LayerTar:
    """Write a PAX tar (what BuildKit and Docker emit) of the sources, in order, to
    `dest`: about `target_bytes` long, never longer by more than the end blocks. A
    file that would overshoot is skipped and smaller ones after it still go in."""
    layer = LayerTar(dest)
    with (
        open(dest, "wb") as out,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        added: set[str] = set()
        for source in sources:
            if out.tell() >= target_bytes * FULL:
                break
            layer.roots.append(str(source.root))
            _add_tree(tar, out, source, target_bytes, added, layer)
        layer.short = out.tell() < target_bytes * FULL
    layer.size = dest.stat().st_size
    return layer


def _add_tree(
    tar: tarfile.TarFile,
    out: BinaryIO,
    source: Source,
    target_bytes: int,
    added: set[str],
    layer: LayerTar,
) -> None:
    # Ancestors first, so the layer extracts with its directories' real modes.
    ancestors = [p for p in reversed(source.root.parents) if p != Path(p.anchor)]
    for path in [*ancestors, *_walk(source)]:
        room = target_bytes - out.tell()
        if room <= target_bytes * (1 - FULL):
            return
        if _file_size(path) + HEADER_ROOM > room:
            continue
        arcname = str(path).lstrip("/")
        if arcname in added:
            continue
        info = _add(tar, path, arcname)
        if info is not None:
            added.add(arcname)
            layer.entries += 1
            layer.regular_files += info.isreg()


def _walk(source: Source) -> Iterator[Path]:
    """Every path under the root, parents before children, sorted so that the same
    tree always gives the same tar."""
    for dirpath, dirnames, filenames in os.walk(source.root):
        here = Path(dirpath)
        # os.walk lists symlinks to directories with the directories but never yields them.
        links = [d for d in dirnames if (here / d).is_symlink()]
        dirnames[:] = sorted(
            d for d in dirnames if d not in links and here / d not in source.exclude
        )
        yield here
        for name in sorted(filenames + links):
            yield here / name


def _file_size(path: Path) -> int:
    try:
        st = os.lstat(path)
    except OSError:
        return 0  # _add skips it
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _add(tar: tarfile.TarFile, path: Path, arcname: str) -> tarfile.TarInfo | None:
    try:
        info = tar.gettarinfo(str(path), arcname=arcname)
        if info is None:  # a socket, which no layer holds
            return None
        if info.isreg():
            with open(path, "rb") as payload:
                tar.addfile(info, payload)
        else:
            tar.addfile(info)
    except (PermissionError, FileNotFoundError):
        return None  # unreadable or gone since the walk; the tar is still whole
    return info
