"""Namespaced snapshots: per-namespace records over one backend snapshotter.

Each namespace sees its own keys; the backend gets ``<namespace>/<sequence>/<key>``, so two namespaces
can both use the key ``foo``. Records hold the parent (by the namespace's key) and the labels; kinds
and mounts come from the backend. Removing a snapshot removes its record (refused while it has
children in the namespace); the backend snapshot is freed by garbage collection, children first.
A backend snapshot is made *before* its record and freed *after* it is dropped, so a crash leaves at
most a backend snapshot no record names, which the next collection removes.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from berth.core.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from berth.core.filters import parse_filters
from berth.core.identifiers import validate_labels
from berth.core.metadata.db import MetadataDB, dump_labels, load_labels, next_sequence
from berth.core.metadata.leases import Resource, add_lease_resource
from berth.core.metadata.namespaces import ensure_namespace
from berth.core.namespaces import namespace_required
from berth.core.snapshots.snapshotter import Info, Kind, Mount, Snapshotter, Usage
from berth.core.sync import SharedExclusiveLock

__all__ = ["NamespacedSnapshotter", "collect_backend"]

Publish = Callable[[str, str, dict[str, Any]], object]
#: Labels with this prefix are passed on to the backend snapshotter (containerd's inherited labels).
INHERITED_PREFIX = "berth.io/snapshot/"


def _inherited(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k.startswith(INHERITED_PREFIX)}


class NamespacedSnapshotter:
    """The :class:`~berth.core.snapshots.snapshotter.Snapshotter` named ``name``, per namespace."""

    def __init__(self, db: MetadataDB, name: str, backend: Snapshotter, *, publish: Publish | None = None,
                 on_delete: Callable[[], None] | None = None) -> None:
        self.db = db
        self.name = name
        self.backend = backend
        self._publish = publish or (lambda *_: None)
        self._on_delete = on_delete or (lambda: None)
        #: Creating and committing hold it shared; GC holds it exclusive while it frees backend snapshots.
        self.gc_lock = SharedExclusiveLock()

    def _record(self, conn: sqlite3.Connection, namespace: str, key: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                           (namespace, self.name, key)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        return row  # type: ignore[no-any-return]

    async def _get(self, key: str) -> tuple[str, sqlite3.Row]:
        namespace = namespace_required()
        return namespace, await self.db.read(lambda c: self._record(c, namespace, key))

    async def _info(self, row: sqlite3.Row) -> Info:
        backend = await self.backend.stat(row["backend_key"])
        return Info(name=row["key"], kind=backend.kind, parent=row["parent"], labels=load_labels(row["labels"]),
                    created_at=row["created_at"], updated_at=row["updated_at"])

    async def stat(self, key: str) -> Info:
        _, row = await self._get(key)
        return await self._info(row)

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        namespace = namespace_required()
        validate_labels(info.labels)
        for path in fieldpaths:
            if path != "labels" and not path.startswith("labels."):
                raise InvalidArgument(f"cannot update field {path!r} of a snapshot (only labels)")

        def change(conn: sqlite3.Connection) -> sqlite3.Row:
            row = self._record(conn, namespace, info.name)
            if not fieldpaths or "labels" in fieldpaths:
                labels = dict(info.labels)
            else:
                labels = load_labels(row["labels"])
                for path in fieldpaths:
                    label = path.removeprefix("labels.")
                    if label in info.labels:
                        labels[label] = info.labels[label]
                    else:
                        labels.pop(label, None)
            conn.execute("UPDATE snapshots SET labels = ?, updated_at = ? WHERE namespace = ? AND snapshotter = ? "
                         "AND key = ?", (dump_labels(labels), time.time(), namespace, self.name, info.name))
            return self._record(conn, namespace, info.name)

        return await self._info(await self.db.write(change))

    async def usage(self, key: str) -> Usage:
        _, row = await self._get(key)
        return await self.backend.usage(row["backend_key"])

    async def mounts(self, key: str) -> list[Mount]:
        _, row = await self._get(key)
        return await self.backend.mounts(row["backend_key"])

    async def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> list[Mount]:
        async with self.gc_lock.shared():
            return await self._create_locked(kind, key, parent, labels)

    async def _create_locked(self, kind: Kind, key: str, parent: str,
                             labels: Mapping[str, str] | None) -> list[Mount]:
        namespace = namespace_required()
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        labels = validate_labels(labels or {})

        def reserve(conn: sqlite3.Connection) -> tuple[str, str]:
            if conn.execute("SELECT 1 FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                            (namespace, self.name, key)).fetchone():
                raise AlreadyExists(f"snapshot {key} already exists")
            backend_parent = self._record(conn, namespace, parent)["backend_key"] if parent else ""
            return f"{namespace}/{next_sequence(conn, 'snapshot')}/{key}", backend_parent

        try:
            backend_key, backend_parent = await self.db.write(reserve)
        except NotFound:
            raise NotFound(f"parent snapshot {parent} does not exist") from None
        create = self.backend.prepare if kind is Kind.ACTIVE else self.backend.view
        mounts = await create(backend_key, backend_parent, _inherited(labels))

        def record(conn: sqlite3.Connection) -> None:
            ensure_namespace(conn, namespace)
            now = time.time()
            conn.execute("INSERT INTO snapshots(namespace, snapshotter, key, backend_key, parent, labels, created_at, "
                         "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (namespace, self.name, key, backend_key, parent, dump_labels(labels), now, now))
            add_lease_resource(conn, namespace, Resource(type=f"snapshots/{self.name}", id=key))

        try:
            await self.db.write(record)
        except sqlite3.IntegrityError:
            await self.backend.remove(backend_key)
            raise AlreadyExists(f"snapshot {key} already exists") from None
        except BaseException:
            await self.backend.remove(backend_key)
            raise
        self._publish(namespace, "/snapshot/prepare" if kind is Kind.ACTIVE else "/snapshot/view",
                      {"key": key, "parent": parent, "snapshotter": self.name})
        return mounts

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await self._create(Kind.ACTIVE, key, parent, labels)

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await self._create(Kind.VIEW, key, parent, labels)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        async with self.gc_lock.shared():
            await self._commit_locked(name, key, labels)

    async def _commit_locked(self, name: str, key: str, labels: Mapping[str, str] | None) -> None:
        namespace = namespace_required()
        labels = validate_labels(labels or {})

        def reserve(conn: sqlite3.Connection) -> tuple[sqlite3.Row, str]:
            row = self._record(conn, namespace, key)
            if conn.execute("SELECT 1 FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                            (namespace, self.name, name)).fetchone():
                raise AlreadyExists(f"snapshot {name} already exists")
            return row, f"{namespace}/{next_sequence(conn, 'snapshot')}/{name}"

        row, backend_name = await self.db.write(reserve)
        await self.backend.commit(backend_name, row["backend_key"], _inherited(labels))

        def record(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute("DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                         (namespace, self.name, key))
            conn.execute("INSERT INTO snapshots(namespace, snapshotter, key, backend_key, parent, labels, created_at, "
                         "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (namespace, self.name, name, backend_name, row["parent"], dump_labels(labels), now, now))
            conn.execute("UPDATE snapshots SET parent = ? WHERE namespace = ? AND snapshotter = ? AND parent = ?",
                         (name, namespace, self.name, key))
            resource = f"snapshots/{self.name}"
            conn.execute("DELETE FROM lease_resources WHERE namespace = ? AND type = ? AND id = ?",
                         (namespace, resource, key))
            add_lease_resource(conn, namespace, Resource(type=resource, id=name))

        await self.db.write(record)
        self._publish(namespace, "/snapshot/commit", {"key": key, "name": name, "snapshotter": self.name})

    async def remove(self, key: str) -> None:
        """Drop the record (refused while it has children); the backend snapshot goes at the next GC."""
        namespace = namespace_required()

        def drop(conn: sqlite3.Connection) -> None:
            self._record(conn, namespace, key)
            if conn.execute("SELECT 1 FROM snapshots WHERE namespace = ? AND snapshotter = ? AND parent = ? LIMIT 1",
                            (namespace, self.name, key)).fetchone():
                raise FailedPrecondition(f"cannot remove snapshot {key}: it has children")
            conn.execute("DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                         (namespace, self.name, key))
            conn.execute("DELETE FROM lease_resources WHERE namespace = ? AND type = ? AND id = ?",
                         (namespace, f"snapshots/{self.name}", key))

        await self.db.write(drop)
        self._on_delete()
        self._publish(namespace, "/snapshot/remove", {"key": key, "snapshotter": self.name})

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[Info]:
        namespace = namespace_required()
        matcher = parse_filters(filters)
        rows = await self.db.read(lambda c: c.execute(
            "SELECT * FROM snapshots WHERE namespace = ? AND snapshotter = ? ORDER BY key",
            (namespace, self.name)).fetchall())
        kinds = {info.name: info.kind async for info in self.backend.walk()}
        for row in rows:
            kind = kinds.get(row["backend_key"])
            if kind is None:
                continue  # being created or removed
            info = Info(name=row["key"], kind=kind, parent=row["parent"], labels=load_labels(row["labels"]),
                        created_at=row["created_at"], updated_at=row["updated_at"])
            if matcher.match_mapping(info.filter_target()):
                yield info

    async def cleanup(self) -> None:
        """Reclaim the backend's disk space now (its ``cleanup``, if it has one)."""
        cleanup = getattr(self.backend, "cleanup", None)
        if cleanup is not None:
            await cleanup()

    async def aclose(self) -> None:
        """Nothing to release here: the backend belongs to its plugin, which closes it."""


async def collect_backend(snapshotter: NamespacedSnapshotter, errors: list[str]) -> int:
    """Remove backend snapshots no record names (children before parents), then run the backend's
    cleanup; return how many were removed. Failures are appended to ``errors`` and skipped. New
    snapshots and commits wait meanwhile."""
    async with snapshotter.gc_lock.exclusive():
        return await _collect_backend(snapshotter, errors)


async def _collect_backend(snapshotter: NamespacedSnapshotter, errors: list[str]) -> int:
    name, backend = snapshotter.name, snapshotter.backend
    live = set(await snapshotter.db.read(lambda c: [r[0] for r in c.execute(
        "SELECT backend_key FROM snapshots WHERE snapshotter = ?", (name,))]))
    infos = {info.name: info async for info in backend.walk()}
    stale = {key for key in infos if key not in live}
    removed = 0
    while stale:
        parents = {infos[key].parent for key in infos if infos[key].parent}
        leaves = [key for key in stale if key not in parents]
        if not leaves:
            errors.append(f"snapshotter {name}: cannot order removal of {sorted(stale)[:5]}")
            break
        for key in leaves:
            try:
                await backend.remove(key)
                removed += 1
            except Exception as err:  # one failure never stops the rest (containerd #3923)
                errors.append(f"snapshot {name}/{key}: {err}")
            stale.discard(key)
            infos.pop(key, None)
    cleanup = getattr(backend, "cleanup", None)
    if cleanup is not None:
        try:
            await cleanup()
        except Exception as err:
            errors.append(f"snapshotter {name} cleanup: {err}")
    return removed
