"""``io.berth.event.v1.exchange``: the daemon's events exchange."""

from __future__ import annotations

from dataclasses import dataclass

from berth.core.events import DEFAULT_SUBSCRIBER_BUFFER, Exchange
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl


@dataclass(kw_only=True)
class Config:
    #: Events queued per subscriber before newer ones are dropped for it (it is told how many).
    subscriber_buffer: int = DEFAULT_SUBSCRIBER_BUFFER

    def __post_init__(self) -> None:
        if self.subscriber_buffer < 1:
            raise ValueError("subscriber_buffer must be at least 1")


async def init(ic: InitContext) -> Exchange:
    ic.meta.exports["subscriber_buffer"] = str(ic.config.subscriber_buffer)
    return Exchange(subscriber_buffer=ic.config.subscriber_buffer)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.EVENT, id="exchange", init=init, config=Config))
