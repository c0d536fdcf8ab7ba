"""``io.berth.lease.v1.manager``: leases on the metadata database; a synchronous delete runs GC."""

from __future__ import annotations

from berth.core.metadata.leases import LeaseManager
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.plugins.gc.scheduler import Scheduler
from berth.plugins.metadata.plugin import Metadata


async def init(ic: InitContext) -> LeaseManager:
    metadata: Metadata = ic.get_single(PluginType.METADATA)
    scheduler: Scheduler = ic.get_single(PluginType.GC)
    return LeaseManager(metadata.db, collect=scheduler.collect_now, on_delete=metadata.notify_deletion)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.LEASE, id="manager", init=init,
                                   requires=(PluginType.METADATA, PluginType.GC)))
