"""``io.berth.content.v1.local``: the local content store, the backend the metadata store wraps."""

from __future__ import annotations

import trio

from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.plugins.content.local.store import LocalStore


async def init(ic: InitContext) -> LocalStore:
    store = await trio.to_thread.run_sync(LocalStore, ic.root)
    ic.meta.exports["root"] = str(ic.root)
    return store


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.CONTENT, id="local", init=init))
