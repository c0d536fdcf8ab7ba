"""``io.berth.rpc.v1.version``: ``version.get``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from berth.core.plugin import InitContext, PluginType, Registration, Registry, ServerInfo, hookimpl
from berth.core.rpc.server import Call, Handler, inline


class VersionService:
    def __init__(self, server: ServerInfo) -> None:
        self.server = server

    @inline
    async def get(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        """-> ``{version, revision}``"""
        return {"version": self.server.version, "revision": self.server.revision}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"version.get": self.get}


async def init(ic: InitContext) -> VersionService:
    return VersionService(ic.server)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.RPC, id="version", init=init))
