"""The ``berth`` commands that run things: ``run``, ``containers create``, ``tasks ...`` and ``logs``.

Attaching (``run`` without ``-d``, ``tasks start``, ``tasks exec``, ``tasks attach``) streams the
process's output over one connection and sends stdin over another; SIGINT, SIGTERM and SIGHUP are
passed on to the task (``ctr``'s ``--sig-proxy``), and with ``-t`` the local terminal is put in raw mode
and its size follows the window. The command's exit status is the process's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from berth.client.sync import Client
from berth.core.errdefs import BerthError, FailedPrecondition, InvalidArgument, NotFound

Handler = Callable[[Client, argparse.Namespace], None]
Add = Callable[..., argparse.ArgumentParser]

_SIGNALS = {name: int(getattr(signal, name)) for name in dir(signal)
            if name.startswith("SIG") and not name.startswith("SIG_") and isinstance(getattr(signal, name), int)}


def parse_signal(text: str) -> int:
    """``9``, ``KILL`` or ``SIGKILL`` as a signal number. Raises: InvalidArgument."""
    if text.isdigit():
        number = int(text)
    else:
        name = text.upper()
        number = _SIGNALS.get(name if name.startswith("SIG") else f"SIG{name}", 0)
    if not 0 < number < 65:
        raise InvalidArgument(f"unknown signal {text!r}")
    return number


def _size(text: str) -> int:
    """``512m``, ``1g``, ``1048576`` as bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise InvalidArgument(f"bad size {text!r} (e.g. 512m, 1g, 1048576)") from None


# ---------------------------------------------------------------------------------------- attaching


class _Attachment:
    """A process's stdio wired to this terminal while it runs."""

    def __init__(self, client: Client, container_id: str, exec_id: str, *, tty: bool, stdin: bool) -> None:
        self.client = client
        self.container_id = container_id
        self.exec_id = exec_id
        self.tty = tty and os.isatty(0)
        self.stdin = stdin
        self._side = Client(client.address, namespace=client.namespace)
        self._restore: list[Any] = []
        self._old_handlers: dict[int, Any] = {}

    def _target(self) -> dict[str, Any]:
        return {"container_id": self.container_id, "exec_id": self.exec_id}

    def run(self, start: Callable[[Client], None]) -> None:
        """Attach, call ``start(side_client)`` once attached, copy output until it ends."""
        items = self.client.stream("tasks.attach", self._target())
        first = next(items, None)
        if first is None or not first.get("attached"):
            raise NotFound(f"cannot attach to {self.container_id}")
        start(self._side)
        with self._terminal(), self._signals():
            if self.stdin:
                threading.Thread(target=self._pump_stdin, daemon=True).start()
            out = sys.stdout.buffer
            err = sys.stderr.buffer
            for item in items:
                for name, data in item.items():
                    stream = err if name == "stderr" else out
                    stream.write(data)
                    stream.flush()

    def _pump_stdin(self) -> None:
        pump = Client(self.client.address, namespace=self.client.namespace)
        try:
            while data := os.read(0, 65536):
                pump.call("tasks.write", {**self._target(), "data": data})
            pump.call("tasks.close_io", self._target())
        except (OSError, BerthError):
            pass  # the process ended (its stdin is closed) or this terminal went away
        finally:
            pump.close()

    @contextlib.contextmanager
    def _terminal(self) -> Iterator[None]:
        if not self.tty:
            yield
            return
        import termios
        import tty

        saved = termios.tcgetattr(0)
        tty.setraw(0)
        try:
            self._resize()
            yield
        finally:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)

    def _resize(self, *_: object) -> None:
        with contextlib.suppress(OSError, BerthError):
            size = os.get_terminal_size(0)
            Client(self.client.address, namespace=self.client.namespace).call(
                "tasks.resize", {**self._target(), "width": size.columns, "height": size.lines})

    def _forward(self, signum: int, frame: object) -> None:
        with contextlib.suppress(BerthError):
            Client(self.client.address, namespace=self.client.namespace).call(
                "tasks.kill", {**self._target(), "signal": signum})

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        wanted: dict[int, Callable[[int, object], None]] = {int(signal.SIGWINCH): self._resize}
        if not self.tty:  # with a terminal, ^C is a byte for the process's own terminal
            for forwarded in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                wanted[int(forwarded)] = self._forward
        for number, handler in wanted.items():
            self._old_handlers[number] = signal.signal(number, handler)
        try:
            yield
        finally:
            for number, old in self._old_handlers.items():
                signal.signal(number, old)

    def close(self) -> None:
        self._side.close()


def _wait_exit(client: Client, container_id: str, exec_id: str = "") -> int:
    result = client.call("tasks.wait", {"container_id": container_id, "exec_id": exec_id})
    return int(result["exit_status"])


def _exit(status: int) -> None:
    if status:
        raise SystemExit(status)


# ---------------------------------------------------------------------------------------- run


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"env": args.env, "cwd": args.cwd, "user": args.user, "mounts": args.mount,
                               "read_only": args.read_only, "privileged": args.privileged,
                               "cap_add": args.cap_add, "cap_drop": args.cap_drop, "seccomp": args.seccomp,
                               "hostname": args.hostname, "tty": args.tty, "network": args.net,
                               "ports": args.publish}
    if args.args:
        options["args"] = args.args
    if args.memory_limit:
        options["memory_limit"] = _size(args.memory_limit)
    if args.cpus:
        options["cpus"] = args.cpus
    if args.pids_limit:
        options["pids_limit"] = args.pids_limit
    return options


def _new_container(client: Client, args: argparse.Namespace, task: dict[str, Any] | None = None) -> None:
    from berth.client.cli import _parse_labels

    request = {"id": args.id, "image": args.image, "snapshotter": args.snapshotter, "runtime": args.runtime,
               "labels": _parse_labels(args.label), "options": _run_options(args)}
    if task is not None:
        request["task"] = task
    client.call("containers.new", request)


def cmd_containers_create(client: Client, args: argparse.Namespace) -> None:
    _new_container(client, args)
    sys.stdout.write(args.id + "\n")


def _remove_container(client: Client, container_id: str) -> None:
    with contextlib.suppress(NotFound):
        client.call("tasks.delete", {"container_id": container_id})
    client.call("containers.delete", {"id": container_id, "snapshot_cleanup": True})


def cmd_run(client: Client, args: argparse.Namespace) -> None:
    stdin = not args.detach
    created = False
    try:
        # The container and its task in one call, created and started by one runtime process; what the
        # task writes before the attach below is held for it. If the task fails, the daemon removes the
        # container again.
        _new_container(client, args, {"stdio": {"stdin": stdin, "terminal": args.tty, "hold": stdin},
                                      "start": True})
        created = True
        if args.detach:
            sys.stdout.write(args.id + "\n")
            return
        attachment = _Attachment(client, args.id, "", tty=args.tty, stdin=stdin)
        try:
            attachment.run(lambda side: None)
        finally:
            attachment.close()
        status = _wait_exit(client, args.id)
    except BaseException:
        if args.rm and created:
            with contextlib.suppress(BerthError):
                client.call("tasks.kill", {"container_id": args.id, "signal": 9, "all": True})
                _wait_exit(client, args.id)
                _remove_container(client, args.id)
        raise
    if args.rm:  # the task, then the container and its snapshot, in one call
        client.call("tasks.delete", {"container_id": args.id, "remove_container": True})
    _exit(status)


# ---------------------------------------------------------------------------------------- tasks


def cmd_tasks_ls(client: Client, args: argparse.Namespace) -> None:
    tasks = client.call("tasks.list", {})["tasks"]
    if args.quiet:
        sys.stdout.writelines(t["id"] + "\n" for t in tasks)
        return
    if args.format == "json":
        from berth.client.cli import _print_json

        _print_json(tasks)
        return
    from berth.client.cli import _print_table

    _print_table(["TASK", "PID", "STATUS", "RUNTIME"],
                 [[t["id"], str(t["pid"]), t["status"].upper() if t["status"] != "stopped" else
                   f"STOPPED ({t['exit_status']})", t.get("runtime", "-")] for t in tasks])


def cmd_tasks_start(client: Client, args: argparse.Namespace) -> None:
    try:
        state = client.call("tasks.get", {"container_id": args.id})["task"]
    except NotFound:
        client.call("tasks.create", {"container_id": args.id,
                                     "stdio": {"stdin": not args.detach, "terminal": args.tty}})
        state = {"status": "created"}
    if state["status"] != "created":
        raise FailedPrecondition(f"task {args.id} is {state['status']}, not created")
    if args.detach:
        client.call("tasks.start", {"container_id": args.id})
        return
    attachment = _Attachment(client, args.id, "", tty=args.tty, stdin=True)
    try:
        attachment.run(lambda side: side.call("tasks.start", {"container_id": args.id}))
    finally:
        attachment.close()
    _exit(_wait_exit(client, args.id))


def cmd_tasks_kill(client: Client, args: argparse.Namespace) -> None:
    client.call("tasks.kill", {"container_id": args.id, "signal": parse_signal(args.signal), "all": args.all,
                               "exec_id": args.exec_id})


def cmd_tasks_rm(client: Client, args: argparse.Namespace) -> None:
    for container_id in args.ids:
        if args.force:
            with contextlib.suppress(NotFound):
                client.call("tasks.kill", {"container_id": container_id, "signal": 9, "all": True})
            with contextlib.suppress(NotFound):
                _wait_exit(client, container_id)
        result = client.call("tasks.delete", {"container_id": container_id})
        sys.stdout.write(f"{container_id}\t{result['exit_status']}\n")


def cmd_tasks_exec(client: Client, args: argparse.Namespace) -> None:
    container = client.call("containers.get", {"id": args.id})["container"]
    process = dict(container["spec"].get("process") or {})
    process["args"] = args.args
    process["terminal"] = args.tty
    if args.cwd:
        process["cwd"] = args.cwd
    if args.env:
        process["env"] = list(process.get("env") or []) + args.env
    if args.user:
        uid, _, gid = args.user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise InvalidArgument("--user takes UID[:GID] for exec")
        process["user"] = {"uid": int(uid), "gid": int(gid or uid)}
    stdio = {"stdin": not args.detach, "terminal": args.tty}
    client.call("tasks.exec", {"container_id": args.id, "exec_id": args.exec_id, "process": process, "stdio": stdio})
    try:
        if args.detach:
            client.call("tasks.start", {"container_id": args.id, "exec_id": args.exec_id})
            return
        attachment = _Attachment(client, args.id, args.exec_id, tty=args.tty, stdin=True)
        try:
            attachment.run(lambda side: side.call("tasks.start", {"container_id": args.id,
                                                                   "exec_id": args.exec_id}))
        finally:
            attachment.close()
        status = _wait_exit(client, args.id, args.exec_id)
    finally:
        if not args.detach:
            with contextlib.suppress(BerthError):
                client.call("tasks.delete", {"container_id": args.id, "exec_id": args.exec_id})
    _exit(status)


def cmd_tasks_attach(client: Client, args: argparse.Namespace) -> None:
    state = client.call("tasks.get", {"container_id": args.id})["task"]
    attachment = _Attachment(client, args.id, "", tty=bool(state.get("terminal")), stdin=bool(state.get("stdin")))
    try:
        attachment.run(lambda side: None)
    finally:
        attachment.close()
    _exit(_wait_exit(client, args.id))


def cmd_tasks_ps(client: Client, args: argparse.Namespace) -> None:
    from berth.client.cli import _print_table

    processes = client.call("tasks.pids", {"container_id": args.id})["processes"]
    _print_table(["PID", "EXEC"], [[str(p["pid"]), p["exec_id"] or "-"] for p in processes])


def cmd_tasks_pause(client: Client, args: argparse.Namespace) -> None:
    client.call("tasks.pause", {"container_id": args.id})


def cmd_tasks_resume(client: Client, args: argparse.Namespace) -> None:
    client.call("tasks.resume", {"container_id": args.id})


def cmd_tasks_metrics(client: Client, args: argparse.Namespace) -> None:
    from berth.client.cli import _print_json, _print_table

    metrics = client.call("tasks.metrics", {"container_id": args.id})["metrics"]
    if args.format == "json":
        _print_json(metrics)
        return
    memory = metrics.get("memory") or {}
    usage = memory.get("usage") or {}
    cpu = (metrics.get("cpu") or {}).get("usage") or {}
    pids = metrics.get("pids") or {}
    rows = [["memory.usage", str(usage.get("usage", "-"))], ["memory.limit", str(usage.get("limit", "-"))],
            ["memory.max_usage", str(usage.get("max", "-"))], ["cpu.usage_ns", str(cpu.get("total", "-"))],
            ["pids.current", str(pids.get("current", "-"))], ["pids.limit", str(pids.get("limit", "-"))]]
    _print_table(["METRIC", "VALUE"], rows)


def cmd_logs(client: Client, args: argparse.Namespace) -> None:
    out = sys.stdout.buffer
    for item in client.stream("tasks.logs", {"container_id": args.id, "follow": args.follow}):
        out.write(item["data"])
        out.flush()


# ---------------------------------------------------------------------------------------- parser


def _add_run_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--runtime", default="", help="runtime plugin: runc or builtin (default: the daemon's)")
    command.add_argument("--snapshotter", default="", help="snapshotter of the container's root filesystem")
    command.add_argument("--tty", "-t", action="store_true", help="give the process a terminal")
    command.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set an environment variable")
    command.add_argument("--mount", action="append", default=[], metavar="SPEC",
                         help="type=bind,src=/host,dst=/ctr,options=rbind:ro")
    command.add_argument("--cwd", default="", help="working directory in the container")
    command.add_argument("--user", "-u", default="", help="USER[:GROUP] (names from the image) or UID[:GID]")
    command.add_argument("--memory-limit", default="", metavar="SIZE", help="e.g. 256m")
    command.add_argument("--cpus", type=float, default=0.0, help="CPUs the container may use (e.g. 0.5)")
    command.add_argument("--pids-limit", type=int, default=0, help="most processes the container may have")
    command.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    command.add_argument("--privileged", action="store_true", help="all capabilities and devices, no confinement")
    command.add_argument("--cap-add", action="append", default=[], metavar="CAP")
    command.add_argument("--cap-drop", action="append", default=[], metavar="CAP")
    command.add_argument("--seccomp", action="store_true", help="apply the default seccomp profile")
    command.add_argument("--hostname", default="", help="default: the container id")
    command.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a container label")
    command.add_argument("--net", default="", metavar="MODE",
                         help="none (default: only lo), host, container:ID, or a network's name (bridge)")
    command.add_argument("--publish", "-p", action="append", default=[], metavar="[IP:]HOST:CTR[/PROTO]",
                         help="publish a port of a container on a named network (host IP default 127.0.0.1)")
    command.add_argument("image", metavar="IMAGE")
    command.add_argument("id", metavar="ID")
    command.add_argument("args", nargs=argparse.REMAINDER, metavar="CMD", help="the command (default: the image's)")


def add_commands(commands: Any, add: Add, want: Callable[..., bool]) -> None:
    """Add ``run``, ``tasks`` and ``logs`` to ``commands`` (see ``client.cli._parser``)."""
    run = add(commands, "run", cmd_run, "run a container from an image (exit status: its command's)")
    run.add_argument("--rm", action="store_true", help="remove the container when it exits")
    run.add_argument("--detach", "-d", action="store_true", help="start it and return")
    _add_run_options(run)

    tasks = commands.add_parser("tasks", aliases=["task", "t"], help="manage tasks (running containers)")
    if want("tasks", "task", "t"):
        sub = tasks.add_subparsers(dest="action", metavar="ACTION", required=True)
        ls = add(sub, "ls", cmd_tasks_ls, "list tasks", ["list"])
        ls.add_argument("--quiet", "-q", action="store_true")
        ls.add_argument("--format", choices=["table", "json"], default="table")
        start = add(sub, "start", cmd_tasks_start, "start a container's task (attached unless -d)")
        start.add_argument("--detach", "-d", action="store_true")
        start.add_argument("--tty", "-t", action="store_true")
        start.add_argument("id")
        kill = add(sub, "kill", cmd_tasks_kill, "signal a task")
        kill.add_argument("--signal", "-s", default="SIGTERM", help="name or number (default SIGTERM)")
        kill.add_argument("--all", "-a", action="store_true", help="every process of the container")
        kill.add_argument("--exec-id", default="", help="signal this exec process instead")
        kill.add_argument("id")
        rm = add(sub, "rm", cmd_tasks_rm, "delete stopped tasks (prints the exit status)", ["remove", "delete"])
        rm.add_argument("--force", "-f", action="store_true", help="kill it first")
        rm.add_argument("ids", nargs="+", metavar="ID")
        ex = add(sub, "exec", cmd_tasks_exec, "run another process in a task")
        ex.add_argument("--exec-id", required=True)
        ex.add_argument("--tty", "-t", action="store_true")
        ex.add_argument("--detach", "-d", action="store_true")
        ex.add_argument("--cwd", default="")
        ex.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
        ex.add_argument("--user", "-u", default="", help="UID[:GID]")
        ex.add_argument("id")
        ex.add_argument("args", nargs=argparse.REMAINDER, metavar="CMD")
        attach = add(sub, "attach", cmd_tasks_attach, "attach to a task's output (and stdin)")
        attach.add_argument("id")
        for name, handler, help_text in (("ps", cmd_tasks_ps, "list a task's processes"),
                                         ("pause", cmd_tasks_pause, "freeze a task"),
                                         ("resume", cmd_tasks_resume, "thaw a task")):
            add(sub, name, handler, help_text).add_argument("id")
        metrics = add(sub, "metrics", cmd_tasks_metrics, "a task's cgroup statistics", ["stats"])
        metrics.add_argument("--format", choices=["table", "json"], default="table")
        metrics.add_argument("id")

    logs = add(commands, "logs", cmd_logs, "print a container's output (its log)", ["log"])
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the task stops")
    logs.add_argument("id")


def add_container_create(sub: Any, add: Add) -> None:
    """``containers create`` (made from an image, as ``run`` does, without starting it)."""
    _add_run_options(add(sub, "create", cmd_containers_create, "make a container from an image"))
