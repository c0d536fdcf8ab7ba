"""``io.berth.rpc.v1.snapshots``: namespaced snapshots over RPC.

Every method takes ``snapshotter`` (a snapshotter plugin id; empty: the configured
``default_snapshotter``) and works in the call's namespace.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.core.errdefs import NotFound
from berth.core.metadata.snapshots import NamespacedSnapshotter
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl, plugin_ref
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler
from berth.core.snapshots.snapshotter import Info, Kind
from berth.plugins.metadata.plugin import Metadata


@dataclass(kw_only=True)
class Config:
    #: The snapshotter used when a call names none.
    default_snapshotter: str = plugin_ref(PluginType.SNAPSHOTTER, "overlayfs", doc="default snapshotter")


@dataclass(kw_only=True)
class CreateArgs:
    key: str
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    snapshotter: str = ""


@dataclass(kw_only=True)
class KeyArgs:
    key: str
    snapshotter: str = ""


@dataclass(kw_only=True)
class CommitArgs:
    name: str
    key: str
    labels: dict[str, str] = field(default_factory=dict)
    snapshotter: str = ""


@dataclass(kw_only=True)
class UpdateArgs:
    key: str
    labels: dict[str, str] = field(default_factory=dict)
    #: ``labels`` (or nothing) replaces every label; ``labels.<k>`` sets or removes one.
    update_mask: list[str] = field(default_factory=list)
    snapshotter: str = ""


@dataclass(kw_only=True)
class ListArgs:
    filters: list[str] = field(default_factory=list)
    snapshotter: str = ""


@dataclass(kw_only=True)
class SnapshotterArgs:
    snapshotter: str = ""


class SnapshotsRPC:
    def __init__(self, snapshotters: Mapping[str, NamespacedSnapshotter], default: str) -> None:
        self.snapshotters = snapshotters
        self.default = default

    def _pick(self, name: str) -> NamespacedSnapshotter:
        name = name or self.default
        try:
            return self.snapshotters[name]
        except KeyError:
            loaded = ", ".join(sorted(self.snapshotters)) or "none"
            raise NotFound(f"snapshotter {name!r} is not loaded (loaded: {loaded})") from None

    @typed_args(CreateArgs)
    async def prepare(self, call: Call, args: CreateArgs) -> dict[str, Any]:
        mounts = await self._pick(args.snapshotter).prepare(args.key, args.parent, args.labels)
        return {"mounts": [m.to_wire() for m in mounts]}

    @typed_args(CreateArgs)
    async def view(self, call: Call, args: CreateArgs) -> dict[str, Any]:
        mounts = await self._pick(args.snapshotter).view(args.key, args.parent, args.labels)
        return {"mounts": [m.to_wire() for m in mounts]}

    @typed_args(KeyArgs)
    async def mounts(self, call: Call, args: KeyArgs) -> dict[str, Any]:
        return {"mounts": [m.to_wire() for m in await self._pick(args.snapshotter).mounts(args.key)]}

    @typed_args(CommitArgs)
    async def commit(self, call: Call, args: CommitArgs) -> dict[str, Any]:
        await self._pick(args.snapshotter).commit(args.name, args.key, args.labels)
        return {}

    @typed_args(KeyArgs)
    async def remove(self, call: Call, args: KeyArgs) -> dict[str, Any]:
        await self._pick(args.snapshotter).remove(args.key)
        return {}

    @typed_args(KeyArgs)
    async def stat(self, call: Call, args: KeyArgs) -> dict[str, Any]:
        return {"info": (await self._pick(args.snapshotter).stat(args.key)).to_wire()}

    @typed_args(UpdateArgs)
    async def update(self, call: Call, args: UpdateArgs) -> dict[str, Any]:
        info = Info(name=args.key, kind=Kind.COMMITTED, labels=args.labels)
        return {"info": (await self._pick(args.snapshotter).update(info, args.update_mask)).to_wire()}

    @typed_args(ListArgs)
    async def list_snapshots(self, call: Call, args: ListArgs) -> dict[str, Any]:
        return {"infos": [info.to_wire() async for info in self._pick(args.snapshotter).walk(args.filters)]}

    @typed_args(KeyArgs)
    async def usage(self, call: Call, args: KeyArgs) -> dict[str, Any]:
        return (await self._pick(args.snapshotter).usage(args.key)).to_wire()

    @typed_args(SnapshotterArgs)
    async def cleanup(self, call: Call, args: SnapshotterArgs) -> dict[str, Any]:
        await self._pick(args.snapshotter).cleanup()
        return {}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"snapshots.prepare": self.prepare, "snapshots.view": self.view, "snapshots.mounts": self.mounts,
                "snapshots.commit": self.commit, "snapshots.remove": self.remove, "snapshots.stat": self.stat,
                "snapshots.update": self.update, "snapshots.list": self.list_snapshots,
                "snapshots.usage": self.usage, "snapshots.cleanup": self.cleanup}


async def init(ic: InitContext) -> SnapshotsRPC:
    metadata: Metadata = ic.get_single(PluginType.METADATA)
    ic.meta.exports["default_snapshotter"] = ic.config.default_snapshotter
    return SnapshotsRPC(metadata.snapshotters, ic.config.default_snapshotter)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.RPC, id="snapshots", init=init, config=Config,
                                   requires=(PluginType.METADATA, PluginType.SNAPSHOTTER)))
