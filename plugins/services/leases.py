"""``io.berth.rpc.v1.leases``: leases over RPC, in the call's namespace."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.core.filters import parse_filters
from berth.core.metadata.leases import LeaseManager, Resource
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler


@dataclass(kw_only=True)
class CreateArgs:
    id: str
    labels: dict[str, str] = field(default_factory=dict)
    #: Seconds until the lease expires (sets ``berth.io/gc.expire``); absent: never.
    expires_in: float | None = None


@dataclass(kw_only=True)
class DeleteArgs:
    id: str
    #: Run garbage collection before answering.
    sync: bool = False


@dataclass(kw_only=True)
class ListArgs:
    filters: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class ResourceArgs:
    id: str
    type: str
    resource: str


@dataclass(kw_only=True)
class IdArgs:
    id: str


class LeasesRPC:
    def __init__(self, leases: LeaseManager) -> None:
        self.leases = leases

    @typed_args(CreateArgs)
    async def create(self, call: Call, args: CreateArgs) -> dict[str, Any]:
        lease = await self.leases.create(args.id, args.labels, args.expires_in)
        return {"lease": lease.to_wire()}

    @typed_args(DeleteArgs)
    async def delete(self, call: Call, args: DeleteArgs) -> dict[str, Any]:
        await self.leases.delete(args.id, sync=args.sync)
        return {}

    @typed_args(ListArgs)
    async def list_leases(self, call: Call, args: ListArgs) -> dict[str, Any]:
        matcher = parse_filters(args.filters)
        wire = [lease.to_wire() for lease in await self.leases.list_all()]
        return {"leases": [w for w in wire if matcher.match_mapping(w)]}

    @typed_args(ResourceArgs)
    async def add_resource(self, call: Call, args: ResourceArgs) -> dict[str, Any]:
        await self.leases.add_resource(args.id, Resource(type=args.type, id=args.resource))
        return {}

    @typed_args(ResourceArgs)
    async def delete_resource(self, call: Call, args: ResourceArgs) -> dict[str, Any]:
        await self.leases.delete_resource(args.id, Resource(type=args.type, id=args.resource))
        return {}

    @typed_args(IdArgs)
    async def list_resources(self, call: Call, args: IdArgs) -> dict[str, Any]:
        return {"resources": [r.to_wire() for r in await self.leases.list_resources(args.id)]}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"leases.create": self.create, "leases.delete": self.delete, "leases.list": self.list_leases,
                "leases.add_resource": self.add_resource, "leases.delete_resource": self.delete_resource,
                "leases.list_resources": self.list_resources}


async def init(ic: InitContext) -> LeasesRPC:
    return LeasesRPC(ic.get_single(PluginType.LEASE))


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.RPC, id="leases", init=init, requires=(PluginType.LEASE,)))
