"""``io.berth.snapshotter.v1.native``: the copying snapshotter as a plugin; it exports ``root``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.snapshotters.native.native import NativeSnapshotter
from berth.snapshotters.overlayfs.overlayfs import default_platform


@dataclass(kw_only=True)
class Config:
    #: Where the snapshots live ("": the plugin's own root, ``<root>/io.berth.snapshotter.v1.native``).
    root_path: str = ""


async def init(ic: InitContext) -> NativeSnapshotter:
    config: Config = ic.config if ic.config is not None else Config()
    root = Path(config.root_path) if config.root_path else ic.root
    ic.meta.platforms.append(default_platform())
    ic.meta.exports["root"] = str(root)
    return await NativeSnapshotter.open(root)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.SNAPSHOTTER, id="native", init=init, config=Config))
