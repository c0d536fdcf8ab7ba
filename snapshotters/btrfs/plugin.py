"""``io.berth.snapshotter.v1.btrfs``: containerd's btrfs snapshotter.

Skipped (status ``skip``, with the reason) when its root is not on a btrfs filesystem; an error
naming the missing module when the ``btrfsutil`` binding is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.snapshotters.btrfs.btrfs import BtrfsSnapshotter


@dataclass(kw_only=True)
class Config:
    #: Directory holding the snapshots and their metastore; it must be on btrfs ("" = the plugin's
    #: own directory under the daemon's root).
    root_path: str = ""


async def init(ic: InitContext) -> BtrfsSnapshotter:
    root = Path(ic.config.root_path) if ic.config.root_path else ic.root
    snapshotter = await BtrfsSnapshotter.open(root, log=ic.log)
    ic.meta.exports["root"] = str(root)
    ic.meta.exports["device"] = snapshotter.device
    return snapshotter


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.SNAPSHOTTER, id="btrfs", init=init, config=Config))
