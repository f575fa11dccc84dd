"""Tests for metac.persistence.store: objects, refs, orphans, stale refs, groups."""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator

import pytest

from metac.persistence.store import SCHEMA, SHORT_ID_LEN, Store, secret_hash, short_id_of


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "refs.sqlite3")


@pytest.fixture
def store(db_path: str) -> Iterator[Store]:
    s = Store(db_path, "instance-a")
    yield s
    s.close()


def new_digest() -> bytes:
    return secret_hash(secrets.token_bytes(24))


def add_object(store: Store, runtime_id: str = "", *, service: str = "demo",
               category: str = "counter", description: bytes = b"{}",
               sealed: bytes | None = None, active: bool = False) -> int:
    return store.upsert_object(service, category, runtime_id or secrets.token_hex(8),
                               description, sealed, active)


def count(store: Store, table: str) -> int:
    return store.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


# --- hashing ---------------------------------------------------------------------------


def test_secret_hash_is_stable_and_not_the_secret() -> None:
    secret = secrets.token_bytes(24)
    assert secret_hash(secret) == secret_hash(secret)
    assert secret_hash(secret) != secret_hash(secrets.token_bytes(24))
    assert secret not in secret_hash(secret)
    assert len(secret_hash(secret)) == 32
    assert short_id_of(secret_hash(secret)) == secret_hash(secret).hex()[:SHORT_ID_LEN]


def test_database_file_mode_is_wal(store: Store) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


# --- objects: dedup by runtime id -------------------------------------------------------


def test_upsert_dedups_by_service_and_runtime_id(store: Store) -> None:
    first = add_object(store, "rt-1", description=b'{"v": 1}')
    again = add_object(store, "rt-1", category="counter2", description=b'{"v": 2}',
                       sealed=b"sealed", active=True)
    assert again == first
    assert count(store, "objects") == 1
    obj = store.get_object(first)
    assert obj is not None
    # the newest description wins
    assert (obj.category, obj.description, obj.sealed_caps, obj.active) == \
        ("counter2", b'{"v": 2}', b"sealed", True)
    assert obj.runtime_id == "rt-1" and obj.service == "demo"


def test_same_runtime_id_in_other_service_is_another_object(store: Store) -> None:
    a = add_object(store, "rt-1", service="demo")
    b = add_object(store, "rt-1", service="fs")
    assert a != b
    assert count(store, "objects") == 2
    assert store.objects_of("demo", active_only=False) == [a]
    assert store.objects_of("fs", active_only=False) == [b]


def test_objects_of_active_only(store: Store) -> None:
    passive = add_object(store, active=False)
    active = add_object(store, active=True)
    assert sorted(store.objects_of("demo", active_only=False)) == sorted([passive, active])
    assert store.objects_of("demo", active_only=True) == [active]
    assert store.objects_of("other", active_only=False) == []


def test_get_missing_object(store: Store) -> None:
    assert store.get_object(12345) is None
    assert not store.object_exists(12345)


# --- refs ------------------------------------------------------------------------------


def test_add_and_lookup_ref(store: Store) -> None:
    oid = add_object(store)
    digest = new_digest()
    short = store.add_ref(digest, oid, True, None)
    assert short == short_id_of(digest)
    row = store.lookup(digest)
    assert row is not None
    assert (row.short_id, row.object_id, row.service, row.category, row.persistent, row.group) \
        == (short, oid, "demo", "counter", True, "")
    assert store.lookup(new_digest()) is None
    assert [r.short_id for r in store.list_refs()] == [short]


def test_many_refs_to_one_object(store: Store) -> None:
    oid = add_object(store, "rt")
    digests = [new_digest() for _ in range(3)]
    for d in digests:
        store.add_ref(d, oid, True, None)
    assert {store.lookup(d).object_id for d in digests} == {oid}  # type: ignore[union-attr]
    assert count(store, "refs") == 3 and count(store, "objects") == 1


def test_duplicate_digest_is_rejected(store: Store) -> None:
    oid = add_object(store)
    digest = new_digest()
    store.add_ref(digest, oid, True, None)
    with pytest.raises(sqlite3.IntegrityError):
        store.add_ref(digest, oid, False, None)


def test_find_by_short_id_prefix(store: Store) -> None:
    oid = add_object(store)
    digest = new_digest()
    short = store.add_ref(digest, oid, True, None)
    assert store.find_by_short_id(short) == [digest]
    assert store.find_by_short_id(short[:6]) == [digest]
    assert store.find_by_short_id("zzzzzz") == []


# --- delete_ref drops orphans ----------------------------------------------------------


def test_delete_ref_keeps_object_while_other_refs_remain(store: Store) -> None:
    oid = add_object(store)
    d1, d2 = new_digest(), new_digest()
    store.add_ref(d1, oid, True, None)
    store.add_ref(d2, oid, False, None)

    info, revoked, dropped = store.delete_ref(d1)
    assert info is not None and info.object_id == oid and info.persistent
    assert revoked == [(d1, "demo")]
    assert dropped == []
    assert store.lookup(d1) is None
    assert store.object_exists(oid)

    info, _, dropped = store.delete_ref(d2)
    assert info is not None and not info.persistent
    assert dropped == [oid]
    assert not store.object_exists(oid)
    assert count(store, "objects") == 0 and count(store, "refs") == 0


def test_delete_ref_leaves_other_objects(store: Store) -> None:
    a, b = add_object(store), add_object(store)
    da, db = new_digest(), new_digest()
    store.add_ref(da, a, True, None)
    store.add_ref(db, b, True, None)
    assert store.delete_ref(da)[2] == [a]
    assert store.object_exists(b)
    assert store.lookup(db) is not None


def test_delete_unknown_ref(store: Store) -> None:
    assert store.delete_ref(new_digest()) == (None, [], [])


def test_deleted_ref_is_gone_from_the_file(db_path: str, store: Store) -> None:
    oid = add_object(store)
    digest = new_digest()
    store.add_ref(digest, oid, True, None)
    store.delete_ref(digest)
    store.close()
    again = Store(db_path, "instance-b")
    try:
        assert again.lookup(digest) is None
        assert count(again, "objects") == 0
    finally:
        again.close()


# --- purge_stale -----------------------------------------------------------------------


def test_purge_stale_drops_non_persistent_refs_of_other_instances(db_path: str) -> None:
    old = Store(db_path, "old-run")
    persistent_obj = add_object(old, "p")
    transient_obj = add_object(old, "t")
    mixed_obj = add_object(old, "m")
    keep, drop, mixed_keep, mixed_drop = (new_digest() for _ in range(4))
    old.add_ref(keep, persistent_obj, True, None)
    old.add_ref(drop, transient_obj, False, None)
    old.add_ref(mixed_keep, mixed_obj, True, None)
    old.add_ref(mixed_drop, mixed_obj, False, None)
    assert old.purge_stale() == 0  # its own refs are not stale
    old.close()

    new = Store(db_path, "new-run")
    try:
        own = new_digest()
        own_obj = add_object(new, "own")
        new.add_ref(own, own_obj, False, None)

        assert new.purge_stale() == 2
        assert new.lookup(keep) is not None
        assert new.lookup(mixed_keep) is not None
        assert new.lookup(drop) is None
        assert new.lookup(mixed_drop) is None
        assert new.lookup(own) is not None  # this instance's non-persistent ref stays
        assert not new.object_exists(transient_obj)  # orphaned: dropped
        assert new.object_exists(persistent_obj)
        assert new.object_exists(mixed_obj)
        assert new.object_exists(own_obj)
        assert new.purge_stale() == 0  # idempotent
    finally:
        new.close()


def test_purge_stale_drops_objects_that_never_had_a_ref(store: Store) -> None:
    oid = add_object(store)
    store.purge_stale()
    assert not store.object_exists(oid)


# --- groups ----------------------------------------------------------------------------


def test_create_group_is_idempotent(store: Store) -> None:
    gid = store.create_group("team")
    assert store.create_group("team") == gid
    assert store.group_id("team") == gid
    assert store.group_id("nope") is None


def test_refs_carry_their_group_name(store: Store) -> None:
    gid = store.create_group("team")
    oid = add_object(store)
    digest = new_digest()
    store.add_ref(digest, oid, True, gid)
    assert store.lookup(digest).group == "team"  # type: ignore[union-attr]


def test_drop_group_revokes_its_refs_only(store: Store) -> None:
    gid = store.create_group("team")
    other = store.create_group("other")
    in_group = add_object(store)
    shared = add_object(store)
    outside = add_object(store)
    d_in, d_shared_in, d_shared_out, d_out, d_other = (new_digest() for _ in range(5))
    store.add_ref(d_in, in_group, True, gid)
    store.add_ref(d_shared_in, shared, True, gid)
    store.add_ref(d_shared_out, shared, True, None)
    store.add_ref(d_out, outside, True, None)
    store.add_ref(d_other, outside, False, other)

    revoked, dropped = store.drop_group("team")
    assert revoked is not None and sorted(d for d, _ in revoked) == sorted([d_in, d_shared_in])
    assert dropped == [in_group]
    assert store.lookup(d_in) is None and store.lookup(d_shared_in) is None
    assert store.lookup(d_shared_out) is not None
    assert store.lookup(d_out) is not None and store.lookup(d_other) is not None
    assert store.object_exists(shared) and store.object_exists(outside)
    assert store.group_id("team") is None
    assert store.group_id("other") == other


def test_drop_unknown_group(store: Store) -> None:
    assert store.drop_group("nope") == (None, [])


def test_drop_empty_group(store: Store) -> None:
    store.create_group("empty")
    assert store.drop_group("empty") == ([], [])
    assert store.group_id("empty") is None


def test_ref_to_missing_group_or_object_is_rejected(store: Store) -> None:
    oid = add_object(store)
    with pytest.raises(sqlite3.IntegrityError):
        store.add_ref(new_digest(), oid, True, 999)
    with pytest.raises(sqlite3.IntegrityError):
        store.add_ref(new_digest(), 999, True, None)


# --- the file grants nothing -----------------------------------------------------------


def test_no_stored_value_is_a_secret(db_path: str, store: Store) -> None:
    oid = add_object(store)
    secret = secrets.token_bytes(24)
    store.add_ref(secret_hash(secret), oid, True, None)
    store.close()
    with open(db_path, "rb") as f:
        raw = f.read()
    wal = db_path + "-wal"
    if os.path.exists(wal):
        with open(wal, "rb") as f:
            raw += f.read()
    assert secret not in raw
    assert secret.hex().encode() not in raw
    # every stored blob, used as a secret, finds nothing
    again = Store(db_path, "x")
    try:
        for (value,) in again.db.execute("SELECT hash FROM refs"):
            assert again.lookup(secret_hash(bytes(value))) is None
    finally:
        again.close()


# --- children (refs minted through another ref) -----------------------------------------


def test_children_go_with_their_parent_transitively(store: Store) -> None:
    oid, other = add_object(store), add_object(store)
    root, child, grandchild, sibling = (new_digest() for _ in range(4))
    store.add_ref(root, oid, True, None)
    store.add_ref(child, other, True, None)
    store.add_ref(grandchild, other, True, None)
    store.add_ref(sibling, oid, True, None)
    assert store.set_parent(child, root)
    assert store.set_parent(grandchild, child)
    assert store.count_children(root) == 1
    assert store.lookup(grandchild).parent == short_id_of(child)  # type: ignore[union-attr]
    info, revoked, dropped = store.delete_ref(root)
    assert info is not None
    assert sorted(d for d, _ in revoked) == sorted([root, child, grandchild])
    assert dropped == [other]
    assert store.lookup(sibling) is not None


def test_a_child_is_never_more_persistent_than_its_parent(store: Store) -> None:
    oid = add_object(store)
    parent, child = new_digest(), new_digest()
    store.add_ref(parent, oid, False, None)
    store.add_ref(child, oid, True, None)
    assert store.set_parent(child, parent)
    assert not store.lookup(child).persistent  # type: ignore[union-attr]
    assert not store.set_parent(new_digest(), parent)
    assert not store.set_parent(child, new_digest())


def test_purge_and_group_drop_take_children(db_path: str) -> None:
    old = Store(db_path, "old-run")
    gid = old.create_group("team")
    oid = add_object(old)
    transient, child, grouped, grouped_child = (new_digest() for _ in range(4))
    old.add_ref(transient, oid, False, None)
    old.add_ref(child, oid, True, None)
    old.set_parent(child, transient)
    old.add_ref(grouped, oid, True, gid)
    old.add_ref(grouped_child, oid, True, None)
    old.set_parent(grouped_child, grouped)
    old.close()
    new = Store(db_path, "new-run")
    try:
        assert new.purge_stale() == 2
        assert new.lookup(child) is None
        revoked, _ = new.drop_group("team")
        assert revoked is not None and {d for d, _ in revoked} == {grouped, grouped_child}
    finally:
        new.close()


def test_an_old_store_gains_the_parent_column(db_path: str) -> None:
    db = sqlite3.connect(db_path)
    db.executescript(SCHEMA)
    db.close()
    store = Store(db_path, "x")
    try:
        oid = add_object(store)
        digest = new_digest()
        store.add_ref(digest, oid, True, None)
        assert store.lookup(digest).parent == ""  # type: ignore[union-attr]
    finally:
        store.close()


def test_nested_refs_go_with_their_object(store: Store) -> None:
    holder_obj, inner_obj = add_object(store), add_object(store)
    outer, nested, other = new_digest(), new_digest(), new_digest()
    store.add_ref(nested, inner_obj, True, None)
    store.add_ref(other, inner_obj, True, None)
    store.add_ref(outer, holder_obj, False, None)
    store.add_nested(holder_obj, [nested])
    info, revoked, dropped = store.delete_ref(outer)
    assert info is not None
    assert sorted(d for d, _ in revoked) == sorted([outer, nested])
    assert dropped == [holder_obj]
    assert store.lookup(other) is not None and store.object_exists(inner_obj)
    assert count(store, "nested") == 0


# --- opening safely: modes, damage, backup, restore -------------------------------------

from metac import errors  # noqa: E402
from metac.persistence.store import StoreDamaged, open_state, restore_backup  # noqa: E402


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def _overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _fill(state_dir, n: int = 50) -> None:
    store, _ = open_state(str(state_dir), "i1")
    for _ in range(n):
        store.add_ref(new_digest(), add_object(store), True, None)
    store.close()


def test_open_state_fresh_files_are_private(tmp_path) -> None:
    store, key = open_state(str(tmp_path), "i1")
    assert len(key) == 32
    add_object(store)
    for name in ("refs.sqlite3", "refs.sqlite3-wal", "refs.sqlite3-shm", "refs.sqlite3.bak",
                 "refs.sqlite3.id", "node.key"):
        assert _mode(tmp_path / name) == 0o600, name
    store.close()


def test_open_state_tightens_loose_files(tmp_path) -> None:
    _fill(tmp_path)
    os.chmod(tmp_path / "refs.sqlite3", 0o644)
    os.chmod(tmp_path / "node.key", 0o644)
    store, _ = open_state(str(tmp_path), "i2")
    store.close()
    assert _mode(tmp_path / "refs.sqlite3") == 0o600
    assert _mode(tmp_path / "node.key") == 0o600


@pytest.mark.parametrize("damage, what", [
    (lambda p: os.truncate(p, 0), "the file is empty"),
    (os.unlink, "the file is missing"),
    (lambda p: os.truncate(p, os.path.getsize(p) // 2), "truncated"),
    (lambda p: _overwrite(p, 0, b"garbage garbage garbage"), "not an SQLite file: bad header"),
])
def test_damaged_store_is_refused_and_restored(tmp_path, damage, what) -> None:
    _fill(tmp_path, 300)
    _fill(tmp_path, 0)  # a second start: its backup holds the 300 refs
    db = str(tmp_path / "refs.sqlite3")
    damage(db)
    with pytest.raises(StoreDamaged) as info:
        open_state(str(tmp_path), "i3")
    msg = str(info.value)
    assert f"the refs store {db} is damaged ({what}" in msg
    assert f"metac node restore-store --state-dir {tmp_path}" in msg and "\n" not in msg
    out = restore_backup(str(tmp_path))
    assert out.startswith(f"restored {db} from the backup")
    store, _ = open_state(str(tmp_path), "i4")
    assert len(store.list_refs()) == 300
    store.close()
    assert _mode(db) == 0o600


def test_integrity_failure_is_refused(tmp_path) -> None:
    _fill(tmp_path, 300)
    db = tmp_path / "refs.sqlite3"
    with open(db, "r+b") as f:
        for offset in range(4096, os.path.getsize(db), 4096):
            f.seek(offset + 8)
            f.write(b"\xff" * 200)
    with pytest.raises(StoreDamaged, match="integrity check"):
        open_state(str(tmp_path), "i2")


def test_empty_valid_database_is_not_a_silent_fresh_start(tmp_path) -> None:
    _fill(tmp_path)
    os.unlink(tmp_path / "refs.sqlite3")
    other = sqlite3.connect(tmp_path / "refs.sqlite3")
    other.execute("CREATE TABLE t (x)")  # a valid database, of somebody else
    other.close()
    with pytest.raises(StoreDamaged, match="not the store this node had"):
        open_state(str(tmp_path), "i2")


def test_no_backup_says_so(tmp_path) -> None:
    _fill(tmp_path)
    os.unlink(tmp_path / "refs.sqlite3.bak")
    os.truncate(tmp_path / "refs.sqlite3", 0)
    with pytest.raises(StoreDamaged, match="there is no backup"):
        open_state(str(tmp_path), "i2")
    with pytest.raises(errors.NotFound):
        restore_backup(str(tmp_path))


def test_missing_key_with_sealed_refs_is_refused(tmp_path) -> None:
    store, _ = open_state(str(tmp_path), "i1")
    add_object(store, sealed=b"x" * 64)
    store.close()
    os.unlink(tmp_path / "node.key")
    with pytest.raises(errors.FailedPrecondition, match="node key .* is missing"):
        open_state(str(tmp_path), "i2")
