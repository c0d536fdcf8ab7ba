"""Images in the metadata database: a name in a namespace pointing at a root descriptor (an index or a
manifest), with labels.

An image is a garbage-collection root (unless its ``berth.io/gc.expire`` label is past) that references
its target blob; the target's ``berth.io/gc.ref.*`` labels keep the rest of the tree. Deleting an image
drops the record; the blobs it alone kept go at the next collection (at once with ``sync``). An image
created under a lease (the call's lease) joins that lease. Publishes ``/images/create``,
``/images/update`` ``{name, labels}`` and ``/images/delete`` ``{name}``.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from berth.core.content import validate_digest
from berth.core.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from berth.core.filters import parse_filters
from berth.core.identifiers import validate_labels
from berth.core.metadata.db import MetadataDB, dump_labels, load_labels
from berth.core.metadata.leases import Resource, add_lease_resource
from berth.core.metadata.namespaces import ensure_namespace
from berth.core.namespaces import namespace_required
from berth.core.oci import Descriptor

__all__ = ["MAX_IMAGE_NAME_LENGTH", "Image", "ImageStore", "validate_image_name", "validate_target"]

Publish = Callable[[str, str, dict[str, Any]], object]

#: Longest image name accepted (a reference: registry host, repository, tag and digest).
MAX_IMAGE_NAME_LENGTH = 512
_NAME = re.compile(r"[A-Za-z0-9][^\s\x00-\x1f\x7f]*\Z")


def validate_image_name(name: Any) -> str:
    """Return ``name`` if it can name an image: 1-512 characters starting with a letter or digit, no
    whitespace or control characters (``docker.io/library/busybox:1.36``, ``local/app@sha256:...``).

    Raises:
        InvalidArgument: saying which rule the name breaks.
    """
    if not isinstance(name, str):
        raise InvalidArgument(f"image name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidArgument("image name must not be empty")
    if len(name) > MAX_IMAGE_NAME_LENGTH:
        raise InvalidArgument(f"image name {name[:40]!r}... is longer than {MAX_IMAGE_NAME_LENGTH} characters")
    if not _NAME.match(name):
        raise InvalidArgument(f"image name {name!r} is invalid: it must start with a letter or digit and hold "
                              "no whitespace or control characters")
    return name


def validate_target(target: Descriptor) -> Descriptor:
    """Return ``target`` if it can be an image's target: a media type, a valid digest, a size >= 0.

    Raises:
        InvalidArgument
    """
    validate_digest(target.digest)
    if isinstance(target.size, bool) or not isinstance(target.size, int) or target.size < 0:
        raise InvalidArgument(f"image target {target.digest} must have a non-negative integer size")
    if not target.media_type:
        raise InvalidArgument(f"image target {target.digest} must have a media type")
    return target


@dataclass(kw_only=True)
class Image:
    name: str
    target: Descriptor
    labels: dict[str, str]
    created_at: float
    updated_at: float

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target.to_wire(), "labels": dict(self.labels),
                "created_at": self.created_at, "updated_at": self.updated_at}

    def filter_target(self) -> dict[str, Any]:
        """What list filters see: ``name``, ``target.{digest,mediatype,size}``, ``labels.<key>``, times."""
        return {"name": self.name, "labels": self.labels, "created_at": self.created_at,
                "updated_at": self.updated_at,
                "target": {"digest": self.target.digest, "mediatype": self.target.media_type,
                           "size": self.target.size}}


def _row(row: sqlite3.Row) -> Image:
    return Image(name=row["name"], target=Descriptor.from_wire(json.loads(row["target"])),
                 labels=load_labels(row["labels"]), created_at=row["created_at"], updated_at=row["updated_at"])


def _dump_target(target: Descriptor) -> str:
    return json.dumps(target.to_wire(), sort_keys=True, separators=(",", ":"))


def _select(conn: sqlite3.Connection, namespace: str, name: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM images WHERE namespace = ? AND name = ?", (namespace, name)).fetchone()
    if row is None:
        raise NotFound(f"image {name} not found")
    return row  # type: ignore[no-any-return]


class ImageStore:
    """The images of the current namespace.

    Args:
        db: the metadata database.
        publish: publishes ``(namespace, topic, event)``.
        collect: runs a garbage collection now (``delete(sync=True)``).
        on_delete: called after an image is deleted (the GC scheduler schedules a collection).
    """

    def __init__(self, db: MetadataDB, publish: Publish | None = None, *,
                 collect: Callable[[], Awaitable[object]] | None = None,
                 on_delete: Callable[[], None] | None = None) -> None:
        self._db = db
        self._publish = publish or (lambda *_: None)
        self._collect = collect
        self._on_delete = on_delete or (lambda: None)

    async def get(self, name: str) -> Image:
        """Raises: NotFound."""
        namespace = namespace_required()
        return _row(await self._db.read(lambda c: _select(c, namespace, name)))

    async def list_all(self, filters: Sequence[str] = ()) -> list[Image]:
        """Images matching any filter (see :meth:`Image.filter_target`), sorted by name.

        Raises: InvalidArgument (a filter that does not parse).
        """
        namespace = namespace_required()
        matcher = parse_filters(filters)
        rows = await self._db.read(lambda c: c.execute(
            "SELECT * FROM images WHERE namespace = ? ORDER BY name", (namespace,)).fetchall())
        images = [_row(r) for r in rows]
        return [i for i in images if matcher.match_mapping(i.filter_target())]

    async def create(self, name: str, target: Descriptor, labels: Mapping[str, str] | None = None) -> Image:
        """Create the image ``name`` (joining the current lease, if any).

        Raises: InvalidArgument (bad name, target or labels), AlreadyExists, NotFound (no such lease).
        """
        namespace = namespace_required()
        validate_image_name(name)
        validate_target(target)
        clean = {k: v for k, v in validate_labels(labels or {}).items() if v}

        def insert(conn: sqlite3.Connection) -> Image:
            ensure_namespace(conn, namespace)
            now = time.time()
            try:
                conn.execute("INSERT INTO images(namespace, name, target, labels, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (namespace, name, _dump_target(target), dump_labels(clean), now, now))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"image {name} already exists") from None
            add_lease_resource(conn, namespace, Resource(type="images", id=name))
            return Image(name=name, target=target, labels=clean, created_at=now, updated_at=now)

        image = await self._db.write(insert)
        self._publish(namespace, "/images/create", {"name": name, "labels": dict(image.labels)})
        return image

    async def update(self, name: str, *, target: Descriptor | None = None, labels: Mapping[str, str] | None = None,
                     fieldpaths: Sequence[str] = ()) -> Image:
        """Change an image. ``fieldpaths``: ``labels`` replaces every label, ``labels.<key>`` sets (or, when
        ``labels`` has no such key or an empty value, removes) one, ``target`` replaces the target. No
        fieldpaths: the labels are replaced, and the target too when one is given.

        Raises: NotFound, InvalidArgument (an unknown field path, bad labels, ``target`` named without one).
        """
        namespace = namespace_required()
        given = validate_labels(labels or {})
        for path in fieldpaths:
            if path not in ("labels", "target") and not path.startswith("labels."):
                raise InvalidArgument(f"cannot update field {path!r} of an image (labels, labels.<key>, target)")
        if "target" in fieldpaths and target is None:
            raise InvalidArgument("update of the image target needs a target")
        if target is not None:
            validate_target(target)
        replace_labels = not fieldpaths or "labels" in fieldpaths
        replace_target = target is not None and (not fieldpaths or "target" in fieldpaths)

        def change(conn: sqlite3.Connection) -> Image:
            image = _row(_select(conn, namespace, name))
            if replace_labels:
                new = dict(given)
            else:
                new = dict(image.labels)
                for path in fieldpaths:
                    if not path.startswith("labels."):
                        continue
                    key = path.removeprefix("labels.")
                    if given.get(key):
                        new[key] = given[key]
                    else:
                        new.pop(key, None)
            image.labels = {k: v for k, v in new.items() if v}
            if replace_target and target is not None:
                image.target = target
            image.updated_at = time.time()
            conn.execute("UPDATE images SET target = ?, labels = ?, updated_at = ? WHERE namespace = ? AND name = ?",
                         (_dump_target(image.target), dump_labels(image.labels), image.updated_at, namespace, name))
            return image

        image = await self._db.write(change)
        self._publish(namespace, "/images/update", {"name": name, "labels": dict(image.labels)})
        return image

    async def put(self, name: str, target: Descriptor) -> Image:
        """Create the image, or point the existing one at ``target`` (what a pull or an import leaves)."""
        try:
            return await self.create(name, target)
        except AlreadyExists:
            return await self.update(name, target=target, fieldpaths=["target"])

    async def delete(self, name: str, *, sync: bool = False, target: str = "") -> None:
        """Delete the image record; its blobs go at the next garbage collection, which ``sync`` runs
        before returning. With ``target`` (a digest), delete only if the image still points there.

        Raises: NotFound, FailedPrecondition (the target differs), InvalidArgument (bad digest).
        """
        namespace = namespace_required()
        if target:
            validate_digest(target)

        def remove(conn: sqlite3.Connection) -> None:
            if target:
                current = _row(_select(conn, namespace, name)).target.digest
                if current != target:
                    raise FailedPrecondition(f"image {name} points at {current}, not {target}")
            cursor = conn.execute("DELETE FROM images WHERE namespace = ? AND name = ?", (namespace, name))
            if cursor.rowcount == 0:
                raise NotFound(f"image {name} not found")
            conn.execute("DELETE FROM lease_resources WHERE namespace = ? AND type = 'images' AND id = ?",
                         (namespace, name))

        await self._db.write(remove)
        self._on_delete()
        self._publish(namespace, "/images/delete", {"name": name})
        if sync and self._collect is not None:
            await self._collect()
