"""Containers: ``io.berth.service.v1.containers-service`` (the metadata database's container store) and
its RPC wrapper ``io.berth.rpc.v1.containers``, in the call's namespace."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from berth.core.errdefs import BerthError, FailedPrecondition, NotFound
from berth.core.events import Exchange
from berth.core.metadata.containers import Container, ContainerStore, Runtime
from berth.core.metadata.snapshots import NamespacedSnapshotter
from berth.core.namespaces import namespace_required
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler
from berth.plugins.metadata.plugin import Metadata

log = structlog.get_logger("berth.containers")


@dataclass(kw_only=True)
class RuntimeArgs:
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class ContainerArgs:
    id: str
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)
    spec: dict[str, Any] = field(default_factory=dict)
    snapshotter: str = ""
    snapshot_key: str = ""
    extensions: dict[str, Any] = field(default_factory=dict)

    def container(self) -> Container:
        return Container(id=self.id, labels=self.labels, image=self.image,
                         runtime=Runtime(name=self.runtime.name, options=self.runtime.options), spec=self.spec,
                         snapshotter=self.snapshotter, snapshot_key=self.snapshot_key, extensions=self.extensions)


@dataclass(kw_only=True)
class CreateArgs:
    container: ContainerArgs


@dataclass(kw_only=True)
class UpdateArgs:
    container: ContainerArgs
    #: Field paths to change (see ``ContainerStore.update``); empty: a full replace.
    update_mask: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class IdArgs:
    id: str


@dataclass(kw_only=True)
class DeleteArgs:
    id: str
    #: Also remove the container's snapshot (its disk space goes at the next garbage collection).
    snapshot_cleanup: bool = False


@dataclass(kw_only=True)
class ListArgs:
    filters: list[str] = field(default_factory=list)


class TaskLookup(Protocol):
    """What deleting a container asks the tasks service (when one is loaded)."""

    def has_task(self, namespace: str, container_id: str) -> bool: ...

    async def forget_container(self, namespace: str, container_id: str) -> None: ...


async def delete_container(store: ContainerStore, snapshotters: Mapping[str, NamespacedSnapshotter],
                           container_id: str, *, snapshot_cleanup: bool, tasks: TaskLookup | None) -> None:
    """Delete a container of the current namespace (refused while it has a task, as containerd's client
    does), its directory of logs and ``/etc`` files, and with ``snapshot_cleanup`` its snapshot.

    Raises: NotFound; FailedPrecondition (it has a task).
    """
    namespace = namespace_required()
    if tasks is not None and tasks.has_task(namespace, container_id):
        raise FailedPrecondition(f"container {container_id} has a task: delete the task first")
    container = await store.delete(container_id)
    if tasks is not None:
        await tasks.forget_container(namespace, container_id)
    if snapshot_cleanup and container.snapshot_key:
        snapshotter = snapshotters.get(container.snapshotter)
        if snapshotter is None:
            log.warning("container_snapshot_not_removed", id=container.id, snapshotter=container.snapshotter,
                        reason="snapshotter not loaded")
        else:
            with contextlib.suppress(NotFound):  # already gone: nothing to clean
                await snapshotter.remove(container.snapshot_key)


class ContainersRPC:
    def __init__(self, store: ContainerStore, snapshotters: Mapping[str, NamespacedSnapshotter],
                 tasks: TaskLookup | None = None) -> None:
        self.store = store
        self.snapshotters = snapshotters
        self.tasks = tasks

    @typed_args(IdArgs)
    async def get(self, call: Call, args: IdArgs) -> dict[str, Any]:
        return {"container": (await self.store.get(args.id)).to_wire()}

    @typed_args(ListArgs)
    async def list_containers(self, call: Call, args: ListArgs) -> dict[str, Any]:
        return {"containers": [c.to_wire() for c in await self.store.list_all(args.filters)]}

    @typed_args(CreateArgs)
    async def create(self, call: Call, args: CreateArgs) -> dict[str, Any]:
        return {"container": (await self.store.create(args.container.container())).to_wire()}

    @typed_args(UpdateArgs)
    async def update(self, call: Call, args: UpdateArgs) -> dict[str, Any]:
        return {"container": (await self.store.update(args.container.container(), args.update_mask)).to_wire()}

    @typed_args(DeleteArgs)
    async def delete(self, call: Call, args: DeleteArgs) -> dict[str, Any]:
        await delete_container(self.store, self.snapshotters, args.id, snapshot_cleanup=args.snapshot_cleanup,
                               tasks=self.tasks)
        return {}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"containers.get": self.get, "containers.list": self.list_containers,
                "containers.create": self.create, "containers.update": self.update,
                "containers.delete": self.delete}


async def init_store(ic: InitContext) -> ContainerStore:
    metadata: Metadata = ic.get_single(PluginType.METADATA)
    exchange: Exchange = ic.get_single(PluginType.EVENT)
    return ContainerStore(metadata.db, exchange.publish, on_delete=metadata.notify_deletion)


async def init_rpc(ic: InitContext) -> ContainersRPC:
    metadata: Metadata = ic.get_single(PluginType.METADATA)
    tasks: TaskLookup | None = None
    with contextlib.suppress(BerthError):  # no tasks service loaded: no task can exist
        tasks = ic.get_by_id(PluginType.SERVICE, "tasks-service")
    return ContainersRPC(ic.get_by_id(PluginType.SERVICE, "containers-service"), metadata.snapshotters, tasks)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.SERVICE, id="containers-service", init=init_store,
                                   requires=(PluginType.METADATA, PluginType.EVENT)))
    registry.register(Registration(type=PluginType.RPC, id="containers", init=init_rpc,
                                   requires=(PluginType.SERVICE, PluginType.METADATA)))
