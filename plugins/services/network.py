"""Networks over RPC: ``io.berth.rpc.v1.networks`` (``network.create|remove|inspect|list|attachment``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.core.network import Network
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler


@dataclass(kw_only=True)
class CreateArgs:
    name: str
    subnet: str = ""
    gateway: str = ""
    mtu: int = 0
    nat: bool = False
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class NameArgs:
    name: str


@dataclass(kw_only=True)
class AttachmentArgs:
    container_id: str


@dataclass(kw_only=True)
class NoArgs:
    pass


class NetworksRPC:
    def __init__(self, network: Network) -> None:
        self.network = network

    @typed_args(CreateArgs)
    async def create(self, call: Call, args: CreateArgs) -> dict[str, Any]:
        info = await self.network.create(args.name, subnet=args.subnet, gateway=args.gateway, mtu=args.mtu,
                                         nat=args.nat, labels=args.labels)
        return {"network": info.to_wire()}

    @typed_args(NameArgs)
    async def remove(self, call: Call, args: NameArgs) -> dict[str, Any]:
        await self.network.remove(args.name)
        return {}

    @typed_args(NameArgs)
    async def inspect(self, call: Call, args: NameArgs) -> dict[str, Any]:
        return {"network": (await self.network.inspect(args.name)).to_wire()}

    @typed_args(NoArgs)
    async def list_networks(self, call: Call, args: NoArgs) -> dict[str, Any]:
        return {"networks": [info.to_wire() for info in await self.network.list_networks()]}

    @typed_args(AttachmentArgs)
    async def attachment(self, call: Call, args: AttachmentArgs) -> dict[str, Any]:
        """What a container of the call's namespace got (``null`` when it has no network)."""
        found = await self.network.attachment(call.namespace, args.container_id)
        return {"attachment": None if found is None else found.to_wire()}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"network.create": self.create, "network.remove": self.remove, "network.inspect": self.inspect,
                "network.list": self.list_networks, "network.attachment": self.attachment}


async def init(ic: InitContext) -> NetworksRPC:
    return NetworksRPC(ic.get_single(PluginType.NETWORK))


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.RPC, id="networks", init=init, requires=(PluginType.NETWORK,)))
