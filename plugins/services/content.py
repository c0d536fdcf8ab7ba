"""``io.berth.rpc.v1.content``: the namespaced content store over RPC.

Reads stream ``{offset, data}`` chunks. Writes use ``content.write`` calls on one connection, in the
shape of containerd's Write stream: ``stat`` opens (or resumes) the ingest ``ref`` and reports how far
it got, ``write`` appends ``data`` at ``offset`` (at offset 0 onto a non-empty ingest, it truncates the
ingest first, as containerd's server does), ``commit`` verifies and publishes the blob, ``close`` lets
the ref go and keeps the progress. The ingest stays open between calls of that connection (one per
namespace and ref) and is closed (progress kept) when the connection ends; a client may pipeline
writes, which are applied in offset order. The daemon never holds more of a blob than the chunks in
flight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from berth.core.content import Info, Store, Writer
from berth.core.errdefs import InvalidArgument, OutOfRange
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler, streaming
from berth.plugins.metadata.plugin import Metadata

READ_CHUNK = 1 << 20
#: How long a pipelined write waits for the writes before it.
WRITE_ORDER_TIMEOUT = 60.0
_SESSION_KEY = "content.uploads"
#: An upload is held per connection under its namespace and ref.
_UploadKey = tuple[str, str]


@dataclass(kw_only=True)
class DigestArgs:
    digest: str


@dataclass(kw_only=True)
class UpdateArgs:
    digest: str
    labels: dict[str, str] = field(default_factory=dict)
    #: ``labels`` (or nothing) replaces every label; ``labels.<key>`` sets or removes one.
    update_mask: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class FilterArgs:
    filters: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class ReadArgs:
    digest: str
    offset: int = 0
    #: Bytes to read; 0 reads to the end.
    size: int = 0


@dataclass(kw_only=True)
class RefArgs:
    ref: str


@dataclass(kw_only=True)
class WriteArgs:
    action: Literal["stat", "write", "commit", "close"]
    ref: str
    #: stat: the expected total size (0: unknown). commit: the size to verify (0: do not check).
    total: int = 0
    #: stat: the digest the blob will have (lets an existing blob short-cut); commit: digest to verify.
    expected: str = ""
    offset: int = 0
    data: bytes = b""
    labels: dict[str, str] = field(default_factory=dict)


class _Upload:
    """An ingest held open for one connection."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.advanced = trio.Event()
        self.lock = trio.Lock()

    def reply(self) -> dict[str, Any]:
        status = self.writer.status()
        return {"ref": status.ref, "offset": status.offset, "total": status.total, "digest": self.writer.digest(),
                "started_at": status.started_at, "updated_at": status.updated_at}


class ContentRPC:
    def __init__(self, store: Store) -> None:
        self.store = store

    @typed_args(DigestArgs)
    async def info(self, call: Call, args: DigestArgs) -> dict[str, Any]:
        return {"info": (await self.store.info(args.digest)).to_wire()}

    @typed_args(UpdateArgs)
    async def update(self, call: Call, args: UpdateArgs) -> dict[str, Any]:
        info = Info(digest=args.digest, size=0, created_at=0, updated_at=0, labels=args.labels)
        return {"info": (await self.store.update(info, args.update_mask)).to_wire()}

    @typed_args(FilterArgs)
    async def list_content(self, call: Call, args: FilterArgs) -> dict[str, Any]:
        return {"infos": [info.to_wire() async for info in self.store.walk(args.filters)]}

    @typed_args(DigestArgs)
    async def delete(self, call: Call, args: DigestArgs) -> dict[str, Any]:
        await self.store.delete(args.digest)
        return {}

    @streaming
    @typed_args(ReadArgs)
    async def read(self, call: Call, args: ReadArgs) -> dict[str, Any]:
        """Stream ``{offset, data}`` chunks of up to 1 MiB -> ``{size}`` (bytes sent)."""
        if args.offset < 0 or args.size < 0:
            raise InvalidArgument("offset and size must not be negative")
        reader = await self.store.reader_at(args.digest)
        try:
            if args.offset > reader.size:
                raise OutOfRange(f"offset {args.offset} is past the end of {args.digest} ({reader.size} bytes)")
            end = reader.size if not args.size else min(reader.size, args.offset + args.size)
            offset = args.offset
            while offset < end:
                data = await reader.read_at(offset, min(READ_CHUNK, end - offset))
                if not data:
                    break
                await call.send({"offset": offset, "data": data})
                offset += len(data)
        finally:
            await reader.close()
        return {"size": offset - args.offset}

    @typed_args(RefArgs)
    async def status(self, call: Call, args: RefArgs) -> dict[str, Any]:
        return {"status": (await self.store.status(args.ref)).to_wire()}

    @typed_args(FilterArgs)
    async def list_statuses(self, call: Call, args: FilterArgs) -> dict[str, Any]:
        return {"statuses": [s.to_wire() for s in await self.store.list_statuses(args.filters)]}

    @typed_args(RefArgs)
    async def abort(self, call: Call, args: RefArgs) -> dict[str, Any]:
        uploads = self._uploads(call)
        upload = uploads.pop((call.namespace, args.ref), None)
        if upload is not None:
            await upload.writer.close()
        await self.store.abort(args.ref)
        return {}

    def _uploads(self, call: Call) -> dict[_UploadKey, _Upload]:
        uploads: dict[_UploadKey, _Upload] | None = call.session.get(_SESSION_KEY)
        if uploads is None:
            uploads = call.session[_SESSION_KEY] = {}

            async def close_all() -> None:
                for upload in list(uploads.values()):
                    await upload.writer.close()
                uploads.clear()

            call.on_disconnect(close_all)
        return uploads

    @typed_args(WriteArgs)
    async def write(self, call: Call, args: WriteArgs) -> dict[str, Any]:
        """One step of an upload -> ``{ref, offset, total, digest, started_at, updated_at}``."""
        uploads = self._uploads(call)
        key = (call.namespace, args.ref)
        upload = uploads.get(key)
        if upload is None:
            if args.action == "close":
                return {"ref": args.ref, "offset": 0, "total": 0, "digest": "", "started_at": 0.0,
                        "updated_at": 0.0}
            upload = uploads[key] = _Upload(await self.store.writer(args.ref, total=args.total,
                                                                    expected=args.expected))
        if args.action == "stat":
            return upload.reply()
        if args.action == "close":
            del uploads[key]
            async with upload.lock:
                await upload.writer.close()
            return upload.reply()
        if args.action == "write":
            return await self._write(upload, args)
        # commit
        async with upload.lock:
            uploads.pop(key, None)
            await upload.writer.commit(args.total, args.expected, args.labels)
            return upload.reply()

    async def _write(self, upload: _Upload, args: WriteArgs) -> dict[str, Any]:
        with trio.move_on_after(WRITE_ORDER_TIMEOUT):
            while upload.writer.status().offset < args.offset:  # an earlier chunk is still on its way
                await upload.advanced.wait()
        async with upload.lock:
            current = upload.writer.status().offset
            if args.offset == 0 and current > 0:  # a restart: containerd's server truncates too
                await upload.writer.truncate(0)
                current = 0
            if args.offset != current:
                raise OutOfRange(f"write at offset {args.offset} but ingest {args.ref} is at {current}")
            try:
                await upload.writer.write(args.data)
            finally:
                upload.advanced.set()
                upload.advanced = trio.Event()
            return upload.reply()

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"content.info": self.info, "content.update": self.update, "content.list": self.list_content,
                "content.delete": self.delete, "content.read": self.read, "content.status": self.status,
                "content.list_statuses": self.list_statuses, "content.abort": self.abort,
                "content.write": self.write}


async def init(ic: InitContext) -> ContentRPC:
    metadata: Metadata = ic.get_single(PluginType.METADATA)
    return ContentRPC(metadata.content)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.RPC, id="content", init=init, requires=(PluginType.METADATA,)))
