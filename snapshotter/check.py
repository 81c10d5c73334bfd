"""`lazypull check`: do the metadata, the snapshot directories and the mounts agree?

What a crash can leave, and what is done about it with `repair`:
- a directory under snapshots/ that no snapshot names (a create or remove cut short):
  removed, as the service's own recovery does at start;
- a lazy layer's index that is torn or made for another TOC: removed, to be rebuilt
  from the layer's TOC when it is served again;
- the FUSE mount left disconnected by a killed manager: unmounted (the next manager
  mounts it again).
- a chunk in the cache (ROOT/cache) whose bytes do not match its digest, or a row
  whose file is gone: dropped (check_chunks), once no FUSE manager runs on the root.
What cannot be repaired here is reported: a snapshot whose directory is gone, a lazy
layer whose record or TOC is unreadable, a metadata database that fails SQLite's
integrity check. Repairs are refused while the service runs on the root: it is the
one writer of its state.
"""

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess

from .check_chunks import check_chunk_cache, manager_holds, repair_chunk
from .check_types import Finding
from .lazy.layer_files import (
    GZIP_INDEX_FILE,
    GZIP_INDEX_KIND,
    INDEX_FILE,
    LAYER_FILE,
    TOC_FILE,
    LayerRecord,
    read_layer_record,
)
from .metadata import Kind


def check(root: str, repair: bool = False) -> list[Finding]:
    """Every disagreement found under `root` (repaired where possible if `repair`)."""
    root = os.path.abspath(root)
    findings: list[Finding] = []
    snapshots = _read_metadata(root, findings)
    if snapshots is not None:
        findings += _check_directories(root, snapshots)
    findings += _check_fuse_mount(root)
    cache_dir = os.path.join(root, "cache")
    findings += check_chunk_cache(cache_dir)
    if repair:
        manager_runs = manager_holds(root)
        for finding in findings:
            if not finding.repairable:
                continue
            if finding.problem.startswith("chunk-"):
                if manager_runs:
                    finding.detail += " (not repaired: a FUSE manager runs on this root)"
                    continue
                repair_chunk(finding, cache_dir)
            else:
                _repair(finding)
            finding.repaired = True
    return findings


def _read_metadata(root: str, findings: list[Finding]) -> dict[int, int] | None:
    """Snapshot id -> kind, read without writing; None if the database is unusable."""
    path = os.path.join(root, "metadata.db")
    if not os.path.exists(path):
        return {}  # nothing was ever made here
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
            if verdict != "ok":
                findings.append(Finding("metadata-corrupt", path, verdict, False))
                return None
            return dict(db.execute("SELECT id, kind FROM snapshots"))
        finally:
            db.close()
    except sqlite3.Error as exc:
        findings.append(Finding("metadata-unreadable", path, str(exc), False))
        return None


def _check_directories(root: str, snapshots: dict[int, int]) -> list[Finding]:
    found: list[Finding] = []
    directory = os.path.join(root, "snapshots")
    present = set(os.listdir(directory)) if os.path.isdir(directory) else set()
    for name in sorted(present - {str(sid) for sid in snapshots}):
        found.append(Finding("orphan-directory", os.path.join(directory, name),
                             "no snapshot names it (an interrupted create or remove)", True))
    for sid, kind in sorted(snapshots.items()):
        path = os.path.join(directory, str(sid))
        if str(sid) not in present:
            found.append(Finding("missing-directory", path,
                                 f"snapshot id {sid} has no directory", False))
        elif os.path.exists(os.path.join(path, LAYER_FILE)):
            found += _check_lazy_layer(root, path)
        else:
            wanted = ("fs", "work") if kind == Kind.ACTIVE else ("fs",)
            missing = [d for d in wanted if not os.path.isdir(os.path.join(path, d))]
            if missing:
                found.append(Finding("incomplete-directory", path,
                                     f"missing {', '.join(missing)}", False))
    return found


def _check_lazy_layer(root: str, path: str) -> list[Finding]:
    try:
        record = read_layer_record(path)
    except (OSError, ValueError, TypeError) as exc:
        return [Finding("lazy-record-unreadable", os.path.join(path, LAYER_FILE), str(exc),
                        False)]
    found = []
    # A plain gzip layer keeps its gzip index where a converted one keeps its TOC.
    toc = os.path.join(path, GZIP_INDEX_FILE if record.kind == GZIP_INDEX_KIND else TOC_FILE)
    if not os.path.isfile(toc):
        found.append(Finding("lazy-toc-missing", toc, f"layer {record.digest}", False))
    fs = os.path.join(path, "fs")
    target = os.readlink(fs) if os.path.islink(fs) else None
    if target is None or os.path.dirname(target) != os.path.join(root, "fuse"):
        found.append(Finding("lazy-link-wrong", fs, f"points to {target!r}, not into "
                             f"{os.path.join(root, 'fuse')}", False))
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index) and not _index_fits(index, record):
        found.append(Finding("lazy-index-stale", index,
                             "torn or made for another TOC: rebuilt when served", True))
    return found


def _index_fits(index: str, record: LayerRecord) -> bool:
    from estargz import Layer  # only for lazy layers: the format library is large

    layer = Layer.open_index(index, record.footer, record.toc_digest)
    if layer is None:
        return False
    layer.close()
    return True


def _check_fuse_mount(root: str) -> list[Finding]:
    mountpoint = os.path.join(root, "fuse")
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return [Finding("fuse-disconnected", mountpoint,
                            "the FUSE manager that served it is gone", True)]
    return []


def _repair(finding: Finding) -> None:
    if finding.problem == "orphan-directory":
        shutil.rmtree(finding.path, ignore_errors=True)
    elif finding.problem == "lazy-index-stale":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(finding.path)
    elif finding.problem == "fuse-disconnected":
        subprocess.run(["umount", "-l", finding.path], check=False, capture_output=True)
