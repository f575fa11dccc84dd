"""SQLite store of sturdy refs: synchronous, no RPC.

Tables: ``objects`` (what to restore: service, category, description, sealed
nested refs), ``refs`` (sha256 of a secret -> object; one object may have many
refs), ``groups``. Non-persistent refs carry the node instance that made them
and are purged when a new node instance starts.

A ref minted by a holder through another ref (not by the admin) names that ref
in ``parent``: deleting a ref deletes its descendants too (transitively), so
every deletion returns the refs it revoked, (hash, service) pairs, for
persistence to tell the services (who then cut what they handed out).
``nested`` names the refs of this node that an object's description holds
(sealed): they are revoked when the object goes, so they never outlive it.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY,
    service TEXT NOT NULL,
    category TEXT NOT NULL,
    runtime_id TEXT NOT NULL,
    description BLOB NOT NULL,
    sealed_caps BLOB,
    active INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS objects_runtime ON objects (service, runtime_id);
CREATE TABLE IF NOT EXISTS refs (
    hash BLOB PRIMARY KEY,
    short_id TEXT NOT NULL,
    object_id INTEGER NOT NULL REFERENCES objects (id) ON DELETE CASCADE,
    persistent INTEGER NOT NULL,
    instance TEXT NOT NULL,
    group_id INTEGER REFERENCES groups (id),
    created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS refs_object ON refs (object_id);
CREATE INDEX IF NOT EXISTS refs_short ON refs (short_id);
CREATE INDEX IF NOT EXISTS refs_group ON refs (group_id);
CREATE TABLE IF NOT EXISTS nested (
    object_id INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (object_id, hash));
"""

# Added later: stores made before have no parent/alias columns (see Store.__init__).
# parent: hash of the ref this one was minted through; alias: 1 for a temporary
# name of the parent grant (a service adopting a capability), never persistent.
NEW_COLUMNS = {
    "parent": "ALTER TABLE refs ADD COLUMN parent BLOB",
    "alias": "ALTER TABLE refs ADD COLUMN alias INTEGER NOT NULL DEFAULT 0",
}
PARENT_INDEX = "CREATE INDEX IF NOT EXISTS refs_parent ON refs (parent)"

# The refs rooted at the seed rows (a SELECT of hashes), with their descendants.
_TREE = (
    "WITH RECURSIVE tree(h) AS ({seed} UNION SELECT r.hash FROM refs r JOIN tree"
    " ON r.parent = tree.h)"
)

SHORT_ID_LEN = 12


def secret_hash(secret: bytes) -> bytes:
    # Secrets carry >= 128 random bits, so a plain hash is enough to make the
    # stored value useless as a secret.
    return hashlib.sha256(b"metac-ref\0" + secret).digest()


def short_id_of(digest: bytes) -> str:
    return digest.hex()[:SHORT_ID_LEN]


@dataclass(frozen=True)
class StoredObject:
    id: int
    service: str
    category: str
    runtime_id: str
    description: bytes
    sealed_caps: bytes | None
    active: bool


@dataclass(frozen=True)
class RefRow:
    short_id: str
    object_id: int
    service: str
    category: str
    persistent: bool
    created: float
    group: str
    parent: str = ""  # short id of the parent ref, "" for a ref the admin made
    runtime_id: str = ""
    #: may refs made through this one be persistent (an alias: as its grant)
    ceiling: bool = False
    alias: bool = False


#: (stored hash, service) of each ref a deletion revoked
Revoked = list[tuple[bytes, str]]


class Store:
    def __init__(self, path: str, instance: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(refs)").fetchall()}
        for column, sql in NEW_COLUMNS.items():
            if column not in columns:
                self.db.execute(sql)
        self.db.execute(PARENT_INDEX)
        self.instance = instance

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        # isolation_level=None means autocommit: make multi-statement changes atomic.
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def purge_stale(self) -> int:
        """Drop non-persistent refs of earlier node instances (and their descendants),
        then unreferenced objects."""
        with self._transaction():
            revoked, _ = self._delete_tree(
                "SELECT hash FROM refs WHERE persistent = 0 AND instance != ?", (self.instance,))
        return len(revoked)

    def _delete_tree(self, seed: str, args: tuple[object, ...]) -> tuple[Revoked, list[int]]:
        """Delete the seed refs and their descendants (inside a transaction)."""
        rows = self.db.execute(
            _TREE.format(seed=seed) + " SELECT r.hash, o.service FROM refs r"
            " JOIN objects o ON o.id = r.object_id WHERE r.hash IN (SELECT h FROM tree)",
            args).fetchall()
        revoked = [(bytes(r[0]), r[1]) for r in rows]
        self.db.executemany("DELETE FROM refs WHERE hash = ?", [(h,) for h, _ in revoked])
        dropped = self._drop_orphans()
        # Objects gone: so are the refs their descriptions held (and what that orphans,
        # by the same recursion; every step deletes rows, so it ends).
        for digest in self._nested_of(dropped):
            more, more_dropped = self._delete_tree("SELECT ?", (digest,))
            revoked += more
            dropped += more_dropped
        return revoked, dropped

    def _nested_of(self, object_ids: list[int]) -> list[bytes]:
        out: list[bytes] = []
        for oid in object_ids:
            out += [bytes(r[0]) for r in self.db.execute(
                "SELECT hash FROM nested WHERE object_id = ?", (oid,)).fetchall()]
            self.db.execute("DELETE FROM nested WHERE object_id = ?", (oid,))
        return out

    def _drop_orphans(self) -> list[int]:
        rows = self.db.execute(
            "SELECT id FROM objects WHERE id NOT IN (SELECT object_id FROM refs)").fetchall()
        ids = [r[0] for r in rows]
        self.db.executemany("DELETE FROM objects WHERE id = ?", [(i,) for i in ids])
        return ids

    def add_nested(self, object_id: int, digests: list[bytes]) -> None:
        """Refs of this node that the object's description holds (see the module doc)."""
        with self._transaction():
            self.db.executemany("INSERT OR IGNORE INTO nested (object_id, hash) VALUES (?, ?)",
                                [(object_id, d) for d in digests])

    def upsert_object(self, service: str, category: str, runtime_id: str, description: bytes,
                      sealed_caps: bytes | None, active: bool) -> int:
        with self._transaction():
            row = self.db.execute(
                "SELECT id FROM objects WHERE service = ? AND runtime_id = ?",
                (service, runtime_id)).fetchone()
            if row is not None:
                self.db.execute(
                    "UPDATE objects SET category = ?, description = ?, sealed_caps = ?, active = ?"
                    " WHERE id = ?", (category, description, sealed_caps, int(active), row[0]))
                return int(row[0])
            cur = self.db.execute(
                "INSERT INTO objects (service, category, runtime_id, description, sealed_caps,"
                " active, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (service, category, runtime_id, description, sealed_caps, int(active), time.time()))
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def add_ref(self, digest: bytes, object_id: int, persistent: bool, group_id: int | None) -> str:
        short = short_id_of(digest)
        with self._transaction():
            self.db.execute(
                "INSERT INTO refs (hash, short_id, object_id, persistent, instance, group_id, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (digest, short, object_id, int(persistent), self.instance, group_id, time.time()))
        return short

    def get_object(self, object_id: int) -> StoredObject | None:
        row = self.db.execute(
            "SELECT id, service, category, runtime_id, description, sealed_caps, active"
            " FROM objects WHERE id = ?", (object_id,)).fetchone()
        if row is None:
            return None
        return StoredObject(row[0], row[1], row[2], row[3], bytes(row[4]),
                            bytes(row[5]) if row[5] is not None else None, bool(row[6]))

    _REF_SELECT = (
        "SELECT r.short_id, r.object_id, o.service, o.category, r.persistent, r.created,"
        " COALESCE(g.name, ''), COALESCE(p.short_id, ''), o.runtime_id,"
        " CASE WHEN r.alias THEN COALESCE(p.persistent, 0) ELSE r.persistent END, r.alias"
        " FROM refs r JOIN objects o ON o.id = r.object_id"
        " LEFT JOIN groups g ON g.id = r.group_id LEFT JOIN refs p ON p.hash = r.parent"
    )

    @staticmethod
    def _row(r: tuple) -> RefRow:  # type: ignore[type-arg]
        return RefRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7], r[8], bool(r[9]),
                      bool(r[10]))

    def lookup(self, digest: bytes) -> RefRow | None:
        row = self.db.execute(self._REF_SELECT + " WHERE r.hash = ?", (digest,)).fetchone()
        return self._row(row) if row else None

    def list_refs(self) -> list[RefRow]:
        rows = self.db.execute(self._REF_SELECT + " ORDER BY r.created").fetchall()
        return [self._row(r) for r in rows]

    def count_children(self, parent: bytes, *, alias: bool = False) -> int:
        """Children of ``parent`` (its aliases with ``alias``)."""
        return int(self.db.execute("SELECT COUNT(*) FROM refs WHERE parent = ? AND alias = ?",
                                   (parent, int(alias))).fetchone()[0])

    def grant_of(self, digest: bytes) -> bytes | None:
        """The grant a ref stands for: itself, or for an alias its parent. None if unknown."""
        row = self.db.execute("SELECT alias, parent FROM refs WHERE hash = ?",
                              (digest,)).fetchone()
        if row is None:
            return None
        return bytes(row[1]) if row[0] and row[1] is not None else digest

    def set_parent(self, digest: bytes, parent: bytes, *, alias: bool = False) -> bool:
        """Make ``digest`` a child of ``parent`` (a grant, not an alias), never more
        persistent than it; an alias is never persistent. False if either is unknown."""
        with self._transaction():
            row = self.db.execute("SELECT persistent FROM refs WHERE hash = ?",
                                  (parent,)).fetchone()
            if row is None:
                return False
            n = self.db.execute(
                "UPDATE refs SET parent = ?, persistent = persistent AND ? AND ?, alias = ?"
                " WHERE hash = ?",
                (parent, row[0], int(not alias), int(alias), digest)).rowcount
        return n == 1

    def find_by_short_id(self, short: str) -> list[bytes]:
        # Prefix compare, not LIKE: '_' and '%' must not act as wildcards.
        rows = self.db.execute("SELECT hash FROM refs WHERE substr(short_id, 1, ?) = ?",
                               (len(short), short)).fetchall()
        return [bytes(r[0]) for r in rows]

    def delete_ref(self, digest: bytes) -> tuple[RefRow | None, Revoked, list[int]]:
        """Delete a ref and its descendants; returns it, the refs revoked and the ids of
        objects left with no ref (deleted too)."""
        info = self.lookup(digest)
        if info is None:
            return None, [], []
        with self._transaction():
            revoked, dropped = self._delete_tree("SELECT ?", (digest,))
        return info, revoked, dropped

    def delete_object(self, service: str, runtime_id: str) -> tuple[Revoked, list[int]]:
        """Revoke every ref of the object and their descendants; (refs revoked, ids of
        objects dropped)."""
        with self._transaction():
            row = self.db.execute("SELECT id FROM objects WHERE service = ? AND runtime_id = ?",
                                  (service, runtime_id)).fetchone()
            if row is None:
                return [], []
            return self._delete_tree("SELECT hash FROM refs WHERE object_id = ?", (row[0],))

    def objects_of(self, service: str, *, active_only: bool) -> list[int]:
        sql = "SELECT id FROM objects WHERE service = ?" + (" AND active = 1" if active_only else "")
        return [r[0] for r in self.db.execute(sql, (service,)).fetchall()]

    def object_exists(self, object_id: int) -> bool:
        return self.db.execute("SELECT 1 FROM objects WHERE id = ?", (object_id,)).fetchone() is not None

    # groups

    def create_group(self, name: str) -> int:
        with self._transaction():
            self.db.execute("INSERT OR IGNORE INTO groups (name, created) VALUES (?, ?)",
                            (name, time.time()))
        return self.group_id(name)  # type: ignore[return-value]

    def group_id(self, name: str) -> int | None:
        row = self.db.execute("SELECT id FROM groups WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else None

    def drop_group(self, name: str) -> tuple[Revoked | None, list[int]]:
        """Revoke the group's refs (and their descendants) and drop it; None if unknown."""
        gid = self.group_id(name)
        if gid is None:
            return None, []
        with self._transaction():
            revoked, dropped = self._delete_tree("SELECT hash FROM refs WHERE group_id = ?",
                                                 (gid,))
            self.db.execute("DELETE FROM groups WHERE id = ?", (gid,))
        return revoked, dropped
