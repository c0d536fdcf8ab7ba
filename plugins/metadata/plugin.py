"""``io.berth.metadata.v1.sqlite``: the metadata database, the namespaced stores over the backends,
and the garbage collector."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from berth.core.content import Store
from berth.core.events import Exchange
from berth.core.metadata.content import NamespacedContentStore
from berth.core.metadata.db import MetadataDB
from berth.core.metadata.gc import GarbageCollector
from berth.core.metadata.namespaces import NamespaceStore
from berth.core.metadata.snapshots import NamespacedSnapshotter
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl, plugin_ref


@dataclass(kw_only=True)
class Config:
    #: ``shared``: a blob already in the store is usable in any namespace once a writer there names
    #: it; ``isolated``: its bytes must be written again (unless its namespace is labelled
    #: ``berth.io/namespace.shareable=true``).
    content_sharing_policy: Literal["shared", "isolated"] = "shared"
    #: Skip fsync of the database (faster; a crash may lose the last transactions, never corrupts).
    no_sync: bool = False
    #: The content store plugin (by id) whose blobs this database records.
    content_store: str = plugin_ref(PluginType.CONTENT, "local", doc="content backend")


class Metadata:
    """What the plugin provides: the database and every namespaced store on it."""

    def __init__(self, db: MetadataDB, content: NamespacedContentStore, namespaces: NamespaceStore,
                 gc: GarbageCollector, snapshotters: dict[str, NamespacedSnapshotter]) -> None:
        self.db = db
        self.content = content
        #: Every loaded snapshotter, namespaced, by its plugin id.
        self.snapshotters = snapshotters
        self.namespaces = namespaces
        self.gc = gc
        #: Called after every deletion of a record (the GC scheduler listens).
        self.deletion_listeners: list[Callable[[], None]] = []

    def notify_deletion(self) -> None:
        """A record was deleted: tell the listeners (the GC scheduler schedules a collection)."""
        for listener in self.deletion_listeners:
            listener()

    async def aclose(self) -> None:
        await self.db.aclose()


async def init(ic: InitContext) -> Metadata:
    config: Config = ic.config
    exchange: Exchange = ic.get_single(PluginType.EVENT)
    backend: Store = ic.get_ref("content_store")
    path = ic.root / "meta.db"
    db = await MetadataDB.open(path, no_sync=config.no_sync)
    metadata: Metadata
    content = NamespacedContentStore(db, backend, policy=config.content_sharing_policy, publish=exchange.publish,
                                     on_delete=lambda: metadata.notify_deletion())
    snapshotters = {name: NamespacedSnapshotter(db, name, backend, publish=exchange.publish,
                                                on_delete=lambda: metadata.notify_deletion())
                    for name, backend in ic.get_by_type(PluginType.SNAPSHOTTER).items()}
    metadata = Metadata(db, content, NamespaceStore(db, exchange.publish),
                        GarbageCollector(db, content, exchange.publish, snapshotters), snapshotters)
    ic.meta.exports.update({"path": str(path), "policy": config.content_sharing_policy})
    return metadata


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.METADATA, id="sqlite", init=init, config=Config,
                                   requires=(PluginType.CONTENT, PluginType.SNAPSHOTTER, PluginType.EVENT)))
