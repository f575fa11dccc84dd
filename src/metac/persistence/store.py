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

:func:`open_state` opens it safely: files 0600, a damaged file (empty,
truncated, bad header, failing ``PRAGMA integrity_check``, or another store
than the one this state dir had) is refused with one line saying how to
restore the backup, which is taken after every successful check
(``refs.sqlite3.bak``, SQLite's online backup). ``refs.sqlite3.id`` beside
the database holds the store's id: once a store was initialised here, a
missing or empty database is damage, not a fresh start.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from metac import errors
from metac.codec.refs import SHORT_ID_LEN, secret_hash, short_id_of  # noqa: F401 (re-exported)
from metac.core.sealing import SealError, load_or_create_key

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
    description: bytes = b""  # the object's stored data (see persistence.summary)


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
        " CASE WHEN r.alias THEN COALESCE(p.persistent, 0) ELSE r.persistent END, r.alias,"
        " o.description"
        " FROM refs r JOIN objects o ON o.id = r.object_id"
        " LEFT JOIN groups g ON g.id = r.group_id LEFT JOIN refs p ON p.hash = r.parent"
    )

    @staticmethod
    def _row(r: tuple) -> RefRow:  # type: ignore[type-arg]
        return RefRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7], r[8], bool(r[9]),
                      bool(r[10]), bytes(r[11] or b""))

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

    def list_groups(self) -> list[tuple[str, float, int]]:
        """(name, created, number of refs) of every group, by name."""
        rows = self.db.execute(
            "SELECT g.name, g.created, COUNT(r.hash) FROM groups g"
            " LEFT JOIN refs r ON r.group_id = g.id GROUP BY g.id ORDER BY g.name").fetchall()
        return [(str(n), float(c), int(k)) for n, c, k in rows]

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


# --- opening safely: modes, damage, backup ---------------------------------------------

DB_NAME = "refs.sqlite3"
KEY_NAME = "node.key"
SQLITE_MAGIC = b"SQLite format 3\0"
SIDE_FILES = ("-wal", "-shm")


@dataclass(frozen=True)
class StoreFiles:
    state_dir: str

    @property
    def db(self) -> str:
        return os.path.join(self.state_dir, DB_NAME)

    @property
    def backup(self) -> str:
        return self.db + ".bak"

    @property
    def marker(self) -> str:
        return self.db + ".id"

    @property
    def key(self) -> str:
        return os.path.join(self.state_dir, KEY_NAME)


class StoreDamaged(errors.FailedPrecondition):
    """The refs store cannot be used as it is; the message says what to do."""


def restore_command(state_dir: str) -> str:
    return f"metac node restore-store --state-dir {state_dir}"


def _damaged(files: StoreFiles, what: str) -> StoreDamaged:
    if os.path.exists(files.backup):
        taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(files.backup)))
        todo = (f"restore the backup taken at the node's last good start ({taken}) with "
                f"`{restore_command(files.state_dir)}`, then start the node again")
    else:
        todo = (f"there is no backup ({files.backup}): move {files.db} away to start with an "
                "empty store (every ref it held is lost)")
    return StoreDamaged(f"the refs store {files.db} is damaged ({what}); {todo}")


def _private(path: str) -> None:
    """Tighten an existing file to 0600 (descriptions hold secrets: env vars of `run -e`)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            os.chmod(path, 0o600)


def _create_private(path: str) -> None:
    """Create ``path`` empty with mode 0600 if missing, before SQLite creates it (0644)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def check_file(path: str) -> str | None:
    """What is wrong with the SQLite file at ``path`` before opening it (None: nothing seen)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = f.read(100)
    except FileNotFoundError:
        return "the file is missing"
    except OSError as exc:
        return f"cannot read it: {exc.strerror}"
    if size == 0:
        return "the file is empty"
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        return "not an SQLite file: bad header"
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    pages, counter, valid_for = (struct.unpack(">I", header[i:i + 4])[0] for i in (28, 24, 92))
    if pages and counter == valid_for and size < pages * page_size:
        return f"truncated: {size} bytes, its header says {pages * page_size}"
    return None


def check_integrity(db: sqlite3.Connection) -> str | None:
    """``PRAGMA integrity_check`` in one line (None if ok)."""
    try:
        rows = db.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError as exc:
        return f"integrity check: {exc}"
    if rows == [("ok",)]:
        return None
    first = " ".join(str(rows[0][0]).split())
    return f"integrity check: {first[:160]}"


def _store_id(db: sqlite3.Connection) -> str | None:
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
    except sqlite3.DatabaseError:
        return None
    return str(row[0]) if row else None


def _read_marker(files: StoreFiles) -> str | None:
    try:
        with open(files.marker, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _write_private(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _backup(db: sqlite3.Connection, target: str) -> None:
    """SQLite's online backup of ``db`` into ``target`` (0600), replaced atomically."""
    tmp = target + ".tmp"
    for suffix in ("", *SIDE_FILES):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp + suffix)
    _create_private(tmp)
    dst = sqlite3.connect(tmp)
    try:
        db.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
    finally:
        dst.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


def open_state(state_dir: str, instance: str) -> tuple[Store, bytes]:
    """The checked refs store and the node key; StoreDamaged (one line: the file, what
    is wrong, how to restore) instead of opening a damaged or silently empty store."""
    files = StoreFiles(state_dir)
    expected_id = _read_marker(files)
    initialised = expected_id is not None or os.path.exists(files.backup)
    problem = check_file(files.db)
    if problem == "the file is missing" and not initialised:
        problem = None
        _create_private(files.db)
    elif problem == "the file is empty" and not initialised:
        problem = None
    if problem:
        raise _damaged(files, problem)
    for suffix in ("", *SIDE_FILES):
        _private(files.db + suffix)
    store: Store | None = None
    try:
        try:
            store = Store(files.db, instance)
        except sqlite3.DatabaseError as exc:
            raise _damaged(files, f"SQLite: {exc}") from None
        problem = check_integrity(store.db)
        if problem:
            raise _damaged(files, problem)
        found_id = _store_id(store.db)
        if expected_id is not None and found_id != expected_id:
            raise _damaged(files, f"it is not the store this node had: store id {found_id} in "
                                  f"the file, {expected_id} in {files.marker}")
        if found_id is None:
            if initialised:
                raise _damaged(files, "it is not the store this node had: it has no store id")
            found_id = secrets.token_hex(16)
            store.db.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (found_id,))
        key = _load_key(files, store)
        _backup(store.db, files.backup)
        if expected_id != found_id:
            _write_private(files.marker, f"{found_id}\n".encode())
    except BaseException:
        if store is not None:
            store.close()
        raise
    return store, key


def _load_key(files: StoreFiles, store: Store) -> bytes:
    sealed = store.db.execute(
        "SELECT 1 FROM objects WHERE sealed_caps IS NOT NULL LIMIT 1").fetchone()
    if sealed and not os.path.exists(files.key):
        raise errors.FailedPrecondition(
            f"the node key {files.key} is missing and the refs store holds refs sealed with it; "
            "restore it from a backup of the state dir (a new key cannot open them)")
    try:
        key = load_or_create_key(files.key)
    except SealError as exc:
        raise errors.FailedPrecondition(
            f"{exc}; restore it from a backup of the state dir") from None
    _private(files.key)
    return key


def restore_backup(state_dir: str) -> str:
    """Put the backup in place of the store (the node must be stopped); what was done.

    The current database files are kept, renamed ``refs.sqlite3.damaged-<time>``.
    """
    files = StoreFiles(state_dir)
    problem = check_file(files.backup)
    if problem == "the file is missing":
        raise errors.NotFound(f"no backup of the refs store: {files.backup} is missing")
    if problem:
        raise errors.FailedPrecondition(f"the backup {files.backup} is damaged too ({problem})")
    tmp = files.db + ".restore"
    for suffix in ("", *SIDE_FILES):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp + suffix)
    _create_private(tmp)
    with open(files.backup, "rb") as src, open(tmp, "r+b") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    db = sqlite3.connect(tmp)
    try:
        problem = check_integrity(db)
        found_id = _store_id(db)
    finally:
        db.close()
    if problem:
        os.unlink(tmp)
        raise errors.FailedPrecondition(f"the backup {files.backup} is damaged too ({problem})")
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", *SIDE_FILES):
        if os.path.lexists(files.db + suffix):
            aside = f"{files.db}.damaged-{stamp}{suffix}"
            os.replace(files.db + suffix, aside)
            moved.append(aside)
    os.replace(tmp, files.db)
    if found_id is not None:
        _write_private(files.marker, f"{found_id}\n".encode())
    taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(files.backup)))
    kept = f"; the damaged files were kept as {', '.join(moved)}" if moved else ""
    return (f"restored {files.db} from the backup taken at {taken} (refs made after that are "
            f"gone){kept}")
