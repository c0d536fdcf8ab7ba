"""``io.berth.rpc.v1.transfer``: pull, push, import and export over RPC.

``transfer.pull`` and ``transfer.push`` stream progress while they run: every 100 ms at most, one item
``{"progress": [{ref, status, offset, total}, ...]}`` with what changed since the last one (``status`` is
``downloading``/``uploading``/``exists``/``done``/``unpacking``/``unpacked``), then the result.
``transfer.export`` streams the archive as ``{"data": bytes}`` items.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler, streaming
from berth.plugins.images.plugin import Transfer

#: Seconds between two progress items of one call.
PROGRESS_INTERVAL = 0.1


@dataclass(kw_only=True)
class PullArgs:
    reference: str
    platform: str = ""
    all_platforms: bool = False
    snapshotter: str = ""
    unpack: bool = True
    plain_http: bool = False


@dataclass(kw_only=True)
class PushArgs:
    name: str
    #: Where to push (default: the image's own name).
    destination: str = ""
    plain_http: bool = False


@dataclass(kw_only=True)
class ImportArgs:
    #: The archive, uploaded to the content store first (``content.write``).
    digest: str
    base_name: str = ""
    snapshotter: str = ""
    unpack: bool = True


@dataclass(kw_only=True)
class ExportArgs:
    names: list[str] = field(default_factory=list)


class _ProgressPump:
    """Collects progress events (latest per ref) and sends what changed at most every 100 ms."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.pending: dict[str, dict[str, Any]] = {}
        self.changed = trio.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        self.pending[str(event.get("ref", ""))] = event
        self.changed.set()

    async def flush(self) -> None:
        if self.pending:
            batch, self.pending = list(self.pending.values()), {}
            await self.call.send({"progress": batch})

    async def run(self) -> None:
        """Send batches until cancelled."""
        while True:
            await self.changed.wait()
            self.changed = trio.Event()
            started = time.monotonic()
            await self.flush()
            await trio.sleep(max(0.0, PROGRESS_INTERVAL - (time.monotonic() - started)))


class TransferRPC:
    def __init__(self, transfer: Transfer) -> None:
        self.transfer = transfer

    @streaming
    @typed_args(PullArgs)
    async def pull(self, call: Call, args: PullArgs) -> dict[str, Any]:
        """Stream progress -> the pull's result (name, target, chain_id, counts, seconds)."""
        pump = _ProgressPump(call)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            result = await self.transfer.pull(args.reference, platform=args.platform,
                                              all_platforms=args.all_platforms, snapshotter=args.snapshotter,
                                              unpack=args.unpack, plain_http=args.plain_http, progress=pump)
            nursery.cancel_scope.cancel()
        await pump.flush()
        return result.to_wire()

    @streaming
    @typed_args(PushArgs)
    async def push(self, call: Call, args: PushArgs) -> dict[str, Any]:
        """Stream progress -> the push's result."""
        pump = _ProgressPump(call)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            result = await self.transfer.push(args.name, args.destination, plain_http=args.plain_http,
                                              progress=pump)
            nursery.cancel_scope.cancel()
        await pump.flush()
        return result.to_wire()

    @typed_args(ImportArgs)
    async def import_archive(self, call: Call, args: ImportArgs) -> dict[str, Any]:
        return await self.transfer.import_archive(args.digest, base_name=args.base_name,
                                                  snapshotter=args.snapshotter, unpack=args.unpack)

    @streaming
    @typed_args(ExportArgs)
    async def export(self, call: Call, args: ExportArgs) -> dict[str, Any]:
        """Stream ``{data}`` chunks of the archive -> ``{size}``."""
        size = 0
        async for chunk in self.transfer.export(args.names):
            await call.send({"data": chunk})
            size += len(chunk)
        return {"size": size}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"transfer.pull": self.pull, "transfer.push": self.push, "transfer.import": self.import_archive,
                "transfer.export": self.export}


async def init(ic: InitContext) -> TransferRPC:
    return TransferRPC(ic.get_single(PluginType.TRANSFER))


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.RPC, id="transfer", init=init, requires=(PluginType.TRANSFER,)))
