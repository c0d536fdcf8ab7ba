"""The metadata database (schema, migrations, transactions, WAL readers), namespaces and leases."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from berth.core.errdefs import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound
from berth.core.metadata import db as db_module
from berth.core.metadata.content import NamespacedContentStore
from berth.core.metadata.db import SCHEMA_VERSION, MetadataDB
from berth.core.metadata.leases import LABEL_GC_EXPIRE, LeaseManager, Resource, parse_expiry
from berth.core.metadata.namespaces import NamespaceStore
from berth.core.namespaces import with_lease, with_namespace
from berth.plugins.content.local.store import LocalStore

WAIT = 10.0


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[MetadataDB]:
    database = await MetadataDB.open(tmp_path / "meta.db")
    try:
        yield database
    finally:
        await database.aclose()


@pytest.fixture
def events() -> list[tuple[str, str, dict[str, Any]]]:
    return []


@pytest.fixture
def namespaces(db: MetadataDB, events: list[tuple[str, str, dict[str, Any]]]) -> NamespaceStore:
    return NamespaceStore(db, lambda ns, topic, event: events.append((ns, topic, event)))


@pytest.fixture
def content(db: MetadataDB, tmp_path: Path) -> NamespacedContentStore:
    return NamespacedContentStore(db, LocalStore(tmp_path / "content"))


@pytest.fixture
def leases(db: MetadataDB) -> LeaseManager:
    return LeaseManager(db)


async def put(store: NamespacedContentStore, data: bytes, ref: str | None = None) -> str:
    digest = sha(data)
    writer = await store.writer(ref or f"put-{digest}", total=len(data))
    await writer.write(data)
    await writer.commit(len(data), digest)
    return digest


def names(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT name FROM namespaces ORDER BY name")]


# ---------------------------------------------------------------- opening, schema and migrations


async def test_open_creates_the_schema_at_the_current_version(db: MetadataDB) -> None:
    version = await db.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0])
    assert version == SCHEMA_VERSION
    tables = await db.read(lambda c: {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")})
    assert {"namespaces", "content", "ingests", "leases", "lease_resources"} <= tables
    journal = await db.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
    assert journal == "wal"
    assert db.integrity_check() == "ok"


async def test_reopen_keeps_data_and_version(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    first = await MetadataDB.open(path)
    await NamespaceStore(first).create("kept", {"a": "1"})
    await first.aclose()
    second = await MetadataDB.open(path)
    try:
        namespace = await NamespaceStore(second).get("kept")
        assert namespace.labels == {"a": "1"}
        assert await second.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION
    finally:
        await second.aclose()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(FailedPrecondition) as info:
        await MetadataDB.open(path)
    message = str(info.value)
    assert str(path) in message
    assert f"schema version {SCHEMA_VERSION + 5}" in message
    assert f"({SCHEMA_VERSION})" in message
    # The refused file is left alone.
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 5
    conn.close()


async def test_a_file_that_is_not_a_database_is_data_loss(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    path.write_bytes(b"this is not sqlite" * 500)
    with pytest.raises(DataLoss) as info:
        await MetadataDB.open(path)
    assert str(path) in str(info.value)
    assert "corrupt" in str(info.value)


async def test_a_database_with_damaged_pages_is_data_loss(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    database = await MetadataDB.open(path)
    store = NamespaceStore(database)
    for i in range(150):
        await store.create(f"ns{i}", {"filler": "x" * 200})
    await database.aclose()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    for start in range(2 * page, len(data), page):  # keep the header and schema page, garble the rest
        data[start + 8:start + 400] = bytes((i * 7 + 13) % 256 for i in range(392))
    path.write_bytes(bytes(data))
    with pytest.raises(DataLoss) as info:
        await MetadataDB.open(path)
    assert str(path) in str(info.value)
    assert "corrupt" in str(info.value)


async def test_migrations_run_each_in_its_own_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "meta.db"
    first = await MetadataDB.open(path)
    await first.aclose()

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("migration failed halfway")

    monkeypatch.setattr(db_module, "MIGRATIONS", [*db_module.MIGRATIONS, broken])
    monkeypatch.setattr(db_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(RuntimeError, match="halfway"):
        await MetadataDB.open(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'half_done'").fetchone() is None
    conn.close()

    def working(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE added_in_next (x INTEGER)")

    monkeypatch.setattr(db_module, "MIGRATIONS", [*db_module.MIGRATIONS[:SCHEMA_VERSION], working])
    migrated = await MetadataDB.open(path)
    try:
        assert await migrated.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION + 1
        assert await migrated.read(lambda c: c.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'added_in_next'").fetchone()) is not None
    finally:
        await migrated.aclose()


# ---------------------------------------------------------------- transactions and readers


async def test_mutation_listeners_hear_which_tables_a_write_changed(db: MetadataDB) -> None:
    heard: list[frozenset[str]] = []
    db.on_mutation(heard.append)
    await db.write(lambda c: c.execute("INSERT INTO namespaces VALUES ('n', '{}', 0, 0)"))

    def two_tables(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE namespaces SET labels = '{\"a\":\"b\"}' WHERE name = 'n'")
        conn.execute("INSERT INTO leases VALUES ('n', 'l', '{}', 0)")

    await db.write(two_tables)
    await db.write(lambda c: c.execute("DELETE FROM leases WHERE id = 'l'"))
    await db.write(lambda c: c.execute("SELECT 1").fetchone())  # a write that changes no row
    with pytest.raises(ValueError, match="rolled back"):
        await db.write(lambda c: (c.execute("DELETE FROM namespaces"), int("rolled back")))
    await db.write(lambda c: c.execute("UPDATE namespaces SET updated_at = 1 WHERE name = 'nothing'"))
    assert heard == [frozenset({"namespaces"}), frozenset({"namespaces", "leases"}), frozenset({"leases"}),
                     frozenset(), frozenset()]


async def test_a_write_that_raises_rolls_back_everything(db: MetadataDB) -> None:
    await db.write(lambda c: c.execute("INSERT INTO namespaces VALUES ('before', '{}', 0, 0)"))
    mutations = db.mutations

    def half_done(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO namespaces VALUES ('doomed', '{}', 0, 0)")
        conn.execute("INSERT INTO content VALUES ('doomed', 'sha256:00', 1, '{}', 0, 0)")
        conn.execute("DELETE FROM namespaces WHERE name = 'before'")
        raise ValueError("changed my mind")

    with pytest.raises(ValueError, match="changed my mind"):
        await db.write(half_done)
    assert await db.read(names) == ["before"]
    assert await db.read(lambda c: c.execute("SELECT COUNT(*) FROM content").fetchone()[0]) == 0
    assert db.mutations == mutations
    # The writer is usable afterwards.
    await db.write(lambda c: c.execute("INSERT INTO namespaces VALUES ('after', '{}', 0, 0)"))
    assert await db.read(names) == ["after", "before"]


async def test_a_failed_store_operation_leaves_no_trace(namespaces: NamespaceStore, db: MetadataDB) -> None:
    await namespaces.create("one", {})
    with pytest.raises(AlreadyExists):
        await namespaces.create("one", {"x": "y"})
    assert [n.labels for n in await namespaces.list_all()] == [{}]
    assert db.integrity_check() == "ok"


async def test_readers_are_not_blocked_by_a_write_in_progress(db: MetadataDB) -> None:
    inside = threading.Event()
    release = threading.Event()

    def slow(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO namespaces VALUES ('slow', '{}', 0, 0)")
        inside.set()
        release.wait(WAIT)  # the thread-side pause, holding the write lock and transaction
        return "done"

    def second(conn: sqlite3.Connection) -> list[str]:
        conn.execute("INSERT INTO namespaces VALUES ('second', '{}', 0, 0)")
        return names(conn)

    results: dict[str, Any] = {}

    async def run_write(key: str, function: Any) -> None:
        results[key] = await db.write(function)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_write, "slow", slow)
            with trio.fail_after(WAIT):
                while not inside.is_set():  # noqa: ASYNC110 - set in a worker thread
                    await trio.sleep(0.005)
            assert db.write_lock.locked()
            nursery.start_soon(run_write, "second", second)
            with trio.fail_after(WAIT):
                seen = await db.read(names)  # completes while the writer holds its transaction
            assert seen == []  # and sees only committed state
            assert "slow" not in results
            assert "second" not in results
            release.set()
    finally:
        release.set()
    assert results["slow"] == "done"
    assert results["second"] == ["second", "slow"]  # the second writer ran after the first committed
    assert await db.read(names) == ["second", "slow"]


async def test_many_concurrent_reads_and_writes(db: MetadataDB, namespaces: NamespaceStore) -> None:
    async def create(i: int) -> None:
        await namespaces.create(f"ns{i}", {"i": str(i)})

    async def read_all() -> None:
        await namespaces.list_all()

    with trio.fail_after(WAIT * 3):
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(create, i)
                nursery.start_soon(read_all)
    assert len(await namespaces.list_all()) == 30
    assert db.integrity_check() == "ok"


# ---------------------------------------------------------------- namespaces


async def test_namespace_create_get_list(namespaces: NamespaceStore, events: list[Any]) -> None:
    created = await namespaces.create("alpha", {"team": "a"})
    await namespaces.create("beta", {})
    assert created.name == "alpha"
    assert created.labels == {"team": "a"}
    got = await namespaces.get("alpha")
    assert got.labels == {"team": "a"}
    assert got.created_at == created.created_at
    assert [n.name for n in await namespaces.list_all()] == ["alpha", "beta"]
    assert ("alpha", "/namespaces/create", {"name": "alpha", "labels": {"team": "a"}}) in events
    with pytest.raises(AlreadyExists, match="alpha"):
        await namespaces.create("alpha", {})
    with pytest.raises(NotFound, match="gamma"):
        await namespaces.get("gamma")


@pytest.mark.parametrize("name", ["", "Bad Name", "-leading", "x" * 100, "a/b"])
async def test_namespace_bad_names_are_invalid(namespaces: NamespaceStore, name: str) -> None:
    with pytest.raises(InvalidArgument):
        await namespaces.create(name, {})
    assert await namespaces.list_all() == []


async def test_namespace_bad_labels_are_invalid(namespaces: NamespaceStore) -> None:
    with pytest.raises(InvalidArgument):
        await namespaces.create("ok", {"k": "v" * 5000})
    with pytest.raises(InvalidArgument):
        await namespaces.create("ok", {"": "v"})
    assert await namespaces.list_all() == []


async def test_namespace_update_masks(namespaces: NamespaceStore, events: list[Any]) -> None:
    await namespaces.create("ns", {"a": "1", "b": "2", "c": "3"})
    # labels.<k> masks change only those keys: set a, drop b (absent from labels), leave c.
    updated = await namespaces.update("ns", {"a": "9", "z": "ignored"}, ["labels.a", "labels.b"])
    assert updated.labels == {"a": "9", "c": "3"}
    assert (await namespaces.get("ns")).labels == {"a": "9", "c": "3"}
    # An empty value removes a label too.
    assert (await namespaces.update("ns", {"c": ""}, ["labels.c"])).labels == {"a": "9"}
    # A new key through a mask.
    assert (await namespaces.update("ns", {"n": "new"}, ["labels.n"])).labels == {"a": "9", "n": "new"}
    # No mask, or "labels", replaces all.
    assert (await namespaces.update("ns", {"only": "this"})).labels == {"only": "this"}
    assert (await namespaces.update("ns", {"x": "1"}, ["labels"])).labels == {"x": "1"}
    assert (await namespaces.get("ns")).labels == {"x": "1"}
    got = await namespaces.get("ns")
    assert got.updated_at >= got.created_at
    assert ("ns", "/namespaces/update", {"name": "ns", "labels": {"x": "1"}}) in events


async def test_namespace_update_errors(namespaces: NamespaceStore) -> None:
    await namespaces.create("ns", {"a": "1"})
    with pytest.raises(InvalidArgument, match="name"):
        await namespaces.update("ns", {}, ["name"])
    with pytest.raises(NotFound):
        await namespaces.update("missing", {"a": "1"})
    assert (await namespaces.get("ns")).labels == {"a": "1"}


async def test_namespace_delete(namespaces: NamespaceStore, events: list[Any]) -> None:
    await namespaces.create("gone", {})
    await namespaces.delete("gone")
    with pytest.raises(NotFound):
        await namespaces.get("gone")
    with pytest.raises(NotFound):
        await namespaces.delete("gone")
    assert ("gone", "/namespaces/delete", {"name": "gone"}) in events


async def test_namespace_delete_refused_while_it_holds_things(
    namespaces: NamespaceStore, content: NamespacedContentStore, leases: LeaseManager
) -> None:
    await namespaces.create("busy", {})
    with with_namespace("busy"):
        digest = await put(content, b"held blob")
        await leases.create("l1")
        writer = await content.writer("ingest-1", total=10)
        await writer.write(b"abc")
        await writer.close()
    with pytest.raises(FailedPrecondition) as info:
        await namespaces.delete("busy")
    message = str(info.value)
    assert "busy" in message
    for word in ("content", "leases", "ingests"):
        assert word in message
    assert (await namespaces.get("busy")).name == "busy"

    with with_namespace("busy"):
        await content.delete(digest)
        await leases.delete("l1")
    with pytest.raises(FailedPrecondition) as info:
        await namespaces.delete("busy")
    assert "ingests" in str(info.value)
    assert "content" not in str(info.value)
    assert "leases" not in str(info.value)

    with with_namespace("busy"):
        await content.abort("ingest-1")
    await namespaces.delete("busy")
    with pytest.raises(NotFound):
        await namespaces.get("busy")


# ---------------------------------------------------------------- leases


async def test_lease_create_list_delete(leases: LeaseManager) -> None:
    with with_namespace("ns"):
        lease = await leases.create("l1", {"purpose": "pull"})
        assert lease.id == "l1"
        assert lease.labels == {"purpose": "pull"}
        assert lease.expires_at is None
        await leases.create("l2")
        with pytest.raises(AlreadyExists, match="l1"):
            await leases.create("l1")
        assert [(le.id, le.labels) for le in await leases.list_all()] == [("l1", {"purpose": "pull"}), ("l2", {})]
    with with_namespace("other"):
        assert await leases.list_all() == []  # leases are per namespace
        with pytest.raises(NotFound):
            await leases.delete("l1")
    with with_namespace("ns"):
        await leases.delete("l1")
        assert [le.id for le in await leases.list_all()] == ["l2"]
        with pytest.raises(NotFound, match="l1"):
            await leases.delete("l1")


async def test_lease_expiry_label(leases: LeaseManager) -> None:
    with with_namespace("ns"):
        before = time.time()
        lease = await leases.create("exp", expires_in=3600)
        assert lease.expires_at is not None
        assert before + 3600 - 1 <= lease.expires_at <= time.time() + 3600 + 1
        listed = (await leases.list_all())[0]
        assert parse_expiry(listed.labels[LABEL_GC_EXPIRE]) == pytest.approx(lease.expires_at, abs=1e-3)


async def test_lease_create_validates(leases: LeaseManager) -> None:
    with with_namespace("ns"):
        with pytest.raises(InvalidArgument):
            await leases.create("bad id!")
        with pytest.raises(InvalidArgument):
            await leases.create("ok", {"k": "v" * 5000})
        assert await leases.list_all() == []
    with pytest.raises(FailedPrecondition, match="namespace"):
        await leases.create("no-namespace")


async def test_lease_resources(leases: LeaseManager) -> None:
    digest = sha(b"x")
    with with_namespace("ns"):
        await leases.create("l1")
        await leases.add_resource("l1", Resource(type="content", id=digest))
        await leases.add_resource("l1", Resource(type="ingests", id="ref-1"))
        await leases.add_resource("l1", Resource(type="snapshots/overlayfs", id="key-1"))
        await leases.add_resource("l1", Resource(type="images", id="docker.io/library/alpine:latest"))
        await leases.add_resource("l1", Resource(type="content", id=digest))  # idempotent
        assert await leases.list_resources("l1") == [
            Resource(type="content", id=digest),
            Resource(type="images", id="docker.io/library/alpine:latest"),
            Resource(type="ingests", id="ref-1"),
            Resource(type="snapshots/overlayfs", id="key-1"),
        ]
        await leases.delete_resource("l1", Resource(type="ingests", id="ref-1"))
        await leases.delete_resource("l1", Resource(type="ingests", id="never-added"))  # no error
        assert Resource(type="ingests", id="ref-1") not in await leases.list_resources("l1")
        assert len(await leases.list_resources("l1")) == 3
        await leases.delete("l1")
        with pytest.raises(NotFound):
            await leases.list_resources("l1")
        # Deleting the lease dropped its resources; a lease of the same name starts empty.
        await leases.create("l1")
        assert await leases.list_resources("l1") == []


async def test_lease_resource_not_found_cases(leases: LeaseManager) -> None:
    resource = Resource(type="content", id=sha(b"y"))
    with with_namespace("ns"):
        with pytest.raises(NotFound, match="missing"):
            await leases.add_resource("missing", resource)
        with pytest.raises(NotFound, match="missing"):
            await leases.delete_resource("missing", resource)
        with pytest.raises(NotFound, match="missing"):
            await leases.list_resources("missing")
        await leases.create("l1")
    with with_namespace("elsewhere"), pytest.raises(NotFound):
        await leases.add_resource("l1", resource)


@pytest.mark.parametrize(("kind", "resource_id"), [
    ("blobs", "x"), ("snapshots", "x"), ("snapshots/", "x"), ("snapshots/a/b", "x"), ("", "x"),
    ("content", ""), ("Content", "x"),
])
async def test_lease_invalid_resource_types(leases: LeaseManager, kind: str, resource_id: str) -> None:
    with with_namespace("ns"):
        await leases.create("l1")
        with pytest.raises(InvalidArgument):
            await leases.add_resource("l1", Resource(type=kind, id=resource_id))
        assert await leases.list_resources("l1") == []


async def test_lease_delete_sync_runs_the_collector(db: MetadataDB) -> None:
    calls: list[str] = []

    async def collect() -> None:
        calls.append("collect")

    manager = LeaseManager(db, collect=collect)
    with with_namespace("ns"):
        await manager.create("a")
        await manager.create("b")
        await manager.delete("a")
        assert calls == []
        await manager.delete("b", sync=True)
        assert calls == ["collect"]


async def test_writes_under_a_lease_join_it(leases: LeaseManager, content: NamespacedContentStore) -> None:
    data = b"leased bytes" * 100
    digest = sha(data)
    with with_namespace("ns"):
        await leases.create("l1")
        with with_lease("l1"):
            writer = await content.writer("ref-a", total=len(data))
            assert await leases.list_resources("l1") == [Resource(type="ingests", id="ref-a")]
            await writer.write(data)
            await writer.commit(len(data), digest)
        # The commit swapped the ingest for the content.
        assert await leases.list_resources("l1") == [Resource(type="content", id=digest)]
        # An ingest under a lease has no expiry of its own.
        with with_lease("l1"):
            other = await content.writer("ref-b", total=3)
            await other.write(b"abc")
            await other.close()
        expire = await content.db.read(lambda c: c.execute(
            "SELECT expire_at FROM ingests WHERE ref = 'ref-b'").fetchone()[0])
        assert expire is None
        # Opening a writer for content that exists leases the content and says AlreadyExists.
        await leases.create("l2")
        with with_lease("l2"), pytest.raises(AlreadyExists):
            await content.writer("ref-c", total=len(data), expected=digest)
        assert await leases.list_resources("l2") == [Resource(type="content", id=digest)]
        # Deleting the content drops it from the leases.
        await content.delete(digest)
        assert await leases.list_resources("l1") == [Resource(type="ingests", id="ref-b")]
        assert await leases.list_resources("l2") == []
        # Aborting the ingest drops it too.
        await content.abort("ref-b")
        assert await leases.list_resources("l1") == []


async def test_writes_without_a_lease_get_an_ingest_expiry(content: NamespacedContentStore) -> None:
    with with_namespace("ns"):
        before = time.time()
        writer = await content.writer("ref-a", total=3)
        await writer.close()
    expire = await content.db.read(lambda c: c.execute(
        "SELECT expire_at FROM ingests WHERE ref = 'ref-a'").fetchone()[0])
    assert expire is not None
    assert expire > before


async def test_writing_under_an_unknown_lease_is_not_found(content: NamespacedContentStore) -> None:
    with with_namespace("ns"), with_lease("nope"), pytest.raises(NotFound, match="nope"):
        await content.writer("ref-a", total=3)
    rows = await content.db.read(lambda c: c.execute("SELECT COUNT(*) FROM ingests").fetchone()[0])
    assert rows == 0  # the whole open rolled back
    with with_namespace("ns"):
        assert await content.list_statuses() == []
