"""The metadata database: sqlite in WAL mode, one writer at a time, readers never blocked.

All sqlite work runs in worker threads. Writes go through :meth:`MetadataDB.write`, which holds the
write lock, runs the function in one ``BEGIN IMMEDIATE`` transaction and commits (or rolls back if it
raised). Reads go through :meth:`MetadataDB.read` on a pool of read-only connections that see the
last committed state (WAL readers do not wait for the writer). The garbage collector takes the write
lock for its mark and sweep, so no mutation happens in between while reads go on. Listeners
(:meth:`MetadataDB.on_mutation`) hear of every committed write with the tables whose rows it changed,
which temporary triggers on the writer's connection report as the write runs.

The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` holds one function per
version, applied in order at open, each in its own transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import trio

from berth.core.errdefs import DataLoss, FailedPrecondition

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "MetadataDB", "dump_labels", "load_labels"]

T = TypeVar("T")


def _run_statements(conn: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated statements inside the current transaction (``executescript`` would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _schema_v1(conn: sqlite3.Connection) -> None:
    _run_statements(
        conn,
        """
        CREATE TABLE namespaces (
            name TEXT PRIMARY KEY,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE content (
            namespace TEXT NOT NULL REFERENCES namespaces(name),
            digest TEXT NOT NULL,
            size INTEGER NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (namespace, digest)
        );
        CREATE INDEX content_by_digest ON content(digest);
        CREATE TABLE ingests (
            namespace TEXT NOT NULL REFERENCES namespaces(name),
            ref TEXT NOT NULL,
            backend_ref TEXT NOT NULL UNIQUE,
            expected TEXT NOT NULL DEFAULT '',
            expire_at REAL,
            PRIMARY KEY (namespace, ref)
        );
        CREATE TABLE leases (
            namespace TEXT NOT NULL REFERENCES namespaces(name),
            id TEXT NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            PRIMARY KEY (namespace, id)
        );
        CREATE TABLE lease_resources (
            namespace TEXT NOT NULL,
            lease TEXT NOT NULL,
            type TEXT NOT NULL,
            id TEXT NOT NULL,
            PRIMARY KEY (namespace, lease, type, id),
            FOREIGN KEY (namespace, lease) REFERENCES leases(namespace, id) ON DELETE CASCADE
        );
        CREATE INDEX lease_resources_by_object ON lease_resources(namespace, type, id);
        CREATE TABLE images (
            namespace TEXT NOT NULL REFERENCES namespaces(name),
            name TEXT NOT NULL,
            target TEXT NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (namespace, name)
        );
        CREATE TABLE containers (
            namespace TEXT NOT NULL REFERENCES namespaces(name),
            id TEXT NOT NULL,
            record TEXT NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (namespace, id)
        );
        CREATE TABLE snapshots (
            namespace TEXT NOT NULL REFERENCES namespaces(name),
            snapshotter TEXT NOT NULL,
            key TEXT NOT NULL,
            backend_key TEXT NOT NULL,
            parent TEXT NOT NULL DEFAULT '',
            labels TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (namespace, snapshotter, key),
            UNIQUE (snapshotter, backend_key)
        );
        CREATE TABLE sequences (
            name TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        );
        """
    )


def _schema_v2(conn: sqlite3.Connection) -> None:
    """Networks (``io.berth.network.v1``): named networks, and one attachment per container with its
    address (unique per network: the address allocation) and published ports."""
    _run_statements(conn, """
        CREATE TABLE networks (
            name TEXT PRIMARY KEY,
            driver TEXT NOT NULL,
            record TEXT NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL
        );
        CREATE TABLE network_attachments (
            namespace TEXT NOT NULL,
            container_id TEXT NOT NULL,
            network TEXT NOT NULL REFERENCES networks(name),
            address TEXT NOT NULL,
            record TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (namespace, container_id),
            UNIQUE (network, address)
        );
    """)


#: ``MIGRATIONS[n]`` brings a database from version ``n`` to ``n + 1``.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_schema_v1, _schema_v2]
SCHEMA_VERSION = len(MIGRATIONS)


def dump_labels(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(labels), sort_keys=True, separators=(",", ":"))


def load_labels(text: str) -> dict[str, str]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


class MetadataDB:
    """The database at ``path``; use :meth:`open` (an async context manager) to get one.

    Args:
        path: the database file.
        no_sync: trade durability of the last transactions for speed (``synchronous=OFF``); a crash
            may lose recent commits but never corrupts the database.
        readers: size of the read-connection pool.
    """

    def __init__(self, path: Path, *, no_sync: bool = False, readers: int = 4) -> None:
        self.path = path
        self.no_sync = no_sync
        self.write_lock = trio.Lock()
        #: Mutations committed since the counter was last reset (the GC scheduler reads it).
        self.mutations = 0
        self._writer: sqlite3.Connection | None = None
        self._readers: list[sqlite3.Connection] = []
        self._reader_slots = trio.Semaphore(readers)
        self._reader_count = readers
        self._limiter = trio.CapacityLimiter(readers + 1)
        self._mutation_listeners: list[Callable[[frozenset[str]], None]] = []
        #: Tables whose rows the running write changed (the writer's triggers add to it, in its thread).
        self._changed_tables: set[str] = set()

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        if readonly:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                   isolation_level=None, timeout=30)
        else:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'OFF' if self.no_sync else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.row_factory = sqlite3.Row
        return conn

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            writer = self._connect(readonly=False)
        except sqlite3.DatabaseError as err:
            if getattr(err, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
                raise DataLoss(f"metadata database {self.path} is corrupt: {err}") from None
            raise
        try:
            try:
                check = writer.execute("PRAGMA quick_check").fetchone()[0]
            except sqlite3.DatabaseError as err:
                if getattr(err, "sqlite_errorname", "") not in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
                    raise
                check = str(err)
            if check != "ok":
                raise DataLoss(f"metadata database {self.path} is corrupt: {check}")
            version = writer.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FailedPrecondition(f"metadata database {self.path} has schema version {version}, "
                                         f"newer than this berthd supports ({SCHEMA_VERSION})")
            for target in range(version, SCHEMA_VERSION):
                writer.execute("BEGIN IMMEDIATE")
                try:
                    MIGRATIONS[target](writer)
                    writer.execute(f"PRAGMA user_version={target + 1}")
                    writer.execute("COMMIT")
                except BaseException:
                    writer.execute("ROLLBACK")
                    raise
            self._report_changes(writer)
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        self._readers = [self._connect(readonly=True) for _ in range(self._reader_count)]

    def _report_changes(self, writer: sqlite3.Connection) -> None:
        """Give every table of ``writer`` temporary triggers (this connection's alone) that add its name to
        :attr:`_changed_tables` for each row inserted, updated or deleted."""
        writer.create_function("berth_table_changed", 1, self._changed_tables.add)
        tables = [row[0] for row in writer.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        for table in tables:
            for operation in ("INSERT", "UPDATE", "DELETE"):
                writer.execute(f'CREATE TEMP TRIGGER "berth_changed_{table}_{operation.lower()}" AFTER {operation} '
                               f'ON main."{table}" BEGIN SELECT berth_table_changed(\'{table}\'); END')

    async def _start(self) -> None:
        await trio.to_thread.run_sync(self._open_sync)

    def _close_sync(self) -> None:
        for conn in self._readers:
            conn.close()
        self._readers = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def aclose(self) -> None:
        """Close every connection (waits for the writer to finish its transaction)."""
        with trio.CancelScope(shield=True):
            async with self.write_lock:
                await trio.to_thread.run_sync(self._close_sync)

    def on_mutation(self, listener: Callable[[frozenset[str]], None]) -> None:
        """Call ``listener(tables)`` (on the event loop) after every committed write, ``tables`` being the
        names of the tables whose rows it inserted, updated or deleted (empty when it changed none)."""
        self._mutation_listeners.append(listener)

    async def read(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``function(conn)`` in a thread on a read-only connection and return its result."""
        async with self._reader_slots:
            conn = self._readers.pop()
            try:
                return await trio.to_thread.run_sync(_in_read_transaction, conn, function,
                                                     limiter=self._limiter, abandon_on_cancel=False)
            finally:
                self._readers.append(conn)

    async def write(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``function(conn)`` in one write transaction, in a thread; commit, or roll back if it raised.

        Not cancellable once started (the transaction always completes or rolls back).
        """
        async with self.write_lock:
            return await self.write_locked(function)

    async def write_locked(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """As :meth:`write`, for a caller that already holds :attr:`write_lock` (the GC)."""
        assert self._writer is not None, "database is closed"
        self._changed_tables.clear()
        result = await trio.to_thread.run_sync(_in_write_transaction, self._writer, function,
                                               limiter=self._limiter, abandon_on_cancel=False)
        changed = frozenset(self._changed_tables)
        self.mutations += 1
        for listener in self._mutation_listeners:
            listener(changed)
        return result

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check`` on a fresh connection (blocking; for tests and tools)."""
        conn = sqlite3.connect(self.path)
        try:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            conn.close()

    @classmethod
    async def open(cls, path: Path, **kwargs: Any) -> MetadataDB:
        """Open (creating or migrating) the database at ``path``.

        Raises:
            DataLoss: the database fails sqlite's quick check.
            FailedPrecondition: its schema is newer than this berthd's.
        """
        db = cls(path, **kwargs)
        await db._start()
        return db


def _in_read_transaction(conn: sqlite3.Connection, function: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN")
    try:
        return function(conn)
    finally:
        conn.execute("COMMIT")


def _in_write_transaction(conn: sqlite3.Connection, function: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = function(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def next_sequence(conn: sqlite3.Connection, name: str) -> int:
    """The next value of the named counter (inside a write transaction)."""
    row = conn.execute(
        "INSERT INTO sequences(name, value) VALUES (?, 1) "
        "ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value", (name,)
    ).fetchone()
    return int(row[0])
