"""Tasks: ``io.berth.service.v1.tasks-service`` (running containers through shims) and its RPC wrapper
``io.berth.rpc.v1.tasks`` (``tasks.*``, plus ``containers.new``, which makes a container from an image).

A task is a container's running process tree. The service writes the bundle
(``<state>/<ns>/<id>/config.json``, plus ``task.json`` saying which shim and runtime hold it), asks
the container's group shim to create it, and from then on talks to that shim. Shims outlive the
daemon: at start-up the service reconnects to every shim that has tasks (in parallel, bounded by
``shim_load_timeout``). A task whose shim is gone is reported stopped with the exit status the shim
recorded (255 if it recorded none), its leftover processes are killed through the runtime, and
``delete`` cleans it up.

Output: a task's stdout and stderr go to ``<root>/<ns>/<id>/log`` (unless ``log`` is off), to
FIFOs, and to every attached caller (``tasks.attach``); ``tasks.logs`` reads the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pluggy
import structlog
import trio

from berth.core.directories import make_spread_directory
from berth.core.errdefs import (
    AlreadyExists,
    BerthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from berth.core.events import Exchange
from berth.core.identifiers import validate_identifier
from berth.core.metadata.containers import Container, ContainerStore, Runtime
from berth.core.metadata.images import ImageStore
from berth.core.metadata.leases import LeaseManager
from berth.core.namespaces import namespace_required, with_lease
from berth.core.network import Network, NetworkRequest, PortMapping
from berth.core.oci import Descriptor
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler, streaming
from berth.core.snapshots.mount import mount_all, unmount_all
from berth.core.snapshots.snapshotter import Mount
from berth.plugins.gc.scheduler import Scheduler
from berth.plugins.images.tree import ImageConfig, image_config
from berth.plugins.metadata.plugin import Metadata
from berth.plugins.services.containers import delete_container
from berth.runtimes.oci import (
    SpecOptions,
    UserFiles,
    apply_spec_adjustments,
    build_spec,
    generate_spec,
    parse_mount,
    read_user_files,
)
from berth.runtimes.runc.command import RuntimeBinary
from berth.runtimes.shim.manager import Shim, ShimManager
from berth.runtimes.shim.service import read_exit_record

log = structlog.get_logger("berth.tasks")

#: A container label naming the shim that supervises it (containers with the same value share one).
SHIM_GROUP_LABEL = "berth.io/shim.group"
#: The container extension holding its :class:`NetworkRequest` (named networks only).
NETWORK_EXTENSION = "berth.io/network"
#: The exit status of a task whose shim died without recording one (containerd reports 255 too).
UNKNOWN_EXIT = 255
_LOG_CHUNK = 64 * 1024
#: Images whose ``/etc/passwd`` and ``/etc/group`` the daemon keeps in memory to resolve the user of their
#: next containers without mounting a rootfs.
USER_FILES_KEPT = 64
#: Images whose resolved config (manifest, config document, top chain ID) the daemon keeps in memory.
IMAGE_CONFIGS_KEPT = 64

K = TypeVar("K")
V = TypeVar("V")


@dataclass(kw_only=True)
class Config:
    #: The runtime of containers that name none (a runtime plugin's id, e.g. ``runc`` or ``builtin``).
    default_runtime: str = "runc"
    #: The snapshotter ``containers.new`` uses when the call names none.
    default_snapshotter: str = "overlayfs"
    #: ``namespace``: one shim supervises all the containers of a namespace (the least memory);
    #: ``container``: one shim each (containerd's default). The label ``berth.io/shim.group`` overrides.
    shim_grouping: str = "namespace"
    #: Where shims' sockets go (unix socket paths must be short).
    shim_socket_dir: str = "/run/berth/s"
    #: Seconds to reconnect to the running shims at start-up.
    shim_load_timeout: float = 10.0
    #: Seconds a shim with no task left waits for a new one before it exits (starting a shim costs a
    #: Python start-up; a warm one makes the next ``create`` of its group fast).
    shim_idle_timeout: float = 60.0


@dataclass(kw_only=True)
class TaskRecord:
    """What the daemon keeps about a task (``<bundle>/task.json``): where it runs and how."""

    namespace: str
    id: str
    group: str
    runtime: RuntimeBinary
    bundle: Path
    log: str = ""
    #: Set once the task's shim is gone: ``{"pid", "exit_status", "exited_at"}``.
    lost: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps({"namespace": self.namespace, "id": self.id, "group": self.group,
                           "runtime": self.runtime.to_wire(), "log": self.log})

    @classmethod
    def load(cls, path: Path) -> TaskRecord:
        raw = json.loads(path.read_text())
        return cls(namespace=raw["namespace"], id=raw["id"], group=raw["group"],
                   runtime=RuntimeBinary.from_wire(raw["runtime"]), bundle=path.parent, log=raw.get("log", ""))


@dataclass(kw_only=True)
class StdioArgs:
    stdin: bool = False
    terminal: bool = False
    #: Keep the output in the container's log file (``berth logs``).
    log: bool = True
    stdin_fifo: str = ""
    stdout_fifo: str = ""
    stderr_fifo: str = ""
    #: Keep the output written before the first attach for that attach (with ``start`` on create).
    hold: bool = False


@dataclass(kw_only=True)
class RunOptions:
    """What ``containers.new`` accepts on top of the image's config (see :class:`SpecOptions`)."""

    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    cwd: str = ""
    user: str = ""
    #: ``type=bind,src=...,dst=...,options=rbind:ro`` strings or OCI mount objects.
    mounts: list[Any] = field(default_factory=list)
    read_only: bool = False
    memory_limit: int = 0
    cpus: float = 0.0
    pids_limit: int = 0
    privileged: bool = False
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    seccomp: bool = False
    annotations: dict[str, str] = field(default_factory=dict)
    hostname: str = ""
    tty: bool = False
    #: Namespace paths to join, by type (``network``: ``/proc/<pid>/ns/net`` or a bind-mounted netns).
    namespace_paths: dict[str, str] = field(default_factory=dict)
    #: ``none`` (the default: a network namespace with only ``lo``), ``host``, ``container:<id>`` (join
    #: that container's), or the name of a network of the network plugin (``bridge``).
    network: str = ""
    #: Published ports, ``[HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp]`` (a named network only).
    ports: list[str] = field(default_factory=list)

    def spec_options(self) -> SpecOptions:
        mounts = [parse_mount(m) if isinstance(m, str) else dict(m) for m in self.mounts]
        return SpecOptions(args=self.args or None, env=self.env, cwd=self.cwd, user=self.user, mounts=mounts,
                           read_only=self.read_only, memory_limit=self.memory_limit or None,
                           cpus=self.cpus or None, pids_limit=self.pids_limit or None, privileged=self.privileged,
                           cap_add=self.cap_add, cap_drop=self.cap_drop, seccomp=self.seccomp,
                           annotations=self.annotations, hostname=self.hostname, tty=self.tty,
                           namespace_paths=self.namespace_paths)


class TaskService:
    """Tasks of every namespace; methods act in the caller's namespace (the RPC call's)."""

    def __init__(self, *, config: Config, metadata: Metadata, containers: ContainerStore, images: ImageStore,
                 leases: LeaseManager, exchange: Exchange, runtimes: Mapping[str, RuntimeBinary], state: Path,
                 root: Path, nursery: trio.Nursery, hooks: pluggy.PluginManager | None,
                 network: Network | None = None) -> None:
        self.config = config
        self.network = network
        self.metadata = metadata
        self.containers = containers
        self.images = images
        self.leases = leases
        self.exchange = exchange
        self.runtimes = dict(runtimes)
        self.state = state
        self.root = root
        self.hooks = hooks
        self.records: dict[tuple[str, str], TaskRecord] = {}
        self.shims = ShimManager(directory=state / "shims", socket_dir=Path(config.shim_socket_dir),
                                 exchange=exchange, nursery=nursery, on_gone=self._shim_gone)
        self._create_locks: dict[tuple[str, str], trio.Lock] = {}
        #: ``(namespace, digest, media type)`` of an image's target → what it resolves to.
        self._image_configs: dict[tuple[str, str, str], ImageConfig] = {}
        #: ``(namespace, snapshotter, chain id, its creation time)`` → the image's user files, kept.
        self._user_files: dict[tuple[str, str, str, float], UserFiles] = {}
        self._nursery = nursery
        #: Per group: creates in progress, and the pending idle shutdown's cancel scope.
        self._creating: dict[str, int] = {}
        self._idle: dict[str, trio.CancelScope] = {}
        #: Groups whose shim connection dropped and is being dealt with (set when done).
        self._recovering: dict[str, trio.Event] = {}
        #: Namespaces whose per-container parent directories exist and spread (this daemon run).
        self._namespace_dirs: set[str] = set()

    # ------------------------------------------------------------------ start-up and shutdown

    async def load(self) -> None:
        """Find the tasks of a previous run: reconnect to their shims, in parallel, each within
        ``shim_load_timeout``; report those whose shim is gone as stopped. Scratch mounts that a crash in
        ``containers.new`` left are removed, and the images' user files a previous run kept."""
        await trio.to_thread.run_sync(self._remove_scratch_mounts)
        records = await trio.to_thread.run_sync(self._read_records)
        groups = sorted({r.group for r in records} | set(self.shims.existing_groups()))
        live: dict[str, set[tuple[str, str]]] = {}

        async def reconnect(group: str) -> None:
            with trio.move_on_after(self.config.shim_load_timeout):
                try:
                    shim = await self.shims.connect(group)
                    listed = await shim.call("list", {}, namespace="default")
                    live[group] = {(t["namespace"], t["id"]) for t in listed["tasks"]}
                except BerthError as err:
                    log.warning("shim_not_reconnected", group=group, error=str(err))

        async with trio.open_nursery() as nursery:
            for group in groups:
                nursery.start_soon(reconnect, group)
        for record in records:
            self.records[(record.namespace, record.id)] = record
            if (record.namespace, record.id) not in live.get(record.group, set()):
                await self._mark_lost(record)
        for group in groups:
            if group not in live:
                await self.shims.kill(group)  # a shim that does not answer is of no use to anyone
            elif not live[group]:
                self._release_group(group)
        if self.network is not None:
            removed = await self.network.reconcile(self.records.keys())
            if removed:
                log.info("network_reconciled", removed=list(removed))
        log.info("tasks_loaded", tasks=len(records), shims=len(live),
                 lost=sum(1 for r in records if r.lost is not None))

    def _remove_scratch_mounts(self) -> None:
        for scratch in sorted((self.state / ".spec").glob("*")):
            try:
                unmount_all(scratch)
                scratch.rmdir()
            except OSError as err:
                log.warning("scratch_mount_not_removed", path=str(scratch), error=str(err))

    def _read_records(self) -> list[TaskRecord]:
        records = []
        for path in sorted(self.state.glob("*/*/task.json")):
            try:
                records.append(TaskRecord.load(path))
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("task_record_unreadable", path=str(path), error=str(err))
        return records

    async def aclose(self) -> None:
        """Let go of the shims: those with tasks keep running; idle ones are asked to exit."""
        for group in list(self.shims.shims):
            if group not in self._creating and not any(r.group == group for r in self.records.values()):
                with trio.move_on_after(2):
                    await self.shims.shutdown(group)
        self.shims.close()

    # ------------------------------------------------------------------ lookups

    def _runtime(self, name: str) -> RuntimeBinary:
        short = name.removeprefix(f"{PluginType.RUNTIME}.") or self.config.default_runtime
        try:
            return self.runtimes[short]
        except KeyError:
            loaded = ", ".join(sorted(self.runtimes)) or "none"
            raise NotFound(f"runtime {name or short!r} is not loaded (loaded: {loaded})") from None

    def _record(self, container_id: str) -> TaskRecord:
        namespace = namespace_required()
        try:
            return self.records[(namespace, container_id)]
        except KeyError:
            raise NotFound(f"no task for container {container_id} in namespace {namespace}") from None

    async def _shim(self, record: TaskRecord) -> Shim:
        if record.lost is not None:
            raise FailedPrecondition(f"task {record.id} has stopped (its shim is gone); delete it")
        return await self.shims.get(record.group)

    async def _call(self, container_id: str, method: str, args: dict[str, Any]) -> Any:
        """Call the task's shim. A connection lost on the way is waited out: the call is made again on
        the reconnected shim, or fails as the task's state then says (FailedPrecondition: stopped)."""
        record = self._record(container_id)
        for attempt in (1, 2):
            shim = await self._shim(record)
            try:
                return await shim.call(method, {"id": container_id, **args}, namespace=record.namespace)
            except Unavailable:
                if attempt == 2:
                    raise
                await self._settled(record, shim)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _settled(self, record: TaskRecord, shim: Shim) -> None:
        """Wait (10 s at most) until a shim whose connection dropped is connected again or given up."""
        with trio.move_on_after(10):
            await shim.gone.wait()
            await trio.lowlevel.checkpoint()  # the manager calls _shim_gone right after setting `gone`
            recovering = self._recovering.get(record.group)
            if recovering is not None:
                await recovering.wait()

    def has_task(self, namespace: str, container_id: str) -> bool:
        return (namespace, container_id) in self.records

    async def _make_namespace_dirs(self, namespace: str) -> None:
        """Create, once per namespace and daemon run, the directories holding one directory per container
        of ``namespace``: container directories, bundles and each runtime's state. They are marked
        with ``FS_TOPDIR_FL`` (:mod:`berth.core.directories`: container churn must not slow inode
        allocation down). A directory removed while the daemon runs is made again by whoever needs it,
        without the mark, until the next run. Raises: OSError when one cannot be made."""
        if namespace in self._namespace_dirs:
            return

        def make() -> None:
            make_spread_directory(self.root / namespace)
            make_spread_directory(self.state / namespace)
            for runtime in self.runtimes.values():
                Path(runtime.root).mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as runc makes it
                make_spread_directory(Path(runtime.root) / namespace, 0o700)

        await trio.to_thread.run_sync(make)
        self._namespace_dirs.add(namespace)

    def container_dir(self, namespace: str, container_id: str) -> Path:
        """The container's persistent directory: its log, and its ``hostname``, ``hosts`` and ``resolv.conf``
        (bind-mounted on ``/etc``; containers made by earlier versions have them in an ``etc`` subdirectory)."""
        return self.root / namespace / container_id

    # ------------------------------------------------------------------ containers

    async def new_container(self, container_id: str, image_name: str, *, options: RunOptions,
                            snapshotter: str = "", runtime: str = "", labels: Mapping[str, str] | None = None,
                            task: StdioArgs | None = None, start: bool = False) -> tuple[Container, dict[str, Any]]:
        """Make a container from an image: a snapshot prepared on the image's top layer (key: the
        container id) and the spec generated from the image's config and ``options``. With ``task``
        (its stdio), create its task too, as :meth:`create` does (``start``: started as well); if that
        fails, the container is removed again. Returns the container and the task's ``{"pid"}`` (``{}``
        without ``task``).

        Raises: NotFound (image, snapshotter, runtime, user); AlreadyExists; FailedPrecondition when
        the image is not unpacked in the snapshotter; InvalidArgument for bad options; with ``task``,
        what :meth:`create` raises.
        """
        container, mounts = await self._new_container(container_id, image_name, options=options,
                                                       snapshotter=snapshotter, runtime=runtime, labels=labels)
        if task is None:
            return container, {}
        try:
            return container, await self.create(container_id, task, start=start, container=container, rootfs=mounts)
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(BerthError):
                await self.remove_container(container_id)
            raise

    async def _new_container(self, container_id: str, image_name: str, *, options: RunOptions, snapshotter: str,
                             runtime: str, labels: Mapping[str, str] | None) -> tuple[Container, list[Mount]]:
        namespace = namespace_required()
        validate_identifier(container_id, "container id")
        runtime_name = self._runtime(runtime).name
        snapshotter_name = snapshotter or self.config.default_snapshotter
        snapshots = self.metadata.snapshotters.get(snapshotter_name)
        if snapshots is None:
            raise NotFound(f"snapshotter {snapshotter_name!r} is not loaded")
        image = await self.images.get(image_name)
        resolved = await self._image_config(namespace, image.target)
        try:
            top = await snapshots.stat(resolved.chain_id)
        except NotFound:
            raise FailedPrecondition(f"image {image_name} is not unpacked in snapshotter {snapshotter_name} "
                                     f"(pull or import it with --snapshotter {snapshotter_name})") from None
        with contextlib.suppress(NotFound):
            await self.containers.get(container_id)
            raise AlreadyExists(f"container {container_id} already exists in namespace {namespace}")
        await self._make_namespace_dirs(namespace)
        spec_options = options.spec_options()
        spec_options.etc_dir = self.container_dir(namespace, container_id)
        request = await self._network_request(namespace, container_id, options, spec_options)
        extensions = {NETWORK_EXTENSION: request.to_wire()} if request is not None else {}

        def record(spec: dict[str, Any]) -> Container:
            if options.network == "host":
                spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
            return Container(id=container_id, runtime=Runtime(name=runtime_name), labels=dict(labels or {}),
                             image=image.name, spec=spec, snapshotter=snapshotter_name, snapshot_key=container_id,
                             extensions=extensions)

        user_key = (namespace, snapshotter_name, resolved.chain_id, top.created_at)
        user_files = self._user_files.get(user_key)
        if user_files is not None:
            # The image's user files are kept: the spec needs no rootfs, so the container is recorded first
            # and its snapshot prepared after, held by it from the start (no lease to make and delete).
            container: Container | None = None
            try:
                spec = await generate_spec(container_id, resolved.config, spec_options, namespace=namespace,
                                           rootfs=user_files)
                container = await self.containers.create(record(spec))
                return container, await snapshots.prepare(container_id, resolved.chain_id)
            except BaseException:
                with trio.CancelScope(shield=True):
                    if container is not None:
                        with contextlib.suppress(BerthError):
                            await self.containers.delete(container_id)
                    await self.forget_container(namespace, container_id)
                raise
        lease_id = f"new-container-{uuid.uuid4().hex[:16]}"
        await self.leases.create(lease_id, {"berth.io/container": container_id}, expires_in=3600)
        prepared = False
        try:
            with with_lease(lease_id):
                mounts = await snapshots.prepare(container_id, resolved.chain_id)
                prepared = True
                spec, user_files = await trio.to_thread.run_sync(self._build_spec, container_id, resolved.config,
                                                                 spec_options, namespace, mounts)
                if user_files is not None:
                    _remember(self._user_files, user_key, user_files, USER_FILES_KEPT)
                container = await self.containers.create(record(spec))
        except BaseException:
            with trio.CancelScope(shield=True):
                if prepared:
                    with contextlib.suppress(BerthError):
                        await snapshots.remove(container_id)
                await self.forget_container(namespace, container_id)
                await self.leases.delete(lease_id)
            raise
        # What the lease held (the snapshot) the container holds now: nothing became garbage, so this
        # deletion schedules no collection (the failure path's does).
        await self.leases.delete(lease_id, garbage=False)
        return container, mounts

    async def _image_config(self, namespace: str, target: Descriptor) -> ImageConfig:
        """The image's config and top chain ID, read from the content store once per image: blobs are
        named by their digest, so what one resolves to never changes."""
        key = (namespace, target.digest, target.media_type)
        resolved = self._image_configs.get(key)
        if resolved is None:
            resolved = await image_config(self.metadata.content, target)
            _remember(self._image_configs, key, resolved, IMAGE_CONFIGS_KEPT)
        return resolved

    def _build_spec(self, container_id: str, image_config: Mapping[str, Any], options: SpecOptions, namespace: str,
                    mounts: list[Mount]) -> tuple[dict[str, Any], UserFiles | None]:
        """The container's spec, its user resolved through the image's ``etc/passwd`` and ``etc/group`` read
        from the rootfs mounted on a scratch directory; also those files, to keep for the next containers of
        the image (``None`` when they cannot be read whole: the user resolution then says why, if it needs
        them). Blocking."""
        scratch = self.state / ".spec" / uuid.uuid4().hex
        scratch.mkdir(parents=True)
        try:
            mount_all(mounts, scratch)
            try:
                try:
                    files: UserFiles | None = read_user_files(scratch)
                except BerthError:
                    files = None
                spec = build_spec(container_id, image_config, options, namespace=namespace,
                                  rootfs=scratch if files is None else files)
            finally:
                unmount_all(scratch)
        finally:
            scratch.rmdir()
        return spec, files

    async def _network_request(self, namespace: str, container_id: str, options: RunOptions,
                               spec_options: SpecOptions) -> NetworkRequest | None:
        """Check the network a container asks for and point its spec at the namespace to use; return
        what ``tasks.create`` must ask the network plugin for (``None``: nothing)."""
        mode = options.network or "none"
        ports = tuple(parse_port(text) for text in options.ports)
        if mode in ("none", "host") or mode.startswith("container:"):
            if ports:
                raise InvalidArgument(f"published ports need a named network, not --net {mode}")
            if mode.startswith("container:"):
                spec_options.namespace_paths["network"] = await self._container_netns(mode.partition(":")[2])
            return None
        if self.network is None:
            raise FailedPrecondition(f"network {mode!r} needs a network plugin, and none is loaded")
        await self.network.inspect(mode)  # NotFound names the network
        spec_options.namespace_paths["network"] = self.network.netns_path(namespace, container_id)
        return NetworkRequest(mode=mode, ports=ports)

    async def _container_netns(self, other: str) -> str:
        """The network namespace of container ``other`` (its attached one, else its task's)."""
        namespace = namespace_required()
        container = await self.containers.get(other)
        if NETWORK_EXTENSION in container.extensions and self.network is not None:
            return self.network.netns_path(namespace, other)
        record = self.records.get((namespace, other))
        if record is None or record.lost is not None:
            raise FailedPrecondition(f"container {other} has no running task whose network could be joined")
        state = await self.get(other)
        if state.get("status") not in ("created", "running", "paused") or not state.get("pid"):
            raise FailedPrecondition(f"container {other} is {state.get('status')}: its network cannot be joined")
        return f"/proc/{state['pid']}/ns/net"

    async def forget_container(self, namespace: str, container_id: str) -> None:
        """Remove a deleted container's directory (log, ``/etc`` files)."""
        path = self.container_dir(namespace, container_id)
        await trio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))

    # ------------------------------------------------------------------ lifecycle

    def _group(self, namespace: str, container: Container) -> str:
        if container.labels.get(SHIM_GROUP_LABEL):
            return validate_identifier(container.labels[SHIM_GROUP_LABEL], f"label {SHIM_GROUP_LABEL}")
        if self.config.shim_grouping == "container":
            return f"{namespace}.{container.id}"[:76]
        return namespace

    async def create(self, container_id: str, stdio: StdioArgs, *, start: bool = False,
                     container: Container | None = None, rootfs: list[Mount] | None = None) -> dict[str, Any]:
        """Create the task of a container (its init blocked until :meth:`start`, or started at once with
        ``start``: one runtime process instead of two); return its pid. ``container`` and ``rootfs`` (its
        snapshot's mounts) spare reading them again when the caller has them.

        Raises: NotFound (container, runtime, snapshot); AlreadyExists (a task exists); the shim's and
        the runtime's errors (nothing is left behind then).
        """
        namespace = namespace_required()
        key = (namespace, container_id)
        async with self._create_locks.setdefault(key, trio.Lock()):
            if key in self.records:
                raise AlreadyExists(f"task for container {container_id} already exists")
            if container is None:
                container = await self.containers.get(container_id)
            runtime = self._runtime(container.runtime.name)
            runtime = dataclasses.replace(runtime, root=str(Path(runtime.root) / namespace))
            await self._make_namespace_dirs(namespace)
            if rootfs is None:
                rootfs = []
                if container.snapshot_key:
                    snapshots = self.metadata.snapshotters.get(container.snapshotter)
                    if snapshots is None:
                        raise NotFound(f"snapshotter {container.snapshotter!r} of container {container_id} is not "
                                       f"loaded")
                    rootfs = await snapshots.mounts(container.snapshot_key)
            bundle = self.state / namespace / container_id
            log_path = ""
            if stdio.log:
                log_path = str(self.container_dir(namespace, container_id) / "log")
            record = TaskRecord(namespace=namespace, id=container_id, group=self._group(namespace, container),
                                runtime=runtime, bundle=bundle, log=log_path)
            await trio.to_thread.run_sync(self._write_bundle, record, container, stdio.terminal)
            shim: Shim | None = None
            self._hold_group(record.group)
            try:
                await self._attach_network(namespace, container)
                shim = await self.shims.get(record.group)
                result = await shim.call("create", {
                    "id": container_id, "bundle": str(bundle), "runtime": runtime.to_wire(),
                    "rootfs": [m.to_wire() for m in rootfs],
                    "stdio": {"stdin": stdio.stdin, "terminal": stdio.terminal, "log": log_path,
                              "stdin_fifo": stdio.stdin_fifo, "stdout_fifo": stdio.stdout_fifo,
                              "stderr_fifo": stdio.stderr_fifo, "hold": stdio.hold}, "start": start},
                    namespace=namespace)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._detach_network(namespace, container_id)
                    await trio.to_thread.run_sync(lambda: shutil.rmtree(bundle, ignore_errors=True))
                raise
            else:
                self.records[key] = record
            finally:
                self._unhold_group(record.group)
            return {"pid": result["pid"]}

    def _hold_group(self, group: str) -> None:
        """A create for ``group`` begins: its shim must not exit for being idle."""
        self._creating[group] = self._creating.get(group, 0) + 1
        scope = self._idle.pop(group, None)
        if scope is not None:
            scope.cancel()

    def _unhold_group(self, group: str) -> None:
        self._creating[group] -= 1
        if not self._creating[group]:
            del self._creating[group]
            self._release_group(group)

    def _release_group(self, group: str) -> None:
        """If ``group`` has no task and no create in progress, stop its shim after ``shim_idle_timeout``."""
        if group in self._creating or any(r.group == group for r in self.records.values()):
            return
        previous = self._idle.pop(group, None)
        if previous is not None:
            previous.cancel()
        scope = self._idle[group] = trio.CancelScope()
        self._nursery.start_soon(self._idle_shutdown, group, scope)

    async def _idle_shutdown(self, group: str, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(self.config.shim_idle_timeout)
            if self._idle.get(group) is scope:
                del self._idle[group]
                await self.shims.shutdown(group)

    async def _attach_network(self, namespace: str, container: Container) -> None:
        raw = container.extensions.get(NETWORK_EXTENSION)
        if raw is None:
            return
        if self.network is None:
            raise FailedPrecondition(f"container {container.id} needs network {raw.get('mode')!r}, and no network "
                                     f"plugin is loaded")
        hostname = str(container.spec.get("hostname") or container.id)
        attachment = await self.network.attach(namespace, container.id, NetworkRequest.from_wire(raw),
                                               hostname=hostname)
        etc = _etc_files_directory(container.spec)
        if etc is None:  # a spec of its own, without berth's /etc files: nothing to write them into
            return
        addresses = [a.split("/")[0] for i in attachment.interfaces if i.name != "lo" for a in i.addresses]
        await trio.to_thread.run_sync(_write_network_files, etc, hostname, addresses, list(attachment.dns))

    async def _detach_network(self, namespace: str, container_id: str) -> None:
        if self.network is None:
            return
        try:
            await self.network.detach(namespace, container_id)
        except BerthError as err:
            log.warning("network_detach_failed", container_id=container_id, namespace=namespace, error=str(err))

    def _write_bundle(self, record: TaskRecord, container: Container, terminal: bool) -> None:
        """Write the bundle (blocking): ``config.json`` is the container's spec with ``process.terminal``
        as the task's stdio says (as for an exec process) and the plugins' adjustments."""
        spec = container.spec
        if isinstance(spec.get("process"), dict):
            spec = {**spec, "process": {**spec["process"], "terminal": terminal}}
        if self.hooks is not None and self.hooks.hook.berth_adjust_spec.get_hookimpls():
            # the plugins change it in place: a deep copy, made only for them
            spec = apply_spec_adjustments(self.hooks, json.loads(json.dumps(spec)), container)
        if record.bundle.exists():  # left by a crash between writing it and creating the task
            unmount_all(record.bundle / "rootfs")
            shutil.rmtree(record.bundle)
        record.bundle.mkdir(parents=True, mode=0o700)
        (record.bundle / "config.json").write_text(json.dumps(spec))
        (record.bundle / "task.json").write_text(record.to_json())
        if record.log:
            Path(record.log).parent.mkdir(parents=True, exist_ok=True)

    async def start(self, container_id: str, exec_id: str = "") -> dict[str, Any]:
        return await self._call(container_id, "start", {"exec_id": exec_id})  # type: ignore[no-any-return]

    async def kill(self, container_id: str, signal: int, *, all_processes: bool = False,
                   exec_id: str = "") -> None:
        if not 0 < signal < 65:
            raise InvalidArgument(f"signal {signal} is out of range (1-64)")
        record = self._record(container_id)
        if record.lost is not None:  # as for any finished process (the shim says NotFound then)
            raise NotFound(f"task {container_id} has already finished (its shim is gone)")
        await self._call(container_id, "kill", {"signal": signal, "all": all_processes, "exec_id": exec_id})

    async def wait(self, container_id: str, exec_id: str = "") -> dict[str, Any]:
        """Wait for the process to exit: ``{"pid", "exit_status", "exited_at"}``."""
        record = self._record(container_id)
        if record.lost is not None and not exec_id:
            return dict(record.lost)
        shim = await self._shim(record)
        try:
            return await shim.call("wait", {"id": container_id, "exec_id": exec_id},  # type: ignore[no-any-return]
                                   namespace=record.namespace)
        except Unavailable:
            await self._settled(record, shim)
            if record.lost is not None and not exec_id:
                return dict(record.lost)  # the shim died while we waited: its exit record is the answer
            if record.lost is None:
                return await self.wait(container_id, exec_id)  # connected again
            raise

    async def exec(self, container_id: str, exec_id: str, process: dict[str, Any], stdio: StdioArgs) -> None:
        """Add an exec process (start it with :meth:`start` and its exec id). Its output is not logged.

        What ``process`` leaves out (``cwd``, ``env``, ``user``, capabilities, rlimits, ...) is the
        container's own process's, as ``ctr exec`` makes it.
        """
        self._record(container_id)  # NotFound before anything else
        with contextlib.suppress(NotFound):
            container = await self.containers.get(container_id)
            base = container.spec.get("process") or {}
            process = {**{k: v for k, v in base.items() if k not in ("args", "commandLine", "terminal",
                                                                      "consoleSize")}, **process}
        await self._call(container_id, "exec", {
            "exec_id": exec_id, "process": process,
            "stdio": {"stdin": stdio.stdin, "terminal": stdio.terminal, "stdin_fifo": stdio.stdin_fifo,
                      "stdout_fifo": stdio.stdout_fifo, "stderr_fifo": stdio.stderr_fifo}})

    async def delete(self, container_id: str, exec_id: str = "", *, remove_container: bool = False) -> dict[str, Any]:
        """Delete a stopped process; for the init, the whole task, and with ``remove_container`` then the
        container too, as :meth:`remove_container` does (``berth run --rm``: one call). Returns its exit
        status.

        Raises: FailedPrecondition while it runs; InvalidArgument for ``remove_container`` with an exec id.
        """
        record = self._record(container_id)
        if exec_id:
            if remove_container:
                raise InvalidArgument("remove_container deletes a task's init, not an exec process")
            return await self._call(container_id, "delete", {"exec_id": exec_id})  # type: ignore[no-any-return]
        if record.lost is not None:
            result = dict(record.lost)
            del self.records[(record.namespace, record.id)]  # now: a concurrent delete finds nothing
            with trio.CancelScope(shield=True):
                await self._cleanup_lost(record)
            self.exchange.publish(record.namespace, "/tasks/delete", {
                "container_id": record.id, "id": record.id, **result})
        else:
            shim = await self._shim(record)
            result = await shim.call("delete", {"id": container_id}, namespace=record.namespace)
            await trio.to_thread.run_sync(lambda: shutil.rmtree(record.bundle, ignore_errors=True))
            if self.records.get((record.namespace, record.id)) is not record:
                raise NotFound(f"no task for container {container_id}: deleted meanwhile")  # concurrently
            del self.records[(record.namespace, record.id)]
        await self._detach_network(record.namespace, record.id)
        self._release_group(record.group)
        if remove_container:
            await self.remove_container(container_id)
        return result

    async def remove_container(self, container_id: str) -> None:
        """Delete a container that has no task, with its directory and its snapshot (``containers.delete``
        with ``snapshot_cleanup``). Raises: NotFound; FailedPrecondition (it has a task)."""
        await delete_container(self.containers, self.metadata.snapshotters, container_id, snapshot_cleanup=True,
                               tasks=self)

    async def pause(self, container_id: str) -> None:
        await self._call(container_id, "pause", {})

    async def resume(self, container_id: str) -> None:
        await self._call(container_id, "resume", {})

    async def pids(self, container_id: str) -> list[dict[str, Any]]:
        return (await self._call(container_id, "pids", {}))["processes"]  # type: ignore[no-any-return]

    async def metrics(self, container_id: str) -> dict[str, Any]:
        return (await self._call(container_id, "stats", {}))["stats"]  # type: ignore[no-any-return]

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        await self._call(container_id, "update", {"resources": resources})

    async def write(self, container_id: str, data: bytes, exec_id: str = "") -> None:
        await self._call(container_id, "write", {"data": data, "exec_id": exec_id})

    async def close_io(self, container_id: str, exec_id: str = "") -> None:
        await self._call(container_id, "close_io", {"exec_id": exec_id})

    async def resize(self, container_id: str, width: int, height: int, exec_id: str = "") -> None:
        await self._call(container_id, "resize", {"width": width, "height": height, "exec_id": exec_id})

    @contextlib.asynccontextmanager
    async def attach(self, container_id: str, exec_id: str = "") -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """The process's output from now on: ``{"attached": true}`` first, then ``{"stdout"|"stderr": bytes}``
        items, ending with its output."""
        record = self._record(container_id)
        shim = await self._shim(record)
        async with shim.stream("attach", {"id": container_id, "exec_id": exec_id},
                               namespace=record.namespace) as items:
            yield items

    async def get(self, container_id: str, exec_id: str = "") -> dict[str, Any]:
        """The state of a task (``status``: created, running, paused, stopped) or of an exec process."""
        record = self._record(container_id)
        try:
            if record.lost is None:
                return await self._call(container_id, "state", {"exec_id": exec_id})  # type: ignore[no-any-return]
        except FailedPrecondition:
            if record.lost is None:
                raise  # a real refusal, not a shim that died meanwhile
        assert record.lost is not None
        if exec_id:  # the shim that knew its exec processes is gone
            raise NotFound(f"task {container_id} has no exec process {exec_id!r} (its shim is gone)")
        return {"id": record.id, "namespace": record.namespace, "runtime": record.runtime.name,
                "status": "stopped", "exec_id": "", "execs": [], **record.lost}

    async def list_tasks(self) -> list[dict[str, Any]]:
        namespace = namespace_required()
        ids = sorted(cid for ns, cid in self.records if ns == namespace)
        states: dict[str, dict[str, Any]] = {}

        async def one(container_id: str) -> None:
            with contextlib.suppress(NotFound):
                states[container_id] = await self.get(container_id)

        async with trio.open_nursery() as nursery:
            for container_id in ids:
                nursery.start_soon(one, container_id)
        return [states[cid] for cid in ids if cid in states]

    async def logs(self, container_id: str, *, follow: bool) -> AsyncIterator[bytes]:
        """The container's log file from its start; with ``follow``, then what is written until the task
        stops. Raises: NotFound when the container has no log."""
        namespace = namespace_required()
        path = self.container_dir(namespace, container_id) / "log"
        try:
            fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"container {container_id} has no log in namespace {namespace}") from None
        try:
            while True:
                chunk = await trio.to_thread.run_sync(os.read, fd, _LOG_CHUNK)
                if chunk:
                    yield chunk
                    continue
                if not follow or not await self._still_running(namespace, container_id):
                    final = await trio.to_thread.run_sync(os.read, fd, _LOG_CHUNK)
                    if not final:
                        return
                    yield final
                    continue
                await trio.sleep(0.1)
        finally:
            os.close(fd)

    async def _still_running(self, namespace: str, container_id: str) -> bool:
        record = self.records.get((namespace, container_id))
        if record is None or record.lost is not None:
            return False
        with contextlib.suppress(BerthError):
            state = await (await self._shim(record)).call("state", {"id": container_id}, namespace=namespace)
            return bool(state["status"] != "stopped")
        return False

    # ------------------------------------------------------------------ shims that die

    async def _shim_gone(self, group: str) -> None:
        """The connection to a shim ended. If the shim still runs, connect again; if it cannot be
        reached, kill it, and report its tasks stopped."""
        if not any(r.group == group and r.lost is None for r in self.records.values()):
            return  # an idle shim that exited
        recovering = self._recovering[group] = trio.Event()
        try:
            for delay in (0.0, 0.2, 1.0):
                if not await self.shims.running(group):
                    break
                await trio.sleep(delay)
                with contextlib.suppress(BerthError):
                    await self.shims.connect(group)
                    log.info("shim_reconnected", group=group)
                    return
            await self.shims.kill(group)
            log.warning("shim_gone", group=group)
            for record in [r for r in self.records.values() if r.group == group and r.lost is None]:
                await self._mark_lost(record)
        finally:
            recovering.set()
            if self._recovering.get(group) is recovering:
                del self._recovering[group]

    async def _mark_lost(self, record: TaskRecord) -> None:
        """The task's shim is gone: kill what is left of the container and report it stopped."""
        def read() -> tuple[tuple[int, float] | None, int]:
            pid = 0
            with contextlib.suppress(OSError, ValueError):
                pid = int((record.bundle / "init.pid").read_text())
            return read_exit_record(record.bundle), pid

        recorded, pid = await trio.to_thread.run_sync(read)
        await self._runtime_force_delete(record)
        exit_status, exited_at = recorded if recorded is not None else (UNKNOWN_EXIT, time.time())
        record.lost = {"pid": pid, "exit_status": exit_status, "exited_at": exited_at}
        log.warning("task_lost_shim", container_id=record.id, namespace=record.namespace, exit_status=exit_status,
                    recorded=recorded is not None)
        self.exchange.publish(record.namespace, "/tasks/exit", {
            "container_id": record.id, "id": record.id, **record.lost})

    async def _runtime_force_delete(self, record: TaskRecord) -> None:
        runtime = record.runtime
        with trio.move_on_after(30):
            result = await trio.run_process(
                [runtime.binary, "--root", runtime.root, "delete", "--force", record.id],
                capture_stdout=True, capture_stderr=True, check=False, stdin=b"")
            if result.returncode != 0 and b"does not exist" not in result.stderr:
                log.warning("runtime_delete_failed", container_id=record.id,
                            error=result.stderr.decode(errors="replace").strip())

    async def _cleanup_lost(self, record: TaskRecord) -> None:
        await self._runtime_force_delete(record)

        def remove() -> None:
            unmount_all(record.bundle / "rootfs")
            shutil.rmtree(record.bundle, ignore_errors=True)

        await trio.to_thread.run_sync(remove)


def _remember(cache: dict[K, V], key: K, value: V, limit: int) -> None:
    """Keep ``value`` in ``cache``, dropping the oldest entry when it already holds ``limit``."""
    if key not in cache and len(cache) >= limit:
        del cache[next(iter(cache))]
    cache[key] = value


def parse_port(text: str) -> PortMapping:
    """``[HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp]`` (the host IP defaults to 127.0.0.1).

    Raises: InvalidArgument naming the mapping.
    """
    spec, _, protocol = text.partition("/")
    protocol = protocol or "tcp"
    parts = spec.rsplit(":", 2)
    try:
        if len(parts) == 3:
            host_ip, host_port, container_port = parts[0], int(parts[1]), int(parts[2])
        elif len(parts) == 2:
            host_ip, host_port, container_port = "127.0.0.1", int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise InvalidArgument(f"port {text!r} is not [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|udp]") from None
    if protocol not in ("tcp", "udp") or not (0 < host_port < 65536 and 0 < container_port < 65536):
        raise InvalidArgument(f"port {text!r}: ports are 1-65535 and the protocol tcp or udp")
    return PortMapping(host_port=host_port, container_port=container_port, protocol=protocol,
                       host_ip=host_ip.strip("[]") or "127.0.0.1")


def _etc_files_directory(spec: Mapping[str, Any]) -> Path | None:
    """Where the container's ``/etc/hosts`` comes from (the directory of its bind mount's source)."""
    for mount in spec.get("mounts") or []:
        if isinstance(mount, dict) and mount.get("destination") == "/etc/hosts" and mount.get("source"):
            return Path(mount["source"]).parent
    return None


def _write_network_files(etc: Path, hostname: str, addresses: list[str], dns: list[str]) -> None:
    """Give the container's ``/etc/hosts`` its addresses, and ``/etc/resolv.conf`` the network's name
    servers (the files are bind-mounted from ``etc``: written in place, before the container starts)."""
    hosts = etc / "hosts"
    lines = [line for line in hosts.read_text().splitlines() if not line.endswith(f"\t{hostname}")]
    lines += [f"{address}\t{hostname}" for address in addresses] or [f"127.0.1.1\t{hostname}"]
    hosts.write_text("\n".join(lines) + "\n")
    if dns:
        (etc / "resolv.conf").write_text("".join(f"nameserver {server}\n" for server in dns))


# ---------------------------------------------------------------------- RPC


@dataclass(kw_only=True)
class NewTaskArgs:
    stdio: StdioArgs = field(default_factory=StdioArgs)
    start: bool = False


@dataclass(kw_only=True)
class NewContainerArgs:
    id: str
    image: str
    snapshotter: str = ""
    runtime: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    options: RunOptions = field(default_factory=RunOptions)
    #: Create the container's task too (as ``tasks.create`` with these arguments): one call for ``berth run``.
    task: NewTaskArgs | None = None


@dataclass(kw_only=True)
class CreateArgs:
    container_id: str
    stdio: StdioArgs = field(default_factory=StdioArgs)
    #: Start the task as well (``tasks.start`` then has nothing to do).
    start: bool = False


@dataclass(kw_only=True)
class ProcessArgs:
    container_id: str
    exec_id: str = ""


@dataclass(kw_only=True)
class DeleteArgs:
    container_id: str
    exec_id: str = ""
    #: Delete the container as well, with its snapshot (``berth run --rm``: one call).
    remove_container: bool = False


@dataclass(kw_only=True)
class KillArgs:
    container_id: str
    signal: int = 15
    all: bool = False
    exec_id: str = ""


@dataclass(kw_only=True)
class ExecArgs:
    container_id: str
    exec_id: str
    process: dict[str, Any]
    stdio: StdioArgs = field(default_factory=StdioArgs)


@dataclass(kw_only=True)
class WriteArgs:
    container_id: str
    data: bytes
    exec_id: str = ""


@dataclass(kw_only=True)
class ResizeArgs:
    container_id: str
    width: int
    height: int
    exec_id: str = ""


@dataclass(kw_only=True)
class UpdateArgs:
    container_id: str
    resources: dict[str, Any]


@dataclass(kw_only=True)
class LogsArgs:
    container_id: str
    follow: bool = False


@dataclass(kw_only=True)
class NoArgs:
    pass


class TasksRPC:
    def __init__(self, service: TaskService) -> None:
        self.service = service

    @typed_args(NewContainerArgs)
    async def new_container(self, call: Call, args: NewContainerArgs) -> dict[str, Any]:
        container, task = await self.service.new_container(
            args.id, args.image, options=args.options, snapshotter=args.snapshotter, runtime=args.runtime,
            labels=args.labels, task=args.task.stdio if args.task is not None else None,
            start=args.task is not None and args.task.start)
        return {"container": container.to_wire(), **({"task": task} if args.task is not None else {})}

    @typed_args(CreateArgs)
    async def create(self, call: Call, args: CreateArgs) -> dict[str, Any]:
        return await self.service.create(args.container_id, args.stdio, start=args.start)

    @typed_args(ProcessArgs)
    async def start(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        return await self.service.start(args.container_id, args.exec_id)

    @typed_args(KillArgs)
    async def kill(self, call: Call, args: KillArgs) -> dict[str, Any]:
        await self.service.kill(args.container_id, args.signal, all_processes=args.all, exec_id=args.exec_id)
        return {}

    @typed_args(ProcessArgs)
    async def wait(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        return await self.service.wait(args.container_id, args.exec_id)

    @typed_args(ExecArgs)
    async def exec(self, call: Call, args: ExecArgs) -> dict[str, Any]:
        await self.service.exec(args.container_id, args.exec_id, args.process, args.stdio)
        return {}

    @typed_args(DeleteArgs)
    async def delete(self, call: Call, args: DeleteArgs) -> dict[str, Any]:
        return await self.service.delete(args.container_id, args.exec_id, remove_container=args.remove_container)

    @typed_args(ProcessArgs)
    async def pause(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        await self.service.pause(args.container_id)
        return {}

    @typed_args(ProcessArgs)
    async def resume(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        await self.service.resume(args.container_id)
        return {}

    @typed_args(ProcessArgs)
    async def pids(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        return {"processes": await self.service.pids(args.container_id)}

    @typed_args(ProcessArgs)
    async def metrics(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        return {"metrics": await self.service.metrics(args.container_id)}

    @typed_args(UpdateArgs)
    async def update(self, call: Call, args: UpdateArgs) -> dict[str, Any]:
        await self.service.update(args.container_id, args.resources)
        return {}

    @typed_args(WriteArgs)
    async def write(self, call: Call, args: WriteArgs) -> dict[str, Any]:
        await self.service.write(args.container_id, args.data, args.exec_id)
        return {}

    @typed_args(ProcessArgs)
    async def close_io(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        await self.service.close_io(args.container_id, args.exec_id)
        return {}

    @typed_args(ResizeArgs)
    async def resize(self, call: Call, args: ResizeArgs) -> dict[str, Any]:
        await self.service.resize(args.container_id, args.width, args.height, args.exec_id)
        return {}

    @streaming
    @typed_args(ProcessArgs)
    async def attach(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        async with self.service.attach(args.container_id, args.exec_id) as items:
            async for item in items:
                await call.send(item)
        return {}

    @streaming
    @typed_args(LogsArgs)
    async def logs(self, call: Call, args: LogsArgs) -> dict[str, Any]:
        async for chunk in self.service.logs(args.container_id, follow=args.follow):
            await call.send({"data": chunk})
        return {}

    @typed_args(ProcessArgs)
    async def get(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        return {"task": await self.service.get(args.container_id, args.exec_id)}

    @typed_args(NoArgs)
    async def list_tasks(self, call: Call, args: NoArgs) -> dict[str, Any]:
        return {"tasks": await self.service.list_tasks()}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"containers.new": self.new_container, "tasks.create": self.create, "tasks.start": self.start,
                "tasks.kill": self.kill, "tasks.wait": self.wait, "tasks.exec": self.exec,
                "tasks.delete": self.delete, "tasks.pause": self.pause, "tasks.resume": self.resume,
                "tasks.pids": self.pids, "tasks.metrics": self.metrics, "tasks.update": self.update,
                "tasks.write": self.write, "tasks.close_io": self.close_io, "tasks.resize": self.resize,
                "tasks.attach": self.attach, "tasks.logs": self.logs, "tasks.get": self.get,
                "tasks.list": self.list_tasks}


async def init_service(ic: InitContext) -> TaskService:
    config: Config = ic.config
    if config.shim_grouping not in ("namespace", "container"):
        raise InvalidArgument(f"shim_grouping must be 'namespace' or 'container', not {config.shim_grouping!r}")
    runtimes = {name: runtime for name, runtime in ic.get_by_type(PluginType.RUNTIME).items()
                if isinstance(runtime, RuntimeBinary)}
    metadata: Metadata = ic.get_single(PluginType.METADATA)
    exchange: Exchange = ic.get_single(PluginType.EVENT)
    scheduler: Scheduler = ic.get_single(PluginType.GC)
    network: Network | None = None
    with contextlib.suppress(BerthError):  # no network plugin: only none, host and container:<id>
        network = ic.get_single(PluginType.NETWORK)
    service = TaskService(config=config, metadata=metadata, network=network,
                          containers=ContainerStore(metadata.db, exchange.publish, on_delete=metadata.notify_deletion),
                          images=ImageStore(metadata.db, exchange.publish, collect=scheduler.collect_now,
                                            on_delete=metadata.notify_deletion),
                          leases=ic.get_single(PluginType.LEASE),
                          exchange=exchange,
                          runtimes=runtimes, state=ic.state, root=ic.root, nursery=ic.nursery, hooks=ic.hooks)
    ic.meta.exports.update({"runtimes": ",".join(sorted(runtimes)), "default_runtime": config.default_runtime})
    await service.load()
    return service


async def init_rpc(ic: InitContext) -> TasksRPC:
    return TasksRPC(ic.get_by_id(PluginType.SERVICE, "tasks-service"))


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.SERVICE, id="tasks-service", config=Config, init=init_service,
                                   requires=(PluginType.METADATA, PluginType.EVENT, PluginType.LEASE,
                                             PluginType.GC, PluginType.RUNTIME, PluginType.NETWORK)))
    registry.register(Registration(type=PluginType.RPC, id="tasks", init=init_rpc,
                                   requires=(PluginType.SERVICE,)))
