"""Images: ``io.berth.service.v1.images-service`` (the metadata database's image store, whose synchronous
delete runs the GC scheduler's collection) and its RPC wrapper ``io.berth.rpc.v1.images``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.core.events import Exchange
from berth.core.metadata.images import ImageStore
from berth.core.oci import Descriptor
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler
from berth.plugins.gc.scheduler import Scheduler
from berth.plugins.metadata.plugin import Metadata


@dataclass(kw_only=True)
class NameArgs:
    name: str


@dataclass(kw_only=True)
class ListArgs:
    filters: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class CreateArgs:
    name: str
    #: An OCI descriptor map (``mediaType``, ``digest``, ``size``, ...).
    target: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class UpdateArgs:
    name: str
    target: dict[str, Any] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    #: ``labels`` replaces every label, ``labels.<key>`` sets or removes one, ``target`` replaces the target.
    update_mask: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class DeleteArgs:
    name: str
    #: Run garbage collection before answering.
    sync: bool = False
    #: Delete only if the image points at this digest ("": whatever it points at).
    target: str = ""


class ImagesRPC:
    def __init__(self, store: ImageStore) -> None:
        self.store = store

    @typed_args(NameArgs)
    async def get(self, call: Call, args: NameArgs) -> dict[str, Any]:
        return {"image": (await self.store.get(args.name)).to_wire()}

    @typed_args(ListArgs)
    async def list_images(self, call: Call, args: ListArgs) -> dict[str, Any]:
        return {"images": [i.to_wire() for i in await self.store.list_all(args.filters)]}

    @typed_args(CreateArgs)
    async def create(self, call: Call, args: CreateArgs) -> dict[str, Any]:
        image = await self.store.create(args.name, Descriptor.from_wire(args.target), args.labels)
        return {"image": image.to_wire()}

    @typed_args(UpdateArgs)
    async def update(self, call: Call, args: UpdateArgs) -> dict[str, Any]:
        target = Descriptor.from_wire(args.target) if args.target is not None else None
        image = await self.store.update(args.name, target=target, labels=args.labels, fieldpaths=args.update_mask)
        return {"image": image.to_wire()}

    @typed_args(DeleteArgs)
    async def delete(self, call: Call, args: DeleteArgs) -> dict[str, Any]:
        await self.store.delete(args.name, sync=args.sync, target=args.target)
        return {}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"images.get": self.get, "images.list": self.list_images, "images.create": self.create,
                "images.update": self.update, "images.delete": self.delete}


async def init_store(ic: InitContext) -> ImageStore:
    metadata: Metadata = ic.get_single(PluginType.METADATA)
    scheduler: Scheduler = ic.get_single(PluginType.GC)
    exchange: Exchange = ic.get_single(PluginType.EVENT)
    return ImageStore(metadata.db, exchange.publish, collect=scheduler.collect_now,
                      on_delete=metadata.notify_deletion)


async def init_rpc(ic: InitContext) -> ImagesRPC:
    return ImagesRPC(ic.get_by_id(PluginType.SERVICE, "images-service"))


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.SERVICE, id="images-service", init=init_store,
                                   requires=(PluginType.METADATA, PluginType.GC, PluginType.EVENT)))
    registry.register(Registration(type=PluginType.RPC, id="images", init=init_rpc,
                                   requires=(PluginType.SERVICE,)))
