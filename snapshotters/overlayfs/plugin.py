"""``io.berth.snapshotter.v1.overlayfs``: the overlayfs snapshotter as a plugin.

It fails (status ``error``, with the reason) when its root has no ``d_type`` support or overlay
cannot be mounted there; it exports ``root``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.snapshotters.overlayfs.overlayfs import OverlaySnapshotter, default_platform


@dataclass(kw_only=True)
class Config:
    #: Where the snapshots live ("": the plugin's own root, ``<root>/io.berth.snapshotter.v1.overlayfs``).
    root_path: str = ""
    #: Options added to every overlay mount (not to bind mounts), e.g. ``["volatile"]``.
    mount_options: list[str] = field(default_factory=list)
    #: Remove a snapshot's files in Remove itself instead of at the next cleanup (after GC).
    sync_remove: bool = False
    #: Show each snapshot's upperdir as the label ``berth.io/snapshot/overlay.upperdir``.
    upperdir_label: bool = False


async def init(ic: InitContext) -> OverlaySnapshotter:
    config: Config = ic.config if ic.config is not None else Config()
    root = Path(config.root_path) if config.root_path else ic.root
    ic.meta.platforms.append(default_platform())
    ic.meta.exports["root"] = str(root)
    return await OverlaySnapshotter.open(root, mount_options=config.mount_options, sync_remove=config.sync_remove,
                                         upperdir_label=config.upperdir_label)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.SNAPSHOTTER, id="overlayfs", init=init, config=Config))
