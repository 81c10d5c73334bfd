"""Snapshot metadata in SQLite, with containerd's snapshot semantics.

One connection, used from one thread at a time (the caller serializes), in WAL
mode. Every change is one transaction; `transaction()` lets the caller pair a
metadata change with a directory operation and commit only once both are done.
"""

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

SCHEMA_VERSION = 1
# containerd's labels.Validate: a key and its value together may not exceed 4096 bytes.
MAX_LABEL_SIZE = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, name)
);
"""


class Kind(IntEnum):
    # The values of containerd.services.snapshots.v1.Kind.
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass
class Info:
    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """What a mount needs: the snapshot's id, kind and its parents' ids, nearest first."""

    id: int
    kind: Kind
    parent_ids: list[int]


def validate_labels(labels: dict[str, str]) -> None:
    for key, value in labels.items():
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(f"label key and value greater than maximum size "
                                  f"({MAX_LABEL_SIZE} bytes), key: {key[:64]}")


def _now_ns() -> int:
    return time.time_ns()


class MetaStore:
    def __init__(self, path: str):
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed snapshot survives power loss, not only a killed process.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)
        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE .. COMMIT, rolled back if the block raises."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- reads -------------------------------------------------------------

    def _row(self, key: str) -> sqlite3.Row | tuple:
        row = self.db.execute(
            "SELECT id, parent_id, kind, created_ns, updated_ns FROM snapshots WHERE key=?",
            (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key}: snapshot does not exist")
        return row

    def _labels(self, snapshot_id: int) -> dict[str, str]:
        rows = self.db.execute("SELECT name, value FROM labels WHERE snapshot_id=?",
                               (snapshot_id,))
        return dict(rows.fetchall())

    def _key_of(self, snapshot_id: int | None) -> str:
        if snapshot_id is None:
            return ""
        row = self.db.execute("SELECT key FROM snapshots WHERE id=?", (snapshot_id,)).fetchone()
        return row[0] if row else ""

    def info(self, key: str) -> Info:
        sid, parent_id, kind, created, updated = self._row(key)
        return Info(key, self._key_of(parent_id), Kind(kind), created, updated,
                    self._labels(sid))

    def snapshot(self, key: str) -> Snapshot:
        sid, parent_id, kind, _, _ = self._row(key)
        return Snapshot(sid, Kind(kind), self._parent_chain(parent_id))

    def _parent_chain(self, parent_id: int | None) -> list[int]:
        """Ids of the parent and its ancestors, nearest first, in one query."""
        if parent_id is None:
            return []
        rows = self.db.execute(
            "WITH RECURSIVE chain(id, parent_id, depth) AS ("
            " SELECT id, parent_id, 0 FROM snapshots WHERE id=?"
            " UNION ALL SELECT s.id, s.parent_id, c.depth + 1"
            " FROM snapshots s JOIN chain c ON s.id = c.parent_id)"
            " SELECT id FROM chain ORDER BY depth", (parent_id,))
        return [row[0] for row in rows]

    def usage(self, key: str) -> tuple[int, Kind, int, int]:
        """(id, kind, size, inodes); size and inodes are stored for committed snapshots."""
        row = self.db.execute("SELECT id, kind, size, inodes FROM snapshots WHERE key=?",
                              (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key}: snapshot does not exist")
        return row[0], Kind(row[1]), row[2], row[3]

    def walk(self) -> Iterator[Info]:
        rows = self.db.execute(
            "SELECT s.id, s.key, p.key, s.kind, s.created_ns, s.updated_ns "
            "FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id ORDER BY s.key")
        labels: dict[int, dict[str, str]] = {}
        for sid, name, value in self.db.execute("SELECT snapshot_id, name, value FROM labels"):
            labels.setdefault(sid, {})[name] = value
        for sid, key, parent, kind, created, updated in rows.fetchall():
            yield Info(key, parent or "", Kind(kind), created, updated, labels.get(sid, {}))

    def ids(self) -> set[int]:
        return {row[0] for row in self.db.execute("SELECT id FROM snapshots")}

    # -- writes (inside transaction()) --------------------------------------

    def create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> Snapshot:
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(f"snapshot type {kind.label} invalid; only snapshots of type "
                                  "Active or View can be created")
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        validate_labels(labels)
        parent_id = None
        if parent:
            row = self.db.execute("SELECT id, kind FROM snapshots WHERE key=?",
                                  (parent,)).fetchone()
            if row is None:
                raise NotFound(f"missing parent {parent!r} bucket: not found")
            if row[1] != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not committed snapshot")
            parent_id = row[0]
        now = _now_ns()
        try:
            cursor = self.db.execute(
                "INSERT INTO snapshots (key, parent_id, kind, created_ns, updated_ns) "
                "VALUES (?, ?, ?, ?, ?)", (key, parent_id, int(kind), now, now))
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"snapshot {key}: already exists") from None
        sid = cursor.lastrowid
        assert sid is not None
        self._write_labels(sid, labels)
        return Snapshot(sid, kind, self._parent_chain(parent_id))

    def create_committed(self, name: str, parent: str, labels: dict[str, str],
                         size: int) -> Snapshot:
        """A committed snapshot made directly, for a layer mounted lazily: it never was
        an active snapshot, and its usage is the layer's size."""
        validate_labels(labels)
        if self.db.execute("SELECT 1 FROM snapshots WHERE key=?", (name,)).fetchone():
            raise AlreadyExists(f"snapshot {name}: already exists")
        snap = self.create(Kind.ACTIVE, name, parent, labels)
        self.db.execute("UPDATE snapshots SET kind=?, size=? WHERE id=?",
                        (int(Kind.COMMITTED), size, snap.id))
        return Snapshot(snap.id, Kind.COMMITTED, snap.parent_ids)

    def exists(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM snapshots WHERE key=?", (key,)).fetchone() is not None

    def _write_labels(self, sid: int, labels: dict[str, str]) -> None:
        self.db.execute("DELETE FROM labels WHERE snapshot_id=?", (sid,))
        # An empty value means "no such label", as in containerd's label storage.
        self.db.executemany("INSERT INTO labels (snapshot_id, name, value) VALUES (?, ?, ?)",
                            [(sid, k, v) for k, v in labels.items() if v])

    def commit(self, key: str, name: str, labels: dict[str, str], size: int,
               inodes: int) -> int:
        validate_labels(labels)
        if not name:
            raise InvalidArgument("committed snapshot name must not be empty")
        if self.db.execute("SELECT 1 FROM snapshots WHERE key=?", (name,)).fetchone():
            raise AlreadyExists(f"committed snapshot {name}: already exists")
        row = self.db.execute("SELECT id, kind FROM snapshots WHERE key=?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"failed to get active snapshot {key!r}: not found")
        if row[1] != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        now = _now_ns()
        self.db.execute(
            "UPDATE snapshots SET key=?, kind=?, created_ns=?, updated_ns=?, size=?, inodes=? "
            "WHERE id=?", (name, int(Kind.COMMITTED), now, now, size, inodes, row[0]))
        self._write_labels(row[0], labels)  # replaced, not inherited, as containerd does
        return row[0]

    def update(self, key: str, labels: dict[str, str], field_paths: list[str]) -> Info:
        info = self.info(key)
        new_labels = dict(info.labels)
        if field_paths:
            for path in field_paths:
                if path.startswith("labels."):
                    label = path[len("labels."):]
                    if label in labels:
                        new_labels[label] = labels[label]
                    else:
                        new_labels.pop(label, None)
                elif path == "labels":
                    new_labels = dict(labels)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {key!r}")
        else:
            new_labels = dict(labels)
        validate_labels(new_labels)
        sid = self._row(key)[0]
        info.updated_ns = _now_ns()
        self.db.execute("UPDATE snapshots SET updated_ns=? WHERE id=?", (info.updated_ns, sid))
        self._write_labels(sid, new_labels)
        info.labels = new_labels
        return info

    def remove(self, key: str) -> tuple[int, Kind]:
        sid, _, kind, _, _ = self._row(key)
        if self.db.execute("SELECT 1 FROM snapshots WHERE parent_id=? LIMIT 1",
                           (sid,)).fetchone():
            raise FailedPrecondition(f"cannot remove snapshot {key!r} with child")
        self.db.execute("DELETE FROM snapshots WHERE id=?", (sid,))
        return sid, Kind(kind)
