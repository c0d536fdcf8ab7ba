"""Namespaces in the metadata database: labels, and deletion refused while anything lives in one."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from berth.core.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from berth.core.identifiers import validate_identifier, validate_labels
from berth.core.metadata.db import MetadataDB, dump_labels, load_labels

__all__ = ["Namespace", "NamespaceStore", "ensure_namespace"]

Publish = Callable[[str, str, dict[str, Any]], object]

#: Tables whose rows keep a namespace from being deleted, with the word used in the error.
_OWNED = (("images", "images"), ("containers", "containers"), ("content", "content"),
          ("snapshots", "snapshots"), ("leases", "leases"), ("ingests", "ingests"))


@dataclass(kw_only=True)
class Namespace:
    name: str
    labels: dict[str, str]
    created_at: float
    updated_at: float

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "labels": dict(self.labels),
                "created_at": self.created_at, "updated_at": self.updated_at}


def ensure_namespace(conn: sqlite3.Connection, name: str) -> None:
    """Create the namespace ``name`` if it does not exist (inside a write transaction)."""
    now = time.time()
    conn.execute("INSERT OR IGNORE INTO namespaces(name, labels, created_at, updated_at) VALUES (?, '{}', ?, ?)",
                 (name, now, now))


def _row(row: sqlite3.Row) -> Namespace:
    return Namespace(name=row["name"], labels=load_labels(row["labels"]), created_at=row["created_at"],
                     updated_at=row["updated_at"])


class NamespaceStore:
    """Namespaces and their labels, publishing ``/namespaces/{create,update,delete}``."""

    def __init__(self, db: MetadataDB, publish: Publish | None = None) -> None:
        self._db = db
        self._publish = publish or (lambda *_: None)

    async def create(self, name: str, labels: Mapping[str, str]) -> Namespace:
        """Raises: InvalidArgument (bad name or labels), AlreadyExists."""
        validate_identifier(name, "namespace")
        labels = validate_labels(labels)

        def insert(conn: sqlite3.Connection) -> Namespace:
            now = time.time()
            try:
                conn.execute("INSERT INTO namespaces(name, labels, created_at, updated_at) VALUES (?, ?, ?, ?)",
                             (name, dump_labels(labels), now, now))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"namespace {name} already exists") from None
            return Namespace(name=name, labels=labels, created_at=now, updated_at=now)

        namespace = await self._db.write(insert)
        self._publish(name, "/namespaces/create", {"name": name, "labels": labels})
        return namespace

    async def get(self, name: str) -> Namespace:
        """Raises: NotFound."""
        row = await self._db.read(lambda c: c.execute("SELECT * FROM namespaces WHERE name = ?", (name,)).fetchone())
        if row is None:
            raise NotFound(f"namespace {name} not found")
        return _row(row)

    async def list_all(self) -> list[Namespace]:
        rows = await self._db.read(lambda c: c.execute("SELECT * FROM namespaces ORDER BY name").fetchall())
        return [_row(r) for r in rows]

    async def update(self, name: str, labels: Mapping[str, str], fieldpaths: Sequence[str] = ()) -> Namespace:
        """Replace the labels (no fieldpaths, or ``labels``) or only ``labels.<key>`` entries; an empty
        value removes a label.

        Raises: NotFound, InvalidArgument (an unknown field path or bad labels).
        """
        labels = validate_labels(labels)
        for path in fieldpaths:
            if path != "labels" and not path.startswith("labels."):
                raise InvalidArgument(f"cannot update field {path!r} of a namespace (only labels)")

        def change(conn: sqlite3.Connection) -> Namespace:
            row = conn.execute("SELECT * FROM namespaces WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"namespace {name} not found")
            if not fieldpaths or "labels" in fieldpaths:
                new = dict(labels)
            else:
                new = load_labels(row["labels"])
                for path in fieldpaths:
                    key = path.removeprefix("labels.")
                    if labels.get(key):
                        new[key] = labels[key]
                    else:
                        new.pop(key, None)
            new = {k: v for k, v in new.items() if v}
            now = time.time()
            conn.execute("UPDATE namespaces SET labels = ?, updated_at = ? WHERE name = ?",
                         (dump_labels(new), now, name))
            return Namespace(name=name, labels=new, created_at=row["created_at"], updated_at=now)

        namespace = await self._db.write(change)
        self._publish(name, "/namespaces/update", {"name": name, "labels": namespace.labels})
        return namespace

    async def delete(self, name: str) -> None:
        """Raises: NotFound; FailedPrecondition while the namespace holds anything (naming what)."""

        def remove(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM namespaces WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"namespace {name} not found")
            held = [word for table, word in _OWNED
                    if conn.execute(f"SELECT 1 FROM {table} WHERE namespace = ? LIMIT 1", (name,)).fetchone()]
            if held:
                raise FailedPrecondition(f"namespace {name} must be empty, but it still has {', '.join(held)}")
            conn.execute("DELETE FROM namespaces WHERE name = ?", (name,))

        await self._db.write(remove)
        self._publish(name, "/namespaces/delete", {"name": name})
