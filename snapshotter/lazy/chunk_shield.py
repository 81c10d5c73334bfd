"""Protection in the chunk index: who holds which digests (`add_holds`,
`drop_owner`), and which protected chunks eviction skips (`Shield`), kept up to date
without listing them.

Stored protected chunks are ranked by their latest protection, most recent first (ties
by digest, larger first), and the longest prefix of that ranking that fits in `budget`
bytes is shielded; everything after it is evictable like any other chunk. The prefix
is described by its boundary alone: `floor`, the best-ranked stored protected chunk
that is not shielded (None when all of them are), and the bytes above it. A chunk is
shielded if it is protected and ranks above the floor.

A chunk stored or forgotten moves the boundary by a few indexed queries (`stored`,
`removed`); protect and release recompute it in one pass over the `shield` table.

`hand` speeds up eviction, which walks chunks in LRU order: every chunk whose
(used, size, rowid) is at or below it is shielded, so the walk resumes after it
instead of stepping over the same shielded chunks on every put. A chunk that leaves
the shield moves the hand back before it.

Not thread-safe: the cache calls all of it under its write lock.
"""

import sqlite3
from dataclasses import dataclass, replace

from .chunk_index import one

Key = tuple[int, bytes]  # (rank, digest)
Position = tuple[int, int, int]  # (used, size, rowid) in the chunks_by_use order
START: Position = (-1, 0, 0)  # before every chunk
_AFTER_ALL_SIZES = 1 << 62


@dataclass
class Floor:
    rank: int
    digest: bytes
    size: int

    @property
    def key(self) -> Key:
        return (self.rank, self.digest)


@dataclass
class ShieldState:
    active: bool = False  # whether any digest is protected at all
    floor: Floor | None = None
    shielded_bytes: int = 0
    hand: Position = START


class Shield:
    def __init__(self, budget: float):
        self.budget = budget
        self.state = ShieldState()

    def covers(self, rank: int | None, digest: bytes) -> bool:
        """Whether a stored chunk with this rank (None: not protected) is shielded."""
        if rank is None:
            return False
        floor = self.state.floor
        return floor is None or (rank, digest) > floor.key

    def snapshot(self) -> ShieldState:
        return replace(self.state)

    def restore(self, state: ShieldState) -> None:
        self.state = state

    def recompute(self, db: sqlite3.Connection) -> None:
        active = one(db, "SELECT EXISTS (SELECT 1 FROM shield)")[0] == 1
        boundary = one(db, """
            SELECT rank, digest, size, total FROM (
                SELECT rank, digest, size, sum(size) OVER (
                    ORDER BY rank DESC, digest DESC ROWS UNBOUNDED PRECEDING) AS total
                FROM shield WHERE size IS NOT NULL)
            WHERE total > ? LIMIT 1""", (self.budget,))
        if boundary is None:
            total = one(db, "SELECT coalesce(sum(size), 0) FROM shield WHERE size IS NOT NULL")
            self.state = ShieldState(active, None, total[0], START)
        else:
            rank, digest, size, total = boundary
            self.state = ShieldState(active, Floor(rank, digest, size), total - size, START)

    def stored(self, db: sqlite3.Connection, rank: int, digest: bytes, size: int) -> None:
        """A protected chunk was stored."""
        state = self.state
        if state.floor is not None and (rank, digest) < state.floor.key:
            return  # ranks below the boundary: evictable, the prefix is unchanged
        state.shielded_bytes += size
        while state.shielded_bytes > self.budget:  # the prefix gives up its lowest ranks
            lowest = _lowest_shielded(db, state.floor)
            assert lowest is not None, "shielded bytes without shielded chunks"
            rank, digest, size, used = lowest
            state.floor = Floor(rank, digest, size)
            state.shielded_bytes -= size
            state.hand = min(state.hand, (used - 1, _AFTER_ALL_SIZES, 0))

    def removed(self, db: sqlite3.Connection, rank: int, digest: bytes, size: int) -> None:
        """A protected chunk is no longer stored (its shield row says so already)."""
        state = self.state
        floor = state.floor
        if floor is not None:
            if (rank, digest) < floor.key:
                return
            if (rank, digest) == floor.key:
                state.floor = _next_below(db, floor.key)
            else:
                state.shielded_bytes -= size
        else:
            state.shielded_bytes -= size
        while state.floor is not None and \
                state.shielded_bytes + state.floor.size <= self.budget:
            state.shielded_bytes += state.floor.size  # room again: the prefix grows
            state.floor = _next_below(db, state.floor.key)


def _lowest_shielded(db: sqlite3.Connection,
                     floor: Floor | None) -> tuple[int, bytes, int, int] | None:
    above, args = ("AND (s.rank, s.digest) > (?, ?)", floor.key) if floor else ("", ())
    return one(db, f"""
        SELECT s.rank, s.digest, s.size, c.used
        FROM shield s JOIN chunks c ON c.digest = s.digest
        WHERE s.size IS NOT NULL {above}
        ORDER BY s.rank, s.digest LIMIT 1""", args)


def _next_below(db: sqlite3.Connection, key: Key) -> Floor | None:
    row = one(db, """
        SELECT rank, digest, size FROM shield
        WHERE size IS NOT NULL AND (rank, digest) < (?, ?)
        ORDER BY rank DESC, digest DESC LIMIT 1""", key)
    return Floor(*row) if row else None


def add_holds(staging: sqlite3.Connection, owner: str, rank: int) -> None:
    """The digests in `staging`'s temp.staged table (indexed by digest) become
    `owner`'s holds, all ranked `rank` (the highest yet), in one transaction. Read in
    order, so the B-trees are filled in order."""
    staging.execute("BEGIN IMMEDIATE")
    try:
        staging.execute("""
            INSERT INTO owners (name, last_rank) VALUES (?, ?)
            ON CONFLICT (name) DO UPDATE SET last_rank = excluded.last_rank""",
                        (owner, rank))
        owner_id = one(staging, "SELECT id FROM owners WHERE name = ?", (owner,))[0]
        staging.execute("""
            INSERT INTO holds (digest, owner, rank)
            SELECT DISTINCT digest, ?, ? FROM temp.staged WHERE true ORDER BY digest
            ON CONFLICT (digest, owner) DO UPDATE SET rank = excluded.rank""",
                        (owner_id, rank))
        staging.execute("""
            INSERT INTO shield (digest, rank, size)
            SELECT s.digest, ?, c.size
            FROM (SELECT DISTINCT digest FROM temp.staged) s
            LEFT JOIN chunks c ON c.digest = s.digest
            WHERE true ORDER BY s.digest
            ON CONFLICT (digest) DO UPDATE SET rank = excluded.rank""", (rank,))
        staging.execute("COMMIT")
    except BaseException:
        if staging.in_transaction:
            staging.execute("ROLLBACK")
        raise


def drop_owner(db: sqlite3.Connection, owner_id: int) -> None:
    """Remove an owner's holds; each digest keeps the rank of its latest other holder,
    or leaves the shield table."""
    db.execute("""
        DELETE FROM shield
        WHERE digest IN (SELECT digest FROM holds WHERE owner = ?)
          AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.digest = shield.digest
                                                  AND h.owner != ?)""", (owner_id, owner_id))
    db.execute("""
        UPDATE shield SET rank = (SELECT max(h.rank) FROM holds h
                                  WHERE h.digest = shield.digest AND h.owner != ?)
        WHERE digest IN (SELECT digest FROM holds WHERE owner = ?)""", (owner_id, owner_id))
    db.execute("DELETE FROM holds WHERE owner = ?", (owner_id,))
    db.execute("DELETE FROM owners WHERE id = ?", (owner_id,))
