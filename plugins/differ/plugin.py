"""``io.berth.differ.v1.walking``: applies layers into snapshots and computes layers from them.

It reads and writes blobs through the metadata plugin's (namespaced) content store; temporary mount
points for snapshots that must be mounted are made under the plugin's state directory.
"""

from __future__ import annotations

from dataclasses import dataclass

from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.plugins.differ.walking import WalkingDiffer
from berth.plugins.metadata.plugin import Metadata


@dataclass(kw_only=True)
class Config:
    #: Let layers create character and block devices (refused by default).
    allow_devices: bool = False


async def init(ic: InitContext) -> WalkingDiffer:
    metadata: Metadata = ic.get_single(PluginType.METADATA)
    config: Config = ic.config if ic.config is not None else Config()
    return WalkingDiffer(metadata.content, allow_devices=config.allow_devices, scratch=ic.state)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.DIFFER, id="walking", init=init, config=Config,
                                   requires=(PluginType.METADATA,)))
