"""Containers in the metadata database: what runs (spec, runtime), from which image and on which snapshot.

A container is only a record: creating one starts nothing (tasks do). Each row of the ``containers``
table holds the id, the labels and the timestamps as columns and the rest as a JSON ``record``
(``image``, ``runtime``, ``spec``, ``snapshotter``, ``snapshot_key``, ``extensions``); the garbage
collector reads ``snapshotter`` and ``snapshot_key`` from it, so a container holds its snapshot.
Publishes ``/containers/create``, ``/containers/update`` and ``/containers/delete``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from berth.core.errdefs import AlreadyExists, InvalidArgument, NotFound
from berth.core.filters import parse_filters
from berth.core.identifiers import validate_identifier, validate_labels
from berth.core.metadata.db import MetadataDB, dump_labels, load_labels
from berth.core.metadata.namespaces import ensure_namespace
from berth.core.namespaces import namespace_required

__all__ = ["Container", "ContainerStore", "Runtime"]

Publish = Callable[[str, str, dict[str, Any]], object]

#: Fields a full update (no field paths) replaces; the others are immutable there.
_REPLACED = ("labels", "spec", "extensions", "image", "snapshot_key")


@dataclass(kw_only=True)
class Runtime:
    """The runtime plugin that runs the container's tasks (``name``: e.g. ``io.berth.runtime.v1.runc``)
    and its options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options)}


@dataclass(kw_only=True)
class Container:
    id: str
    runtime: Runtime
    labels: dict[str, str] = field(default_factory=dict)
    #: The image name the container was made from (may be empty).
    image: str = ""
    #: The OCI runtime spec (``config.json``).
    spec: dict[str, Any] = field(default_factory=dict)
    snapshotter: str = ""
    #: The container's root filesystem snapshot, in ``snapshotter``.
    snapshot_key: str = ""
    #: Clients' own data, by name (containerd's extensions).
    extensions: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "labels": dict(self.labels), "image": self.image, "runtime": self.runtime.to_wire(),
                "spec": self.spec, "snapshotter": self.snapshotter, "snapshot_key": self.snapshot_key,
                "extensions": dict(self.extensions), "created_at": self.created_at, "updated_at": self.updated_at}

    def filter_target(self) -> dict[str, Any]:
        """The fields list filters see: ``id``, ``image``, ``runtime.name``, ``labels.<k>``,
        ``snapshotter``, ``snapshot_key``."""
        return {"id": self.id, "image": self.image, "runtime": {"name": self.runtime.name},
                "labels": self.labels, "snapshotter": self.snapshotter, "snapshot_key": self.snapshot_key}

    def _record(self) -> str:
        record = {"image": self.image, "runtime": self.runtime.to_wire(), "spec": self.spec,
                  "snapshotter": self.snapshotter, "snapshot_key": self.snapshot_key, "extensions": self.extensions}
        try:
            return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as err:
            raise InvalidArgument(f"container {self.id}: spec, runtime options and extensions must be plain "
                                  f"JSON data: {err}") from None


def _from_row(row: sqlite3.Row) -> Container:
    record = json.loads(row["record"])
    runtime = record.get("runtime") or {}
    return Container(id=row["id"], labels=load_labels(row["labels"]), image=record.get("image", ""),
                     runtime=Runtime(name=runtime.get("name", ""), options=runtime.get("options") or {}),
                     spec=record.get("spec") or {}, snapshotter=record.get("snapshotter", ""),
                     snapshot_key=record.get("snapshot_key", ""), extensions=record.get("extensions") or {},
                     created_at=row["created_at"], updated_at=row["updated_at"])


def _validate(container: Container) -> None:
    validate_identifier(container.id, "container id")
    validate_labels(container.labels)
    if not isinstance(container.runtime.name, str) or not container.runtime.name:
        raise InvalidArgument(f"container {container.id}: a runtime name is required")
    if not isinstance(container.spec, Mapping) or not container.spec:
        raise InvalidArgument(f"container {container.id}: a spec is required")
    if container.snapshot_key and not container.snapshotter:
        raise InvalidArgument(f"container {container.id}: snapshot_key {container.snapshot_key!r} needs a snapshotter")
    for key in container.extensions:
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"container {container.id}: extension names must be non-empty strings")


class ContainerStore:
    """Containers of the current namespace (containerd's ``containers.Store``).

    Args:
        db: the metadata database.
        publish: ``publish(namespace, topic, event)`` for the container events.
        on_delete: called after a container is deleted (its snapshot may now be garbage).
    """

    def __init__(self, db: MetadataDB, publish: Publish | None = None,
                 on_delete: Callable[[], None] | None = None) -> None:
        self._db = db
        self._publish = publish or (lambda *_: None)
        self._on_delete = on_delete or (lambda: None)

    async def get(self, container_id: str) -> Container:
        """Raises: NotFound."""
        namespace = namespace_required()
        row = await self._db.read(lambda c: c.execute(
            "SELECT * FROM containers WHERE namespace = ? AND id = ?", (namespace, container_id)).fetchone())
        if row is None:
            raise NotFound(f"container {container_id} not found")
        return _from_row(row)

    async def list_all(self, filters: Sequence[str] = ()) -> list[Container]:
        """Containers matching any of ``filters`` (fields of :meth:`Container.filter_target`), by id.

        Raises: InvalidArgument (bad filter syntax).
        """
        namespace = namespace_required()
        matcher = parse_filters(filters)
        rows = await self._db.read(lambda c: c.execute(
            "SELECT * FROM containers WHERE namespace = ? ORDER BY id", (namespace,)).fetchall())
        containers = [_from_row(row) for row in rows]
        return [c for c in containers if matcher.match_mapping(c.filter_target())]

    async def create(self, container: Container) -> Container:
        """Record a new container (its timestamps are set here) and return it.

        Raises: InvalidArgument (bad id, labels, no runtime name or spec, data that is not JSON),
        AlreadyExists.
        """
        namespace = namespace_required()
        _validate(container)
        record = container._record()
        labels = {k: v for k, v in container.labels.items() if v}

        def insert(conn: sqlite3.Connection) -> Container:
            ensure_namespace(conn, namespace)
            now = time.time()
            try:
                conn.execute("INSERT INTO containers(namespace, id, record, labels, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (namespace, container.id, record, dump_labels(labels),
                                                           now, now))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"container {container.id} already exists") from None
            return _from_row(conn.execute("SELECT * FROM containers WHERE namespace = ? AND id = ?",
                                          (namespace, container.id)).fetchone())

        created = await self._db.write(insert)
        self._publish(namespace, "/containers/create",
                      {"id": created.id, "image": created.image, "runtime": created.runtime.to_wire()})
        return created

    async def update(self, container: Container, fieldpaths: Sequence[str] = ()) -> Container:
        """Change the stored container ``container.id`` from ``container``, as containerd's field masks do.

        No field paths replace ``labels``, ``spec``, ``extensions``, ``image`` and ``snapshot_key`` (the
        runtime name and the snapshotter must then be unchanged). Otherwise each path names what to take
        from ``container``: ``labels``, ``labels.<key>`` (absent or empty: removed), ``extensions``,
        ``extensions.<key>``, ``image``, ``spec``, ``snapshot_key``, ``runtime`` or ``runtime.options``.

        Raises: NotFound; InvalidArgument (an unknown or immutable field, bad labels or data).
        """
        namespace = namespace_required()
        for path in fieldpaths:
            if path.startswith(("labels.", "extensions.")):
                continue
            if path not in (*_REPLACED, "snapshotkey", "runtime", "runtime.options"):
                raise InvalidArgument(f"cannot update field {path!r} of container {container.id}")

        def change(conn: sqlite3.Connection) -> Container:
            row = conn.execute("SELECT * FROM containers WHERE namespace = ? AND id = ?",
                               (namespace, container.id)).fetchone()
            if row is None:
                raise NotFound(f"container {container.id} not found")
            current = _from_row(row)
            paths = list(fieldpaths)
            if not paths:
                if container.snapshotter != current.snapshotter:
                    raise InvalidArgument(f"container {container.id}: the snapshotter cannot be changed")
                if container.runtime.name != current.runtime.name:
                    raise InvalidArgument(f"container {container.id}: the runtime name cannot be changed "
                                          "without a field path")
                paths = list(_REPLACED)
            for path in paths:
                if path.startswith("labels."):
                    key = path.removeprefix("labels.")
                    if container.labels.get(key):
                        current.labels[key] = container.labels[key]
                    else:
                        current.labels.pop(key, None)
                elif path.startswith("extensions."):
                    key = path.removeprefix("extensions.")
                    if key in container.extensions:
                        current.extensions[key] = container.extensions[key]
                    else:
                        current.extensions.pop(key, None)
                elif path == "labels":
                    current.labels = {k: v for k, v in container.labels.items() if v}
                elif path == "extensions":
                    current.extensions = dict(container.extensions)
                elif path == "image":
                    current.image = container.image
                elif path == "spec":
                    current.spec = container.spec
                elif path in ("snapshot_key", "snapshotkey"):
                    current.snapshot_key = container.snapshot_key
                elif path == "runtime":
                    current.runtime = Runtime(name=container.runtime.name, options=dict(container.runtime.options))
                elif path == "runtime.options":
                    current.runtime.options = dict(container.runtime.options)
            _validate(current)
            current.updated_at = time.time()
            conn.execute("UPDATE containers SET record = ?, labels = ?, updated_at = ? WHERE namespace = ? AND id = ?",
                         (current._record(), dump_labels(current.labels), current.updated_at, namespace, current.id))
            return current

        updated = await self._db.write(change)
        self._publish(namespace, "/containers/update",
                      {"id": updated.id, "image": updated.image, "labels": dict(updated.labels),
                       "snapshot_key": updated.snapshot_key})
        return updated

    async def delete(self, container_id: str) -> Container:
        """Delete the record and return what it held (its snapshot stays until removed or collected).

        Raises: NotFound.
        """
        namespace = namespace_required()

        def remove(conn: sqlite3.Connection) -> Container:
            row = conn.execute("SELECT * FROM containers WHERE namespace = ? AND id = ?",
                               (namespace, container_id)).fetchone()
            if row is None:
                raise NotFound(f"container {container_id} not found")
            conn.execute("DELETE FROM containers WHERE namespace = ? AND id = ?", (namespace, container_id))
            return _from_row(row)

        deleted = await self._db.write(remove)
        self._on_delete()
        self._publish(namespace, "/containers/delete", {"id": container_id})
        return deleted
