"""``io.berth.rpc.v1.events``: publish, forward and subscribe over RPC."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.core.events import Envelope, Exchange
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler, inline, streaming


@dataclass(kw_only=True)
class PublishArgs:
    topic: str
    event: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class ForwardArgs:
    namespace: str
    topic: str
    timestamp: float
    event: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class SubscribeArgs:
    filters: list[str] = field(default_factory=list)


class EventsService:
    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    @inline
    @typed_args(PublishArgs)
    async def publish(self, call: Call, args: PublishArgs) -> dict[str, Any]:
        """Publish in the call's namespace -> ``{timestamp}``."""
        envelope = self.exchange.publish(call.namespace, args.topic, args.event)
        return {"timestamp": envelope.timestamp}

    @inline
    @typed_args(ForwardArgs)
    async def forward(self, call: Call, args: ForwardArgs) -> dict[str, Any]:
        """Re-publish an envelope stamped elsewhere, keeping its namespace and timestamp -> ``{}``."""
        self.exchange.forward(Envelope(args.timestamp, args.namespace, args.topic, args.event))
        return {}

    @streaming
    @typed_args(SubscribeArgs)
    async def subscribe(self, call: Call, args: SubscribeArgs) -> dict[str, Any]:
        """Stream envelopes matching any filter until the client cancels; never returns by itself."""
        async with self.exchange.subscribe(args.filters) as subscription:
            async for envelope in subscription:
                await call.send(envelope.to_wire())
        return {}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"events.publish": self.publish, "events.forward": self.forward,
                "events.subscribe": self.subscribe}


async def init(ic: InitContext) -> EventsService:
    return EventsService(ic.get_single(PluginType.EVENT))


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.RPC, id="events", init=init, requires=(PluginType.EVENT,)))
