"""The metastore every snapshotter shares: a small sqlite database next to its snapshots.

It gives each snapshot a numeric id (backends name their directories by it, which keeps overlay
``lowerdir`` lists short), and keeps kind, parent, labels, timestamps and, for committed snapshots,
usage. :meth:`MetaStore.transaction` runs a function in one transaction in a worker thread; the
functions below are what such a function calls. A backend creates its directory *before* committing
the transaction that records it, and removes it *after*, so a crash leaves at most an orphaned
directory, which the backend's ``cleanup`` removes.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from berth.core.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from berth.core.filters import parse_filters
from berth.core.identifiers import validate_labels
from berth.core.metadata.db import dump_labels, load_labels
from berth.core.snapshots.snapshotter import Info, Kind, Usage

__all__ = [
    "MetaStore",
    "Snapshot",
    "commit_active",
    "create_snapshot",
    "get_info",
    "get_snapshot",
    "id_map",
    "remove",
    "update_info",
    "walk_info",
]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    parent_id INTEGER REFERENCES snapshots(id),
    labels TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
)
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """A snapshot as a backend needs it: its id, kind, and the ids of its parents, nearest first."""

    id: int
    kind: Kind
    parent_ids: tuple[int, ...]


class MetaStore:
    """The metastore at ``path`` (created on first use). One transaction runs at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = trio.Lock()
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise FailedPrecondition(f"snapshot metastore {self.path} is closed")
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.row_factory = sqlite3.Row
            conn.execute(_SCHEMA)
            self._conn = conn
        return self._conn

    async def transaction(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``function(conn)`` in one transaction in a worker thread; roll back if it raises.

        Not cancellable once started (the transaction always completes or rolls back).
        """
        async with self._lock:
            return await trio.to_thread.run_sync(self._run, function, abandon_on_cancel=False)

    def _run(self, function: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = function(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def aclose(self) -> None:
        """Close the database; idempotent. Later transactions raise FailedPrecondition."""
        async with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _row(conn: sqlite3.Connection, key: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()
    if row is None:
        raise NotFound(f"snapshot {key} does not exist")
    return row  # type: ignore[no-any-return]


def _parent_ids(conn: sqlite3.Connection, parent_id: int | None) -> tuple[int, ...]:
    ids = []
    while parent_id is not None:
        ids.append(parent_id)
        parent_id = conn.execute("SELECT parent_id FROM snapshots WHERE id = ?", (parent_id,)).fetchone()[0]
    return tuple(ids)


def _info(conn: sqlite3.Connection, row: sqlite3.Row) -> Info:
    parent = ""
    if row["parent_id"] is not None:
        parent = conn.execute("SELECT key FROM snapshots WHERE id = ?", (row["parent_id"],)).fetchone()[0]
    return Info(name=row["key"], kind=Kind(row["kind"]), parent=parent, labels=load_labels(row["labels"]),
                created_at=row["created_at"], updated_at=row["updated_at"])


def create_snapshot(conn: sqlite3.Connection, kind: Kind, key: str, parent: str = "",
                    labels: Mapping[str, str] | None = None) -> Snapshot:
    """Record a new active snapshot or view.

    Raises:
        InvalidArgument: empty key, bad labels, or ``kind`` committed.
        AlreadyExists: ``key`` is taken.
        NotFound: ``parent`` does not exist. FailedPrecondition: ``parent`` is not committed.
    """
    if not key:
        raise InvalidArgument("snapshot key must not be empty")
    if kind is Kind.COMMITTED:
        raise InvalidArgument("a snapshot is created active or as a view, never committed")
    labels = validate_labels(labels or {})
    parent_id = None
    if parent:
        parent_row = conn.execute("SELECT * FROM snapshots WHERE key = ?", (parent,)).fetchone()
        if parent_row is None:
            raise NotFound(f"parent snapshot {parent} does not exist")
        if parent_row["kind"] != Kind.COMMITTED:
            raise FailedPrecondition(f"parent {parent} is not a committed snapshot")
        parent_id = parent_row["id"]
    now = time.time()
    try:
        cursor = conn.execute("INSERT INTO snapshots(key, kind, parent_id, labels, created_at, updated_at) "
                              "VALUES (?, ?, ?, ?, ?, ?)", (key, str(kind), parent_id, dump_labels(labels), now, now))
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"snapshot {key} already exists") from None
    assert cursor.lastrowid is not None
    return Snapshot(id=cursor.lastrowid, kind=kind, parent_ids=_parent_ids(conn, parent_id))


def get_snapshot(conn: sqlite3.Connection, key: str) -> Snapshot:
    """The id, kind and parent chain of ``key``. Raises: NotFound."""
    row = _row(conn, key)
    return Snapshot(id=row["id"], kind=Kind(row["kind"]), parent_ids=_parent_ids(conn, row["parent_id"]))


def get_info(conn: sqlite3.Connection, key: str) -> tuple[int, Info, Usage]:
    """Raises: NotFound."""
    row = _row(conn, key)
    return row["id"], _info(conn, row), Usage(size=row["size"], inodes=row["inodes"])


def update_info(conn: sqlite3.Connection, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
    """Update labels (containerd's rules). Raises: NotFound; InvalidArgument for other fields."""
    row = _row(conn, info.name)
    validate_labels(info.labels)
    if not fieldpaths or "labels" in fieldpaths:
        labels = dict(info.labels)
    else:
        labels = load_labels(row["labels"])
        for path in fieldpaths:
            if not path.startswith("labels."):
                raise InvalidArgument(f"cannot update field {path!r} of a snapshot (only labels)")
            key = path.removeprefix("labels.")
            if key in info.labels:
                labels[key] = info.labels[key]
            else:
                labels.pop(key, None)
    now = time.time()
    conn.execute("UPDATE snapshots SET labels = ?, updated_at = ? WHERE id = ?", (dump_labels(labels), now, row["id"]))
    return _info(conn, _row(conn, info.name))


def commit_active(conn: sqlite3.Connection, key: str, name: str, usage: Usage,
                  labels: Mapping[str, str] | None = None) -> int:
    """Turn the active snapshot ``key`` into the committed ``name`` (keeping its id); return the id.

    Raises:
        NotFound: no ``key``. AlreadyExists: ``name`` is taken.
        FailedPrecondition: ``key`` is not active (a view or already committed).
    """
    row = _row(conn, key)
    if row["kind"] != Kind.ACTIVE:
        raise FailedPrecondition(f"snapshot {key} is a {row['kind']} snapshot, only active ones can be committed")
    if conn.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
        raise AlreadyExists(f"snapshot {name} already exists")
    labels = validate_labels(labels) if labels is not None else load_labels(row["labels"])
    now = time.time()
    conn.execute("UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_at = ?, updated_at = ?, "
                 "size = ?, inodes = ? WHERE id = ?",
                 (name, str(Kind.COMMITTED), dump_labels(labels), now, now, usage.size, usage.inodes, row["id"]))
    return int(row["id"])


def remove(conn: sqlite3.Connection, key: str) -> tuple[int, Kind]:
    """Remove the record of ``key``; return its id and kind.

    Raises: NotFound; FailedPrecondition when it has children (cannot remove a parent).
    """
    row = _row(conn, key)
    if conn.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (row["id"],)).fetchone():
        raise FailedPrecondition(f"cannot remove snapshot {key}: it has children")
    conn.execute("DELETE FROM snapshots WHERE id = ?", (row["id"],))
    return int(row["id"]), Kind(row["kind"])


def walk_info(conn: sqlite3.Connection, filters: Sequence[str] = ()) -> list[Info]:
    """Every snapshot matching any filter, ordered by key."""
    matcher = parse_filters(filters)
    infos = [_info(conn, row) for row in conn.execute("SELECT * FROM snapshots ORDER BY key")]
    return [info for info in infos if matcher.match_mapping(info.filter_target())]


def id_map(conn: sqlite3.Connection) -> dict[int, str]:
    """Every recorded snapshot id with its key (backends compare it with their directories)."""
    return {int(row[0]): str(row[1]) for row in conn.execute("SELECT id, key FROM snapshots")}
