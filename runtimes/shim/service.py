"""The shim's task service: the tasks one shim supervises, and its RPC methods (``shim.*``).

One shim supervises any number of containers (a group, for example a namespace). It is their parent
(a child subreaper), holds their stdio, runs the runtime binary for every lifecycle step, and writes
each container's exit status to ``<bundle>/exit.json`` (atomically, before announcing it), so the
status survives both the daemon and the shim. Events go to whoever subscribes with ``shim.events``,
in containerd's order: an exit that happens while ``start`` is still running is held back until the
start event has gone out.

State machine of a process (containerd's ``init_state.go``): created → running | stopped;
running → paused | stopped; paused → running | stopped. ``delete`` of a running or paused process is
refused; ``exec`` needs a running task.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from berth.core.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from berth.core.identifiers import validate_identifier
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler, streaming
from berth.core.snapshots.mount import mount_all, unmount_all
from berth.core.snapshots.snapshotter import Mount
from berth.runtimes.runc.command import RuncCommand, RuntimeBinary
from berth.runtimes.shim.cgroupwarm import CgroupWarmUp
from berth.runtimes.shim.oom import OOMWatch, open_watch, watch_oom
from berth.runtimes.shim.reaper import Reaper
from berth.runtimes.shim.stdio import ProcessIO, StdioConfig

log = structlog.get_logger("berth.shim")

#: How long an exit waits for the process's output to drain before it is announced.
IO_DRAIN_TIMEOUT = 2.0
#: Events buffered per subscriber before newer ones are dropped.
EVENT_BUFFER = 1024


@dataclass(eq=False)
class Process:
    """A task's init process (``exec_id == ""``) or one of its exec processes."""

    exec_id: str
    io: ProcessIO
    pid: int = 0
    status: str = "created"
    exit_status: int = 0
    exited_at: float = 0.0
    exited: trio.Event = field(default_factory=trio.Event)
    #: ``start`` is running: an exit seen now waits in ``pending_exit`` until the start event is out.
    starting: bool = False
    pending_exit: int | None = None
    #: An exec's process spec (the runtime's ``--process`` file).
    spec: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"exec_id": self.exec_id, "pid": self.pid, "status": self.status, "exit_status": self.exit_status,
                "exited_at": self.exited_at, "terminal": self.io.config.terminal, "stdin": self.io.config.stdin}


@dataclass(eq=False)
class Task:
    namespace: str
    id: str
    bundle: Path
    runtime: RuncCommand
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    rootfs_mounted: bool = False
    #: The spec has ``poststop`` hooks (which the runtime's ``delete`` runs; they may read the rootfs).
    poststop_hooks: bool = False
    #: Cancels the task's OOM watch (at delete).
    oom_watch: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Serialises the lifecycle steps (create/start/delete/pause/resume) of this task.
    lock: trio.Lock = field(default_factory=trio.Lock)

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFound(f"task {self.id} has no exec process {exec_id!r}") from None

    def to_wire(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "id": self.id, "bundle": str(self.bundle),
                "runtime": self.runtime.runtime.name, **self.init.to_wire(),
                "execs": [p.to_wire() for p in self.execs.values()]}


def _prepare_bundle(bundle: Path, rootfs: list[Mount], io: ProcessIO, runtime_log: Path) -> bool:
    """Check the bundle has a ``config.json``, remove ``runtime_log`` (an earlier create's), open the init's
    log file (``io``) and mount ``rootfs`` (if any) on ``<bundle>/rootfs``; return whether the spec has
    ``poststop`` hooks. Blocking: one worker thread trip.

    Raises: InvalidArgument (no config.json); OSError from the log file or the mounts.
    """
    try:
        data = (bundle / "config.json").read_bytes()
    except OSError:
        raise InvalidArgument(f"bundle {bundle}: no config.json") from None
    try:
        spec = json.loads(data)
    except ValueError:
        spec = {}  # the runtime says what is wrong with it
    hooks = spec.get("hooks") if isinstance(spec, dict) else None
    poststop = bool(hooks.get("poststop")) if isinstance(hooks, dict) else False
    runtime_log.unlink(missing_ok=True)
    io.open_log()
    if rootfs:
        (bundle / "rootfs").mkdir(exist_ok=True)
        mount_all(rootfs, bundle / "rootfs")
    return poststop


def _read_pid(path: Path) -> int:
    """The pid in the runtime's ``--pid-file``. Blocking. Raises: FailedPrecondition (none there)."""
    text = path.read_text()
    try:
        return int(text.strip())
    except ValueError:
        raise FailedPrecondition(f"the runtime wrote no pid to {path}: {text!r}") from None


def _init_pid_and_oom_watch(pid_file: Path) -> tuple[int, OOMWatch | None]:
    """The init's pid and the OOM watch of its memory cgroup: one worker thread trip. Blocking."""
    pid = _read_pid(pid_file)
    return pid, open_watch(pid)


def write_exit_record(bundle: Path, exit_status: int, exited_at: float) -> None:
    """Write ``<bundle>/exit.json`` durably (temporary file, fsync, rename)."""
    path = bundle / "exit.json"
    tmp = bundle / ".exit.json.tmp"
    with open(tmp, "w") as f:
        json.dump({"exit_status": exit_status, "exited_at": exited_at}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_exit_record(bundle: Path) -> tuple[int, float] | None:
    """The ``(exit_status, exited_at)`` a shim recorded in ``bundle``, if any."""
    try:
        record = json.loads((bundle / "exit.json").read_text())
        return int(record["exit_status"]), float(record["exited_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(kw_only=True)
class CreateArgs:
    id: str
    bundle: str
    runtime: dict[str, Any]
    rootfs: list[dict[str, Any]] = field(default_factory=list)
    stdio: dict[str, Any] = field(default_factory=dict)
    #: Start the init too (``<runtime> run --detach``: one runtime process instead of two).
    start: bool = False


@dataclass(kw_only=True)
class ProcessArgs:
    id: str
    exec_id: str = ""


@dataclass(kw_only=True)
class ExecArgs:
    id: str
    exec_id: str
    process: dict[str, Any]
    stdio: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class KillArgs:
    id: str
    exec_id: str = ""
    signal: int = 15
    all: bool = False


@dataclass(kw_only=True)
class WriteArgs:
    id: str
    exec_id: str = ""
    data: bytes = b""


@dataclass(kw_only=True)
class ResizeArgs:
    id: str
    exec_id: str = ""
    width: int = 80
    height: int = 24


@dataclass(kw_only=True)
class UpdateArgs:
    id: str
    resources: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class NoArgs:
    pass


class ShimService:
    """The tasks of one shim. Construct, then :meth:`run` in a nursery before serving RPC."""

    def __init__(self, *, reaper: Reaper, socket_dir: Path, stop: trio.Event) -> None:
        self.reaper = reaper
        self.socket_dir = socket_dir
        self.stop = stop
        self.tasks: dict[tuple[str, str], Task] = {}
        self._subscribers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self._nursery: trio.Nursery | None = None
        #: The runtime's move of a new process into its cgroup waits for no RCU grace period then.
        self._warm_up = CgroupWarmUp()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the background tasks (output copying, exit handling) until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "ShimService.run is not running"
        return self._nursery

    # ------------------------------------------------------------------ events

    def _publish(self, task: Task, topic: str, event: dict[str, Any]) -> None:
        envelope = {"timestamp": time.time(), "namespace": task.namespace, "topic": topic, "event": event}
        for subscriber in list(self._subscribers):
            try:
                subscriber.send_nowait(envelope)
            except trio.WouldBlock:
                log.warning("event_dropped", topic=topic, container_id=task.id, reason="subscriber is behind")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(subscriber)

    @streaming
    @typed_args(NoArgs)
    async def events(self, call: Call, args: NoArgs) -> dict[str, Any]:
        """Stream every event of this shim's tasks until the caller goes."""
        send, receive = trio.open_memory_channel[dict[str, Any]](EVENT_BUFFER)
        self._subscribers.add(send)
        try:
            await call.send({"subscribed": True})
            async with receive:
                async for envelope in receive:
                    await call.send(envelope)
        finally:
            self._subscribers.discard(send)
            send.close()
        return {}

    # ------------------------------------------------------------------ helpers

    def _task(self, call: Call, container_id: str) -> Task:
        try:
            return self.tasks[(call.namespace, container_id)]
        except KeyError:
            raise NotFound(f"task {container_id} not found in namespace {call.namespace}") from None

    def _console_path(self, task_key: str) -> Path:
        digest = hashlib.sha256(task_key.encode()).hexdigest()[:20]
        return self.socket_dir / f"c-{digest}.sock"

    def _on_exit(self, task: Task, process: Process, code: int) -> None:
        if process.starting:
            process.pending_exit = code
        else:
            self.nursery.start_soon(self._finish_exit, task, process, code)

    async def _finish_exit(self, task: Task, process: Process, code: int) -> None:
        process.status = "stopped"
        process.exit_status = code
        process.exited_at = time.time()
        if not process.exec_id:
            try:
                await trio.to_thread.run_sync(write_exit_record, task.bundle, code, process.exited_at)
            except OSError as err:  # kept in memory still: only a shim crash would lose it now
                log.error("exit_record_not_written", container_id=task.id, error=str(err))
        with trio.move_on_after(IO_DRAIN_TIMEOUT):
            await process.io.drained.wait()
        process.exited.set()
        log.info("process_exited", container_id=task.id, exec_id=process.exec_id, pid=process.pid,
                 exit_status=code)
        self._publish(task, "/tasks/exit", {"container_id": task.id, "id": process.exec_id or task.id,
                                            "pid": process.pid, "exit_status": code,
                                            "exited_at": process.exited_at})

    async def _release_exit(self, task: Task, process: Process) -> None:
        process.starting = False
        if process.pending_exit is not None:
            code, process.pending_exit = process.pending_exit, None
            await self._finish_exit(task, process, code)

    # ------------------------------------------------------------------ lifecycle

    @typed_args(CreateArgs)
    async def create(self, call: Call, args: CreateArgs) -> dict[str, Any]:
        """Mount the rootfs into the bundle and run ``<runtime> create`` (``run --detach`` with ``start``);
        return the init's pid. On failure nothing is left: no runtime state, mount or descriptor.
        """
        validate_identifier(args.id, "container id")
        if self.stop.is_set():
            raise Unavailable("the shim is shutting down")
        key = (call.namespace, args.id)
        if key in self.tasks:
            raise AlreadyExists(f"task {args.id} already exists in namespace {call.namespace}")
        bundle = Path(args.bundle)
        if not bundle.is_absolute():
            raise InvalidArgument(f"bundle {bundle} is not an absolute path")
        self._warm_up.start(self.nursery)  # the runtime moves the init into its cgroups in some 10-30 ms
        stdio = StdioConfig.from_wire(args.stdio)
        runtime = RuncCommand(RuntimeBinary.from_wire(args.runtime), self.reaper)
        rootfs = [Mount.from_wire(m) for m in args.rootfs]
        task = Task(call.namespace, args.id, bundle, runtime, Process("", ProcessIO(stdio)))
        self.tasks[key] = task
        created = False
        try:
            async with task.lock:
                runtime_log = bundle / "log.json"
                task.poststop_hooks = await trio.to_thread.run_sync(_prepare_bundle, bundle, rootfs, task.init.io,
                                                                    runtime_log)
                task.rootfs_mounted = bool(rootfs)
                console = None
                if stdio.terminal:
                    console = task.init.io.console_socket(self._console_path(f"{call.namespace}/{args.id}"))
                    child = task.init.io.null_stdio()
                else:
                    child = task.init.io.open_pipes()
                pid_file = bundle / "init.pid"
                task.init.starting = args.start  # an exit seen before the start event waits for it
                async with trio.open_nursery() as nursery:
                    if console is not None:
                        nursery.start_soon(task.init.io.receive_console)
                    try:
                        await runtime.create(args.id, bundle, pid_file=pid_file, log=runtime_log, stdio=child,
                                             console_socket=console, start=args.start)
                    except BaseException:
                        nursery.cancel_scope.cancel()
                        raise
                created = True
                task.init.io.close_child_ends()
                task.init.pid, oom = await trio.to_thread.run_sync(_init_pid_and_oom_watch, pid_file)
                self.nursery.start_soon(self._watch_oom, task, oom)  # it closes the watch, even if cancelled
                self.reaper.watch(task.init.pid, lambda code: self._on_exit(task, task.init, code))
                await task.init.io.start(self.nursery)
                if args.start:
                    task.init.status = "running"
        except BaseException:
            with trio.CancelScope(shield=True):
                task.init.starting = False
                await self._discard(task, runtime_created=created)
            raise
        log.info("task_created", container_id=args.id, namespace=call.namespace, pid=task.init.pid,
                 runtime=runtime.runtime.name, started=args.start)
        self._publish(task, "/tasks/create", {"container_id": args.id, "bundle": str(bundle),
                                              "pid": task.init.pid, "io": stdio.to_wire()})
        if args.start:
            self._publish(task, "/tasks/start", {"container_id": args.id, "pid": task.init.pid})
            await self._release_exit(task, task.init)
        return {"pid": task.init.pid}

    async def _watch_oom(self, task: Task, watch: OOMWatch | None) -> None:
        def oom() -> None:
            log.warning("task_oom", container_id=task.id, namespace=task.namespace)
            self._publish(task, "/tasks/oom", {"container_id": task.id})

        with task.oom_watch:
            await watch_oom(watch, oom)

    async def _discard(self, task: Task, *, runtime_created: bool) -> None:
        """Undo a create: the runtime's container, the rootfs mount, the stdio; forget the task."""
        task.oom_watch.cancel()
        self.tasks.pop((task.namespace, task.id), None)
        if runtime_created:
            with contextlib.suppress(Exception):
                await task.runtime.delete(task.id, force=True)
        await task.init.io.aclose()
        await self._unmount_rootfs(task)

    @staticmethod
    async def _unmount_rootfs(task: Task) -> None:
        if task.rootfs_mounted:
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(unmount_all, task.bundle / "rootfs")
            task.rootfs_mounted = False

    @typed_args(ProcessArgs)
    async def start(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        """Start the init (``<runtime> start``) or an exec process; return its pid."""
        task = self._task(call, args.id)
        process = task.process(args.exec_id)
        async with task.lock:
            if process.status != "created":
                raise FailedPrecondition(f"cannot start {_describe(task, process)}: it is {process.status}")
            if process.exec_id and task.init.status != "running":  # runc's refusal would read as Internal
                raise FailedPrecondition(f"cannot start {_describe(task, process)}: task {task.id} is "
                                         f"{task.init.status}")
            process.starting = True
            try:
                if process.exec_id:
                    await self._start_exec(task, process)
                else:
                    await task.runtime.start(task.id)
                    process.status = "running"
            except BaseException:
                with trio.CancelScope(shield=True):
                    if process.exec_id and process.status == "created":  # it never ran: it is over
                        await process.io.aclose()  # attached readers see the end, not wait forever
                        process.status, process.exit_status, process.exited_at = "stopped", 255, time.time()
                        process.exited.set()
                    await self._release_exit(task, process)
                raise
            if process.exec_id:
                self._publish(task, "/tasks/exec-started", {"container_id": task.id, "exec_id": process.exec_id,
                                                            "pid": process.pid})
            else:
                self._publish(task, "/tasks/start", {"container_id": task.id, "pid": process.pid})
            await self._release_exit(task, process)
        return {"pid": process.pid}

    async def _start_exec(self, task: Task, process: Process) -> None:
        self._warm_up.start(self.nursery)  # the runtime moves the exec process into the task's cgroup
        spec_path = task.bundle / f"exec-{process.exec_id}.json"
        runtime_log = task.bundle / f"exec-{process.exec_id}.log.json"

        def write_spec() -> None:
            spec_path.write_text(json.dumps(process.spec))
            runtime_log.unlink(missing_ok=True)  # an earlier exec's of the same id

        await trio.to_thread.run_sync(write_spec)
        console = None
        if process.io.config.terminal:
            console = process.io.console_socket(
                self._console_path(f"{task.namespace}/{task.id}/{process.exec_id}"))
            child = process.io.null_stdio()
        else:
            child = process.io.open_pipes()
        pid_file = task.bundle / f"exec-{process.exec_id}.pid"
        async with trio.open_nursery() as nursery:
            if console is not None:
                nursery.start_soon(process.io.receive_console)
            try:
                await task.runtime.exec(task.id, spec_path, pid_file=pid_file, stdio=child, console_socket=console,
                                        log=runtime_log)
            except BaseException:
                nursery.cancel_scope.cancel()
                raise
        process.io.close_child_ends()
        process.pid = await trio.to_thread.run_sync(_read_pid, pid_file)
        process.status = "running"
        self.reaper.watch(process.pid, lambda code: self._on_exit(task, process, code))
        await process.io.start(self.nursery)

    @typed_args(ExecArgs)
    async def exec(self, call: Call, args: ExecArgs) -> dict[str, Any]:
        """Add an exec process to a running task (started by ``start`` with its ``exec_id``)."""
        task = self._task(call, args.id)
        validate_identifier(args.exec_id, "exec id")
        if task.init.status != "running":
            raise FailedPrecondition(f"cannot exec in task {task.id}: it is {task.init.status}")
        if args.exec_id in task.execs:
            raise AlreadyExists(f"task {task.id} already has an exec process {args.exec_id!r}")
        if not isinstance(args.process.get("args"), list) or not args.process["args"]:
            raise InvalidArgument("an exec process needs args")
        stdio = StdioConfig.from_wire(args.stdio)
        if bool(args.process.get("terminal")) != stdio.terminal:
            args.process["terminal"] = stdio.terminal
        task.execs[args.exec_id] = Process(args.exec_id, ProcessIO(stdio), spec=args.process)
        self._publish(task, "/tasks/exec-added", {"container_id": task.id, "exec_id": args.exec_id})
        return {}

    @typed_args(KillArgs)
    async def kill(self, call: Call, args: KillArgs) -> dict[str, Any]:
        """Signal the init (through the runtime; ``all`` signals every process of the container) or an
        exec process. Raises NotFound when the process has finished."""
        task = self._task(call, args.id)
        process = task.process(args.exec_id)
        if process.status == "stopped":
            raise NotFound(f"{_describe(task, process)} has already finished")
        if process.exec_id:
            if process.status == "created":
                raise FailedPrecondition(f"{_describe(task, process)} has not started")
            try:
                os.kill(process.pid, args.signal)
            except ProcessLookupError:
                raise NotFound(f"{_describe(task, process)} has already finished") from None
        else:
            await task.runtime.kill(task.id, args.signal, all_processes=args.all)
        return {}

    @typed_args(ProcessArgs)
    async def wait(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        """Wait for the process to exit; return its exit status and time."""
        task = self._task(call, args.id)
        process = task.process(args.exec_id)
        await process.exited.wait()
        return {"pid": process.pid, "exit_status": process.exit_status, "exited_at": process.exited_at}

    @typed_args(ProcessArgs)
    async def delete(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        """Remove a stopped (or never started) process; for the init, also the runtime's container and
        the rootfs mount. Returns the exit status. Raises FailedPrecondition while it runs."""
        task = self._task(call, args.id)
        process = task.process(args.exec_id)
        async with task.lock:
            if self.tasks.get((task.namespace, task.id)) is not task or (
                    process.exec_id and task.execs.get(process.exec_id) is not process):
                raise NotFound(f"{_describe(task, process)} was deleted meanwhile")  # by a concurrent delete
            if process.status in ("running", "paused"):
                raise FailedPrecondition(f"cannot delete {_describe(task, process)}: it is {process.status}")
            if process.exec_id:
                del task.execs[process.exec_id]
                await process.io.aclose()
                return {"pid": process.pid, "exit_status": process.exit_status, "exited_at": process.exited_at}
            running_execs = [p.exec_id for p in task.execs.values() if p.status in ("running", "paused")]
            if process.status == "created":
                with contextlib.suppress(NotFound):
                    await task.runtime.delete(task.id, force=True)
                with trio.move_on_after(5):
                    await process.exited.wait()
            elif running_execs or task.poststop_hooks:
                with contextlib.suppress(NotFound):
                    await task.runtime.delete(task.id, force=bool(running_execs))
            else:  # nothing runs in it and no hook reads the rootfs: unmount it while the runtime deletes
                await self._delete_stopped(task)
            for other in task.execs.values():
                await other.io.aclose()
            await self._discard(task, runtime_created=False)
        log.info("task_deleted", container_id=task.id, namespace=task.namespace, exit_status=process.exit_status)
        self._publish(task, "/tasks/delete", {"container_id": task.id, "id": task.id, "pid": process.pid,
                                              "exit_status": process.exit_status, "exited_at": process.exited_at})
        return {"pid": process.pid, "exit_status": process.exit_status, "exited_at": process.exited_at}

    async def _delete_stopped(self, task: Task) -> None:
        """``<runtime> delete`` of a task none of whose processes runs, with the rootfs unmounted meanwhile."""
        failed: list[Exception] = []

        async def delete() -> None:
            try:
                await task.runtime.delete(task.id)
            except NotFound:
                pass
            except Exception as err:  # raised below, as it is (not in an exception group)
                failed.append(err)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(delete)
            nursery.start_soon(self._unmount_rootfs, task)
        if failed:
            raise failed[0]

    @typed_args(ProcessArgs)
    async def pause(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        task = self._task(call, args.id)
        async with task.lock:
            if task.init.status != "running":
                raise FailedPrecondition(f"cannot pause task {task.id}: it is {task.init.status}")
            await task.runtime.pause(task.id)
            task.init.status = "paused"
        self._publish(task, "/tasks/paused", {"container_id": task.id})
        return {}

    @typed_args(ProcessArgs)
    async def resume(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        task = self._task(call, args.id)
        async with task.lock:
            if task.init.status != "paused":
                raise FailedPrecondition(f"cannot resume task {task.id}: it is {task.init.status}")
            await task.runtime.resume(task.id)
            if task.init.status == "paused":
                task.init.status = "running"
        self._publish(task, "/tasks/resumed", {"container_id": task.id})
        return {}

    @typed_args(ProcessArgs)
    async def pids(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        """The pids in the task's cgroup, each with the exec id that started it ("" for others)."""
        task = self._task(call, args.id)
        if task.init.status == "stopped":
            raise FailedPrecondition(f"task {task.id} has stopped")
        by_pid = {p.pid: p.exec_id for p in task.execs.values() if p.pid}
        return {"processes": [{"pid": pid, "exec_id": by_pid.get(pid, "")}
                              for pid in await task.runtime.ps(task.id)]}

    @typed_args(ProcessArgs)
    async def stats(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        """One sample of the task's cgroup statistics (the runtime's ``events --stats``)."""
        task = self._task(call, args.id)
        if task.init.status == "stopped":
            raise FailedPrecondition(f"task {task.id} has stopped")
        return {"stats": await task.runtime.stats(task.id)}

    @typed_args(UpdateArgs)
    async def update(self, call: Call, args: UpdateArgs) -> dict[str, Any]:
        """Change the task's resources (an OCI ``linux.resources`` object)."""
        task = self._task(call, args.id)
        if task.init.status == "stopped":
            raise FailedPrecondition(f"task {task.id} has stopped")
        await task.runtime.update(task.id, args.resources)
        return {}

    # ------------------------------------------------------------------ stdio

    @typed_args(WriteArgs)
    async def write(self, call: Call, args: WriteArgs) -> dict[str, Any]:
        """Write bytes to the process's stdin."""
        await self._task(call, args.id).process(args.exec_id).io.write(args.data)
        return {}

    @typed_args(ProcessArgs)
    async def close_io(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        """Close the process's stdin."""
        await self._task(call, args.id).process(args.exec_id).io.close_stdin()
        return {}

    @typed_args(ResizeArgs)
    async def resize(self, call: Call, args: ResizeArgs) -> dict[str, Any]:
        if args.width <= 0 or args.height <= 0 or args.width > 65535 or args.height > 65535:
            raise InvalidArgument(f"terminal size {args.width}x{args.height} is out of range")
        self._task(call, args.id).process(args.exec_id).io.resize(args.width, args.height)
        return {}

    @streaming
    @typed_args(ProcessArgs)
    async def attach(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        """Stream ``{"attached": true}``, then ``{"stdout": bytes}`` / ``{"stderr": bytes}`` as the process
        writes them, until its output ends."""
        process = self._task(call, args.id).process(args.exec_id)
        held, receive = process.io.attach()
        async with receive:
            await call.send({"attached": True})
            for name, data in held:
                await call.send({name: data})
            async for name, data in receive:
                await call.send({name: data})
        return {}

    # ------------------------------------------------------------------ introspection

    @typed_args(ProcessArgs)
    async def state(self, call: Call, args: ProcessArgs) -> dict[str, Any]:
        task = self._task(call, args.id)
        if args.exec_id:
            return task.process(args.exec_id).to_wire()
        return task.to_wire()

    @typed_args(NoArgs)
    async def list_tasks(self, call: Call, args: NoArgs) -> dict[str, Any]:
        """Every task of this shim, in every namespace."""
        return {"tasks": [task.to_wire() for task in self.tasks.values()], "pid": os.getpid()}

    @typed_args(NoArgs)
    async def shutdown(self, call: Call, args: NoArgs) -> dict[str, Any]:
        """Exit once this answer is sent, if no task is left; otherwise do nothing."""
        if not self.tasks:
            self.stop.set()
        return {"stopping": not self.tasks}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"shim.create": self.create, "shim.start": self.start, "shim.exec": self.exec,
                "shim.kill": self.kill, "shim.wait": self.wait, "shim.delete": self.delete,
                "shim.pause": self.pause, "shim.resume": self.resume, "shim.pids": self.pids,
                "shim.stats": self.stats, "shim.update": self.update, "shim.write": self.write,
                "shim.close_io": self.close_io, "shim.resize": self.resize, "shim.attach": self.attach,
                "shim.state": self.state, "shim.list": self.list_tasks, "shim.shutdown": self.shutdown,
                "shim.events": self.events}


def _describe(task: Task, process: Process) -> str:
    return f"exec process {process.exec_id} of task {task.id}" if process.exec_id else f"task {task.id}"
