"""Namespaces: ``io.berth.service.v1.namespaces-service`` (the metadata database's namespace store)
and its RPC wrapper ``io.berth.rpc.v1.namespaces``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.core.filters import parse_filters
from berth.core.metadata.namespaces import NamespaceStore
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler
from berth.plugins.metadata.plugin import Metadata


@dataclass(kw_only=True)
class CreateArgs:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class NameArgs:
    name: str


@dataclass(kw_only=True)
class ListArgs:
    filters: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class UpdateArgs:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    #: ``labels`` replaces all labels; ``labels.<key>`` sets (or, with an empty value, removes) one.
    update_mask: list[str] = field(default_factory=list)


class NamespacesRPC:
    def __init__(self, store: NamespaceStore) -> None:
        self.store = store

    @typed_args(CreateArgs)
    async def create(self, call: Call, args: CreateArgs) -> dict[str, Any]:
        return {"namespace": (await self.store.create(args.name, args.labels)).to_wire()}

    @typed_args(NameArgs)
    async def get(self, call: Call, args: NameArgs) -> dict[str, Any]:
        return {"namespace": (await self.store.get(args.name)).to_wire()}

    @typed_args(ListArgs)
    async def list_namespaces(self, call: Call, args: ListArgs) -> dict[str, Any]:
        matcher = parse_filters(args.filters)
        wire = [n.to_wire() for n in await self.store.list_all()]
        return {"namespaces": [n for n in wire if matcher.match_mapping(n)]}

    @typed_args(UpdateArgs)
    async def update(self, call: Call, args: UpdateArgs) -> dict[str, Any]:
        return {"namespace": (await self.store.update(args.name, args.labels, args.update_mask)).to_wire()}

    @typed_args(NameArgs)
    async def delete(self, call: Call, args: NameArgs) -> dict[str, Any]:
        await self.store.delete(args.name)
        return {}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"namespaces.create": self.create, "namespaces.get": self.get,
                "namespaces.list": self.list_namespaces, "namespaces.update": self.update,
                "namespaces.delete": self.delete}


async def init_store(ic: InitContext) -> NamespaceStore:
    metadata: Metadata = ic.get_single(PluginType.METADATA)
    return metadata.namespaces


async def init_rpc(ic: InitContext) -> NamespacesRPC:
    return NamespacesRPC(ic.get_by_id(PluginType.SERVICE, "namespaces-service"))


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.SERVICE, id="namespaces-service", init=init_store,
                                   requires=(PluginType.METADATA,)))
    registry.register(Registration(type=PluginType.RPC, id="namespaces", init=init_rpc,
                                   requires=(PluginType.SERVICE,)))
