"""Leases: named holds on objects, so that what a client is still assembling is not collected.

A lease owns resources (``content`` digests, ``ingests`` refs, ``snapshots/<snapshotter>`` keys,
``images`` names) in its namespace; while the lease exists and has not expired, GC treats them as
roots. A lease expires when its ``berth.io/gc.expire`` label (RFC 3339) is in the past. Work done with
a lease in its context (:func:`berth.core.namespaces.with_lease`, the ``lease`` of an RPC call) adds
what it creates to that lease.
"""

from __future__ import annotations

import datetime
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from berth.core.errdefs import AlreadyExists, InvalidArgument, NotFound
from berth.core.identifiers import validate_identifier, validate_labels
from berth.core.metadata.db import MetadataDB, dump_labels, load_labels
from berth.core.metadata.namespaces import ensure_namespace
from berth.core.namespaces import current_lease, namespace_required

__all__ = [
    "LABEL_GC_EXPIRE",
    "Lease",
    "LeaseManager",
    "Resource",
    "add_lease_resource",
    "format_expiry",
    "parse_expiry",
    "remove_lease_resource",
]

LABEL_GC_EXPIRE = "berth.io/gc.expire"
_RESOURCE_TYPE = re.compile(r"(content|ingests|images|snapshots/[A-Za-z0-9._-]+)\Z")


def format_expiry(when: float) -> str:
    """UNIX time → RFC 3339 UTC, as ``berth.io/gc.expire`` holds it."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat().replace("+00:00", "Z")


def parse_expiry(text: str) -> float | None:
    """RFC 3339 → UNIX time; ``None`` for text that is not a time (such a lease never expires)."""
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True, kw_only=True)
class Resource:
    type: str
    id: str

    def to_wire(self) -> dict[str, str]:
        return {"type": self.type, "id": self.id}


@dataclass(kw_only=True)
class Lease:
    id: str
    labels: dict[str, str]
    created_at: float

    @property
    def expires_at(self) -> float | None:
        text = self.labels.get(LABEL_GC_EXPIRE)
        return parse_expiry(text) if text else None

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "labels": dict(self.labels), "created_at": self.created_at}


def _validate_resource(resource: Resource) -> None:
    if not _RESOURCE_TYPE.match(resource.type):
        raise InvalidArgument(f"unsupported lease resource type {resource.type!r} "
                              "(content, ingests, images or snapshots/<snapshotter>)")
    if not resource.id:
        raise InvalidArgument("lease resource id must not be empty")


def add_lease_resource(conn: sqlite3.Connection, namespace: str, resource: Resource,
                       lease: str | None = None) -> bool:
    """Add ``resource`` to ``lease`` (default: the current one) inside a write transaction.

    Returns whether a lease was given. Raises: NotFound when the lease does not exist.
    """
    lease = lease if lease is not None else current_lease()
    if lease is None:
        return False
    if conn.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease)).fetchone() is None:
        raise NotFound(f"lease {lease} not found in namespace {namespace}")
    conn.execute("INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) VALUES (?, ?, ?, ?)",
                 (namespace, lease, resource.type, resource.id))
    return True


def remove_lease_resource(conn: sqlite3.Connection, namespace: str, resource: Resource,
                          lease: str | None = None) -> None:
    """Remove ``resource`` from ``lease`` (default: the current one), if there is one."""
    lease = lease if lease is not None else current_lease()
    if lease is not None:
        conn.execute("DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = ? AND id = ?",
                     (namespace, lease, resource.type, resource.id))


class LeaseManager:
    """Leases of the current namespace.

    Args:
        db: the metadata database.
        collect: runs a garbage collection now (used by ``delete(sync=True)``).
        on_delete: called after a lease is deleted (the GC scheduler schedules a collection).
    """

    def __init__(self, db: MetadataDB, collect: Callable[[], Awaitable[object]] | None = None,
                 on_delete: Callable[[], None] | None = None) -> None:
        self._db = db
        self._collect = collect
        self._on_delete = on_delete or (lambda: None)

    async def create(self, lease_id: str, labels: Mapping[str, str] | None = None,
                     expires_in: float | None = None) -> Lease:
        """Create a lease; ``expires_in`` seconds sets ``berth.io/gc.expire``.

        Raises: InvalidArgument, AlreadyExists.
        """
        namespace = namespace_required()
        validate_identifier(lease_id, "lease id")
        labels = validate_labels(labels or {})
        if expires_in is not None:
            labels[LABEL_GC_EXPIRE] = format_expiry(time.time() + expires_in)

        def insert(conn: sqlite3.Connection) -> Lease:
            ensure_namespace(conn, namespace)
            now = time.time()
            try:
                conn.execute("INSERT INTO leases(namespace, id, labels, created_at) VALUES (?, ?, ?, ?)",
                             (namespace, lease_id, dump_labels(labels), now))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"lease {lease_id} already exists") from None
            return Lease(id=lease_id, labels=labels, created_at=now)

        return await self._db.write(insert)

    async def delete(self, lease_id: str, *, sync: bool = False, garbage: bool = True) -> None:
        """Delete a lease (its resources lose that hold); with ``sync``, collect garbage before returning.
        ``garbage=False`` is for a caller that knows nothing became garbage (another object holds all the
        lease held): no collection is scheduled for it (``sync`` still runs one).

        Raises: NotFound.
        """
        namespace = namespace_required()

        def remove(conn: sqlite3.Connection) -> None:
            cursor = conn.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id))
            if cursor.rowcount == 0:
                raise NotFound(f"lease {lease_id} not found")

        await self._db.write(remove)
        if garbage:
            self._on_delete()  # what only this lease held is now garbage: let GC know
        if sync and self._collect is not None:
            await self._collect()

    async def list_all(self) -> list[Lease]:
        namespace = namespace_required()
        rows = await self._db.read(lambda c: c.execute(
            "SELECT * FROM leases WHERE namespace = ? ORDER BY id", (namespace,)).fetchall())
        return [Lease(id=r["id"], labels=load_labels(r["labels"]), created_at=r["created_at"]) for r in rows]

    async def add_resource(self, lease_id: str, resource: Resource) -> None:
        """Raises: NotFound (no such lease), InvalidArgument (bad resource)."""
        namespace = namespace_required()
        _validate_resource(resource)
        await self._db.write(lambda c: add_lease_resource(c, namespace, resource, lease_id))

    async def delete_resource(self, lease_id: str, resource: Resource) -> None:
        """Raises: NotFound (no such lease)."""
        namespace = namespace_required()

        def remove(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?",
                            (namespace, lease_id)).fetchone() is None:
                raise NotFound(f"lease {lease_id} not found")
            remove_lease_resource(conn, namespace, resource, lease_id)

        await self._db.write(remove)

    async def list_resources(self, lease_id: str) -> list[Resource]:
        """Raises: NotFound."""
        namespace = namespace_required()

        def select(conn: sqlite3.Connection) -> list[Resource]:
            if conn.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?",
                            (namespace, lease_id)).fetchone() is None:
                raise NotFound(f"lease {lease_id} not found")
            rows = conn.execute("SELECT type, id FROM lease_resources WHERE namespace = ? AND lease = ? "
                                "ORDER BY type, id", (namespace, lease_id)).fetchall()
            return [Resource(type=r["type"], id=r["id"]) for r in rows]

        return await self._db.read(select)
