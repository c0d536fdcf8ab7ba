"""``io.berth.rpc.v1.introspection``: what plugins loaded, and which daemon this is."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.core.errdefs import BerthError, Unknown, error_to_wire
from berth.core.filters import parse_filters
from berth.core.plugin import (
    InitContext,
    LoadedPlugin,
    PluginSet,
    PluginStatus,
    PluginType,
    Registration,
    Registry,
    ServerInfo,
    hookimpl,
)
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler, inline


@dataclass(kw_only=True)
class PluginsArgs:
    #: containerd filter syntax over the fields type, id, uri, status, requires, exports.*.
    filters: list[str] = field(default_factory=list)


def plugin_to_wire(plugin: LoadedPlugin) -> dict[str, Any]:
    registration = plugin.registration
    error = None
    if plugin.error is not None:
        exc = plugin.error
        error = error_to_wire(exc if isinstance(exc, BerthError) else Unknown(plugin.error_message))
        error["message"] = plugin.error_message
    return {
        "type": registration.type,
        "id": registration.id,
        "uri": registration.uri,
        "requires": list(registration.requires),
        "status": str(plugin.status),
        "error": error,
        "exports": dict(plugin.meta.exports),
        "capabilities": list(plugin.meta.capabilities),
        "platforms": list(plugin.meta.platforms),
    }


class IntrospectionService:
    def __init__(self, plugins: PluginSet, server: ServerInfo) -> None:
        self.plugins = plugins
        self.server = server

    @inline
    @typed_args(PluginsArgs)
    async def list_plugins(self, call: Call, args: PluginsArgs) -> dict[str, Any]:
        """-> ``{plugins: [...]}`` in init order, then modules that failed to load (type ``module``)."""
        matcher = parse_filters(args.filters)
        entries = [plugin_to_wire(p) for p in self.plugins.all()]
        for name, message in self.plugins.load_errors:
            entries.append({"type": "module", "id": name, "uri": f"module.{name}", "requires": [],
                            "status": str(PluginStatus.ERROR), "error": {"code": "unknown", "message": message},
                            "exports": {}, "capabilities": [], "platforms": []})
        return {"plugins": [e for e in entries if matcher.match_mapping(e)]}

    @inline
    async def server_info(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        """-> ``{uuid, pid, started_at, uptime, version, revision}``"""
        return {
            "uuid": self.server.uuid,
            "pid": self.server.pid,
            "started_at": self.server.started_at,
            "uptime": time.time() - self.server.started_at,
            "version": self.server.version,
            "revision": self.server.revision,
        }

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"introspection.plugins": self.list_plugins, "introspection.server": self.server_info}


async def init(ic: InitContext) -> IntrospectionService:
    return IntrospectionService(ic.plugins, ic.server)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.RPC, id="introspection", init=init))
