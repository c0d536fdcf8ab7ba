"""The daemon's content store over RPC: a :class:`berth.core.content.Store` on an :class:`AsyncClient`.

::

    async with open_client() as client:
        store = RemoteContentStore(client)
        with with_namespace("example"):              # else the client's namespace
            writer = await store.writer("upload-1", total=len(data), expected=digest)
            try:
                await writer.write(data)
                await writer.commit(len(data), digest)
            finally:
                await writer.close()

Every call runs in :func:`~berth.core.namespaces.current_namespace` when one is set (else the
namespace given here, else the client's) and joins :func:`~berth.core.namespaces.current_lease` (else
the lease given here, if any). Readers and writers keep the namespace and lease they were opened in.

A writer is the ``content.write`` conversation of containerd's Write stream: ``stat`` opens (or
resumes) the ingest and reports its progress, ``write`` appends a chunk at the current offset (a
write at offset 0 onto a non-empty ingest truncates it first, as containerd's server does),
``commit`` verifies and publishes, ``close`` keeps the progress. The daemon holds the ingest for the
connection, so a ref can have one writer per connection: a second ``writer(ref)`` on the same
client gets Unavailable here, as a second connection gets it from the daemon.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from berth.core.content import Info, Status
from berth.core.errdefs import FailedPrecondition, InvalidArgument, Unavailable
from berth.core.namespaces import current_lease, current_namespace

if TYPE_CHECKING:
    from berth.client.aio import AsyncClient

__all__ = ["RemoteContentStore", "RemoteReaderAt", "RemoteWriter"]

#: Bytes per ``content.write`` call (well under the 16 MiB message limit).
WRITE_CHUNK = 1 << 20

#: Refs with an open writer, per connection: the daemon keeps one ingest per (namespace, ref) and connection.
_open_refs: weakref.WeakKeyDictionary[AsyncClient, set[tuple[str, str]]] = weakref.WeakKeyDictionary()


def _info(wire: Mapping[str, Any]) -> Info:
    return Info(digest=wire["digest"], size=int(wire["size"]), created_at=float(wire["created_at"]),
                updated_at=float(wire["updated_at"]), labels=dict(wire.get("labels") or {}))


def _status(wire: Mapping[str, Any], expected: str = "") -> Status:
    return Status(ref=wire["ref"], offset=int(wire["offset"]), total=int(wire.get("total") or 0),
                  expected=wire.get("expected") or expected, started_at=float(wire["started_at"]),
                  updated_at=float(wire["updated_at"]))


class RemoteContentStore:
    """The content store of the daemon ``client`` is connected to.

    Args:
        client: the connection.
        namespace: the namespace when none is set in the context (default: the client's).
        lease: the lease new content and ingests join when none is set in the context.
    """

    def __init__(self, client: AsyncClient, *, namespace: str | None = None, lease: str | None = None) -> None:
        self.client = client
        self._namespace = namespace
        self._lease = lease

    def _scope(self) -> tuple[str, str | None]:
        return current_namespace() or self._namespace or self.client.namespace, current_lease() or self._lease

    async def _call(self, method: str, args: dict[str, Any]) -> Any:
        namespace, lease = self._scope()
        return await self.client.call(method, args, namespace=namespace, lease=lease)

    async def info(self, digest: str) -> Info:
        return _info((await self._call("content.info", {"digest": digest}))["info"])

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        result = await self._call("content.update", {"digest": info.digest, "labels": dict(info.labels),
                                                     "update_mask": list(fieldpaths)})
        return _info(result["info"])

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[Info]:
        for wire in (await self._call("content.list", {"filters": list(filters)}))["infos"]:
            yield _info(wire)

    async def delete(self, digest: str) -> None:
        await self._call("content.delete", {"digest": digest})

    async def reader_at(self, digest: str) -> RemoteReaderAt:
        namespace, lease = self._scope()
        result = await self.client.call("content.info", {"digest": digest}, namespace=namespace, lease=lease)
        return RemoteReaderAt(self.client, digest, int(result["info"]["size"]), namespace=namespace, lease=lease)

    async def status(self, ref: str) -> Status:
        return _status((await self._call("content.status", {"ref": ref}))["status"])

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[Status]:
        result = await self._call("content.list_statuses", {"filters": list(filters)})
        return [_status(wire) for wire in result["statuses"]]

    async def abort(self, ref: str) -> None:
        await self._call("content.abort", {"ref": ref})

    async def writer(self, ref: str, *, total: int = 0, expected: str = "") -> RemoteWriter:
        namespace, lease = self._scope()
        held = _open_refs.setdefault(self.client, set())
        if (namespace, ref) in held:
            raise Unavailable(f"ref {ref} locked: a writer on this connection holds it")
        held.add((namespace, ref))
        try:
            reply = await self.client.call(
                "content.write", {"action": "stat", "ref": ref, "total": total, "expected": expected},
                namespace=namespace, lease=lease)
        except BaseException:
            held.discard((namespace, ref))
            raise
        return RemoteWriter(self.client, ref=ref, namespace=namespace, lease=lease, expected=expected, reply=reply)


class RemoteReaderAt:
    """Random access to a blob through ``content.read`` streams (one per :meth:`read_at`)."""

    def __init__(self, client: AsyncClient, digest: str, size: int, *, namespace: str, lease: str | None) -> None:
        self._client = client
        self._digest = digest
        self._size = size
        self._namespace = namespace
        self._lease = lease
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    async def read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise InvalidArgument("offset and size must not be negative")
        if self._closed:
            raise FailedPrecondition("reader is closed")
        if size == 0 or offset >= self._size:
            return b""
        parts: list[bytes] = []
        args = {"digest": self._digest, "offset": offset, "size": size}
        async with self._client.stream("content.read", args, namespace=self._namespace,
                                       lease=self._lease) as chunks:
            async for chunk in chunks:
                parts.append(chunk["data"])
        return b"".join(parts)

    async def close(self) -> None:
        self._closed = True


class RemoteWriter:
    """One ingest held open by the daemon for this connection (see the module docstring)."""

    def __init__(self, client: AsyncClient, *, ref: str, namespace: str, lease: str | None, expected: str,
                 reply: Mapping[str, Any]) -> None:
        self._client = client
        self._ref = ref
        self._namespace = namespace
        self._lease = lease
        self._expected = expected
        self._closed = False
        self._apply(reply)

    @property
    def ref(self) -> str:
        return self._ref

    def _apply(self, reply: Mapping[str, Any]) -> None:
        self._status = _status(reply, self._expected)
        self._digest: str = reply["digest"]

    async def _step(self, action: str, **args: Any) -> None:
        reply = await self._client.call("content.write", {"action": action, "ref": self._ref, **args},
                                        namespace=self._namespace, lease=self._lease)
        self._apply(reply)

    def _require_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"writer for ref {self._ref} is closed")

    def _release(self) -> None:
        self._closed = True
        held = _open_refs.get(self._client)
        if held is not None:
            held.discard((self._namespace, self._ref))

    async def write(self, data: bytes) -> None:
        self._require_open()
        view = memoryview(data)
        for start in range(0, len(view), WRITE_CHUNK):
            await self._step("write", offset=self._status.offset, data=bytes(view[start:start + WRITE_CHUNK]))

    def digest(self) -> str:
        return self._digest

    def status(self) -> Status:
        return self._status

    async def truncate(self, size: int) -> None:
        self._require_open()
        if size != 0:
            raise InvalidArgument("truncate supports only size 0")
        await self._step("write", offset=0, data=b"")

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> None:
        self._require_open()
        self._release()  # the daemon closes the ingest whatever the outcome
        await self._step("commit", total=size, expected=expected, labels=dict(labels or {}))

    async def close(self) -> None:
        if self._closed:
            return
        self._release()
        await self._step("close")
