"""The namespaced content store: per-namespace records over one shared backend store.

Bytes live once in the backend (:class:`berth.core.content.Store`, e.g. the local store); each
namespace has its own records (size, labels, timestamps), so a blob is visible in a namespace only once
it was committed there. Backend ingest refs are ``<namespace>/<sequence>/<ref>`` so namespaces never
collide. Deleting a blob deletes the record; the bytes are freed by garbage collection.

Sharing policy (containerd's ``content_sharing_policy``): with **shared**, a writer whose expected
digest is already in the backend (from any namespace) is complete at once and its commit only adds the
record; with **isolated**, the client must write the bytes again to prove it has them, unless the
namespace holding the blob is labelled ``berth.io/namespace.shareable=true``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Literal

from berth.core.content import Info, ReaderAt, Status, Store, Writer, validate_digest
from berth.core.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from berth.core.filters import parse_filters
from berth.core.identifiers import validate_labels
from berth.core.metadata.db import MetadataDB, dump_labels, load_labels, next_sequence
from berth.core.metadata.leases import Resource, add_lease_resource, remove_lease_resource
from berth.core.metadata.namespaces import ensure_namespace
from berth.core.namespaces import namespace_required, with_namespace
from berth.core.sync import SharedExclusiveLock

__all__ = ["INGEST_EXPIRY", "LABEL_SHAREABLE", "NamespacedContentStore"]

LABEL_SHAREABLE = "berth.io/namespace.shareable"
#: An ingest not held by a lease may be collected this long after it was opened.
INGEST_EXPIRY = 24 * 3600.0

Publish = Callable[[str, str, dict[str, Any]], object]


def _info(row: sqlite3.Row) -> Info:
    return Info(digest=row["digest"], size=row["size"], created_at=row["created_at"],
                updated_at=row["updated_at"], labels=load_labels(row["labels"]))


class NamespacedContentStore:
    """A :class:`~berth.core.content.Store` whose every call works in the current namespace."""

    def __init__(self, db: MetadataDB, backend: Store, *, policy: Literal["shared", "isolated"] = "shared",
                 publish: Publish | None = None, on_delete: Callable[[], None] | None = None) -> None:
        self.db = db
        self.backend = backend
        self.policy = policy
        self._publish = publish or (lambda *_: None)
        self._on_delete = on_delete or (lambda: None)
        #: Opening and committing ingests hold it shared; GC holds it exclusive while it frees bytes.
        self.gc_lock = SharedExclusiveLock()

    # ---------------------------------------------------------------- records

    async def info(self, digest: str) -> Info:
        namespace = namespace_required()
        validate_digest(digest)
        row = await self.db.read(lambda c: c.execute(
            "SELECT * FROM content WHERE namespace = ? AND digest = ?", (namespace, digest)).fetchone())
        if row is None:
            raise NotFound(f"content {digest} not found")
        return _info(row)

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        namespace = namespace_required()
        validate_digest(info.digest)
        validate_labels(info.labels)
        for path in fieldpaths:
            if path != "labels" and not path.startswith("labels."):
                raise InvalidArgument(f"cannot update field {path!r} of content (only labels)")

        def change(conn: sqlite3.Connection) -> Info:
            row = conn.execute("SELECT * FROM content WHERE namespace = ? AND digest = ?",
                               (namespace, info.digest)).fetchone()
            if row is None:
                raise NotFound(f"content {info.digest} not found")
            if not fieldpaths or "labels" in fieldpaths:
                labels = dict(info.labels)
            else:
                labels = load_labels(row["labels"])
                for path in fieldpaths:
                    key = path.removeprefix("labels.")
                    if info.labels.get(key):
                        labels[key] = info.labels[key]
                    else:
                        labels.pop(key, None)
            labels = {k: v for k, v in labels.items() if v}  # an empty value removes the label, as in containerd
            now = time.time()
            conn.execute("UPDATE content SET labels = ?, updated_at = ? WHERE namespace = ? AND digest = ?",
                         (dump_labels(labels), now, namespace, info.digest))
            return Info(digest=info.digest, size=row["size"], created_at=row["created_at"], updated_at=now,
                        labels=labels)

        return await self.db.write(change)

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[Info]:
        namespace = namespace_required()
        matcher = parse_filters(filters)
        rows = await self.db.read(lambda c: c.execute(
            "SELECT * FROM content WHERE namespace = ? ORDER BY digest", (namespace,)).fetchall())
        for row in rows:
            info = _info(row)
            if matcher.match_mapping(info.filter_target()):
                yield info

    async def delete(self, digest: str) -> None:
        """Delete the record; the bytes go at the next garbage collection. Raises: NotFound."""
        namespace = namespace_required()
        validate_digest(digest)

        def remove(conn: sqlite3.Connection) -> None:
            cursor = conn.execute("DELETE FROM content WHERE namespace = ? AND digest = ?", (namespace, digest))
            if cursor.rowcount == 0:
                raise NotFound(f"content {digest} not found")
            conn.execute("DELETE FROM lease_resources WHERE namespace = ? AND type = 'content' AND id = ?",
                         (namespace, digest))

        await self.db.write(remove)
        self._on_delete()
        self._publish(namespace, "/content/delete", {"digest": digest})

    async def reader_at(self, digest: str) -> ReaderAt:
        await self.info(digest)  # visible in this namespace?
        return await self.backend.reader_at(digest)

    # ---------------------------------------------------------------- ingests

    def _backend_ref(self, conn: sqlite3.Connection, namespace: str, ref: str) -> str | None:
        row = conn.execute("SELECT backend_ref FROM ingests WHERE namespace = ? AND ref = ?",
                           (namespace, ref)).fetchone()
        return None if row is None else str(row["backend_ref"])

    async def status(self, ref: str) -> Status:
        namespace = namespace_required()
        row = await self.db.read(lambda c: c.execute(
            "SELECT * FROM ingests WHERE namespace = ? AND ref = ?", (namespace, ref)).fetchone())
        if row is None:
            raise NotFound(f"no ingest for ref {ref}")
        return await self._status_of(ref, row["backend_ref"], row["expected"])

    async def _status_of(self, ref: str, backend_ref: str, expected: str) -> Status:
        try:
            st = await self.backend.status(backend_ref)
        except NotFound:
            if not expected:
                raise NotFound(f"no ingest for ref {ref}") from None
            info = await self.backend.info(expected)  # a shared ingest: complete without bytes of its own
            return Status(ref=ref, offset=info.size, total=info.size, expected=expected,
                          started_at=info.created_at, updated_at=info.created_at)
        return Status(ref=ref, offset=st.offset, total=st.total, expected=expected or st.expected,
                      started_at=st.started_at, updated_at=st.updated_at)

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[Status]:
        namespace = namespace_required()
        matcher = parse_filters(filters)
        rows = await self.db.read(lambda c: c.execute(
            "SELECT * FROM ingests WHERE namespace = ? ORDER BY ref", (namespace,)).fetchall())
        out = []
        for row in rows:
            if not matcher.match_mapping({"ref": row["ref"]}):
                continue
            try:
                out.append(await self._status_of(row["ref"], row["backend_ref"], row["expected"]))
            except NotFound:
                continue
        return out

    async def abort(self, ref: str) -> None:
        namespace = namespace_required()

        def remove(conn: sqlite3.Connection) -> str:
            backend_ref = self._backend_ref(conn, namespace, ref)
            if backend_ref is None:
                raise NotFound(f"no ingest for ref {ref}")
            conn.execute("DELETE FROM ingests WHERE namespace = ? AND ref = ?", (namespace, ref))
            conn.execute("DELETE FROM lease_resources WHERE namespace = ? AND type = 'ingests' AND id = ?",
                         (namespace, ref))
            return backend_ref

        backend_ref = await self.db.write(remove)
        with contextlib.suppress(NotFound):  # a shared ingest has no backend data
            await self.backend.abort(backend_ref)

    async def writer(self, ref: str, *, total: int = 0, expected: str = "") -> Writer:
        namespace = namespace_required()
        if not isinstance(ref, str) or not ref:
            raise InvalidArgument("ref must be a non-empty string")
        if expected:
            validate_digest(expected)

        def open_ingest(conn: sqlite3.Connection) -> tuple[str, int, bool] | None:
            nonlocal total
            shared = False
            if expected:
                if conn.execute("SELECT 1 FROM content WHERE namespace = ? AND digest = ?",
                                (namespace, expected)).fetchone():
                    # Lease what exists, and report AlreadyExists after the transaction commits.
                    add_lease_resource(conn, namespace, Resource(type="content", id=expected))
                    return None
                row = conn.execute(
                    "SELECT c.size FROM content c JOIN namespaces n ON n.name = c.namespace "
                    "WHERE c.digest = ? AND (? OR json_extract(n.labels, ?) = 'true') LIMIT 1",
                    (expected, self.policy == "shared", f'$."{LABEL_SHAREABLE}"')).fetchone()
                if row is not None and (total == 0 or total == row["size"]):
                    shared = True
                    total = row["size"]
            ensure_namespace(conn, namespace)
            backend_ref = self._backend_ref(conn, namespace, ref)
            if backend_ref is None:
                backend_ref = f"{namespace}/{next_sequence(conn, 'ingest')}/{ref}"
                conn.execute("INSERT INTO ingests(namespace, ref, backend_ref) VALUES (?, ?, ?)",
                             (namespace, ref, backend_ref))
            leased = add_lease_resource(conn, namespace, Resource(type="ingests", id=ref))
            conn.execute("UPDATE ingests SET expire_at = ?, expected = ? WHERE namespace = ? AND ref = ?",
                         (None if leased else time.time() + INGEST_EXPIRY, expected if shared else "",
                          namespace, ref))
            return backend_ref, total, shared

        async with self.gc_lock.shared():
            opened = await self.db.write(open_ingest)
            if opened is None:
                raise AlreadyExists(f"content {expected} already exists")
            backend_ref, total, shared = opened
            backend_writer = None
            if not shared:
                # The expected digest is checked against this namespace's records, not the backend's:
                # content must be committed in a namespace before it is seen there.
                try:
                    backend_writer = await self.backend.writer(backend_ref, total=total)
                except Unavailable:
                    raise Unavailable(f"ref {ref} is locked by another writer") from None
        return _NamespacedWriter(self, namespace=namespace, ref=ref, backend_ref=backend_ref,
                                 writer=backend_writer, total=total, expected=expected if shared else "")

    async def _commit_record(self, namespace: str, ref: str, digest: str, size: int,
                             labels: Mapping[str, str]) -> None:
        def record(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM ingests WHERE namespace = ? AND ref = ?", (namespace, ref))
            remove_lease_resource(conn, namespace, Resource(type="ingests", id=ref))
            add_lease_resource(conn, namespace, Resource(type="content", id=digest))
            now = time.time()
            try:
                conn.execute("INSERT INTO content(namespace, digest, size, labels, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (namespace, digest, size, dump_labels(labels), now, now))
            except sqlite3.IntegrityError:
                return False
            return True

        if not await self.db.write(record):
            raise AlreadyExists(f"content {digest} already exists")
        self._publish(namespace, "/content/create", {"digest": digest, "size": size})


class _NamespacedWriter:
    """A writer in one namespace; for a shared blob it starts complete and copies only if written to."""

    def __init__(self, store: NamespacedContentStore, *, namespace: str, ref: str, backend_ref: str,
                 writer: Writer | None, total: int, expected: str) -> None:
        self._store = store
        self._namespace = namespace
        self._ref = ref
        self._backend_ref = backend_ref
        self._writer = writer
        self._total = total
        self._expected = expected
        self._started = time.time()

    @property
    def ref(self) -> str:
        return self._ref

    async def _unshare(self, size: int) -> Writer:
        """Turn a shared (bytes-less) writer into a real one holding the first ``size`` bytes of the blob."""
        writer = await self._store.backend.writer(self._backend_ref, total=self._total)
        if size:
            reader = await self._store.backend.reader_at(self._expected)
            try:
                offset = 0
                while offset < size:
                    chunk = await reader.read_at(offset, min(1 << 20, size - offset))
                    if not chunk:
                        break
                    await writer.write(chunk)
                    offset += len(chunk)
            finally:
                await reader.close()
        self._writer = writer
        return writer

    async def write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None:
            if not data:
                return
            writer = await self._unshare(self._total)
        await writer.write(data)

    def digest(self) -> str:
        return self._writer.digest() if self._writer is not None else self._expected

    def status(self) -> Status:
        if self._writer is not None:
            st = self._writer.status()
            return Status(ref=self._ref, offset=st.offset, total=st.total, expected=st.expected,
                          started_at=st.started_at, updated_at=st.updated_at)
        return Status(ref=self._ref, offset=self._total, total=self._total, expected=self._expected,
                      started_at=self._started, updated_at=self._started)

    async def truncate(self, size: int) -> None:
        if self._writer is not None:
            await self._writer.truncate(size)
        else:
            await self._unshare(0)

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> None:
        labels = validate_labels(labels or {})
        async with self._store.gc_lock.shared():
            await self._commit(size, expected, labels)

    async def _commit(self, size: int, expected: str, labels: dict[str, str]) -> None:
        if self._writer is None:
            if size and size != self._total:
                raise FailedPrecondition(f"{self._ref!r} failed size validation: {self._total} != {size}")
            if expected and expected != self._expected:
                raise FailedPrecondition(f"{self._ref!r} unexpected digest {self._expected}, expected {expected}")
            digest, size = self._expected, self._total
        else:
            st = self._writer.status()
            if size and size != st.offset:
                await self._writer.close()
                raise FailedPrecondition(f"{self._ref!r} failed size validation: {st.offset} != {size}")
            size = st.offset
            with contextlib.suppress(AlreadyExists):  # bytes already in the backend: record them here
                await self._writer.commit(size, expected)
            digest = self._writer.digest()
        with with_namespace(self._namespace):
            await self._store._commit_record(self._namespace, self._ref, digest, size, labels)

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
