"""The runtime's operations on containers: the library API the ``berth-runtime`` command and a runtime
plugin call. Every function takes the state ``root`` (one directory per container, see :mod:`.state`) and
raises :mod:`berth.core.errdefs` errors: NotFound (no such container), AlreadyExists (id taken),
InvalidArgument (bad bundle, spec or arguments), FailedPrecondition (wrong state, or the system refused).

Lifecycle (OCI runtime spec): :func:`create` leaves the init blocked on the exec fifo with every
namespace, mount, cgroup and privilege in place; :func:`start` releases it; :func:`kill` signals it;
:func:`delete` removes what is left. :func:`run` is create + start (+ wait and delete in the foreground),
:func:`exec` runs another process inside a created or running container.

``create``, ``run`` and ``exec`` make the calling process a child subreaper: the container process becomes
its child when stage 1 exits, so a failure can always be reaped, and a foreground ``run``/``exec`` can
wait for it. Once the caller exits the process passes, as with runc, to the caller's own subreaper (a
shim) or to init.
"""

from __future__ import annotations

import os
import select
import sys
import time

from berth.core.errdefs import FailedPrecondition, InvalidArgument, NotFound
from berth.runtimes.builtin import signals
from berth.runtimes.builtin.cgroups import Cgroups
from berth.runtimes.builtin.state import DEFAULT_ROOT, Container, process_start_time, rfc3339

TYPE_CHECKING = False  # not typing's: importing typing costs every runtime call ~5 ms
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

    from berth.runtimes.builtin.bundle import Bundle

    Warn = Callable[[str], None]

__all__ = [
    "DEFAULT_ROOT", "create", "delete", "exec", "kill", "list_containers", "pause", "pids", "resume", "run", "start",
    "state", "stats", "update",
]


def _stderr_warn(message: str) -> None:
    sys.stderr.write(f"berth-runtime: warning: {message}\n")


def _prepare_imports(spec: dict[str, Any], process: dict[str, Any]) -> Any:
    """Import what the container process will need after its pivot, and build the seccomp filter."""
    if spec.get("hooks"):
        from berth.runtimes.builtin import hooks  # noqa: F401
    if process.get("terminal"):
        from berth.runtimes.builtin import console  # noqa: F401
    seccomp = (spec.get("linux") or {}).get("seccomp")
    if seccomp:
        from berth.runtimes.builtin.security import build_seccomp

        return build_seccomp(seccomp, bool(process.get("noNewPrivileges")))
    return None


def _write_pid_file(path: str | None, pid: int) -> None:
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.rename(tmp, path)


def _hook_state(container: Container, status: str, pid: int) -> dict[str, Any]:
    from berth.runtimes.builtin.hooks import hook_state  # only with hooks: it imports json and subprocess

    return hook_state(container.id, status, pid, container.bundle, container.record["spec"])


def _kill_all(cgroups: Cgroups | None, pids: Iterable[int] = ()) -> None:
    """SIGKILL ``pids`` and everything in ``cgroups``, then wait (bounded) until they are gone."""
    victims = set(pids) | set(cgroups.pids() if cgroups else ())
    for pid in victims:
        try:
            os.kill(pid, signals.SIGKILL)
        except ProcessLookupError:
            continue
    if cgroups is not None and cgroups.is_frozen():
        cgroups.freeze(False)
    for pid in victims:
        _wait_gone(pid, 10.0)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (zombies count as gone; ours are reaped). False on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready = select.select([pidfd], [], [], timeout)[0]
    finally:
        os.close(pidfd)
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return bool(ready)


def create(bundle: str, container_id: str, root: str = DEFAULT_ROOT, *, pid_file: str | None = None,
           console_socket: str | None = None, no_pivot: bool = False, no_new_keyring: bool = False,
           preserve_fds: int = 0) -> int:
    """Create container ``container_id`` from the bundle directory ``bundle``; return the init's pid.

    On return the init is blocked on the exec fifo after every setup step and the ``prestart``,
    ``createRuntime`` and ``createContainer`` hooks; on failure nothing is left: no process, cgroup,
    mount or state directory.
    """
    from berth.runtimes.builtin.bundle import load_bundle
    checked = load_bundle(bundle)
    return _create(checked, container_id, root, pid_file=pid_file, console_socket=console_socket,
                   no_pivot=no_pivot, no_new_keyring=no_new_keyring, preserve_fds=preserve_fds)


def _create(checked: Bundle, container_id: str, root: str, *, pid_file: str | None, console_socket: str | None,
            no_pivot: bool, no_new_keyring: bool, preserve_fds: int) -> int:
    spec, process = checked.spec, checked.process
    if process.get("terminal") and not console_socket:
        raise InvalidArgument("process.terminal is set: a --console-socket is required")
    linux_spec = checked.linux
    cgroups = Cgroups.plan(linux_spec.get("cgroupsPath") or "", container_id)
    record: dict[str, Any] = {
        "bundle": checked.path, "rootfs": checked.rootfs, "spec": spec, "pid": 0, "start_time": None,
        "created": rfc3339(time.time()), "creator_pid": os.getpid(),
        "creator_start_time": process_start_time(os.getpid()), "cgroups": cgroups.to_record(),
        "no_pivot": (no_pivot or bool((spec.get("root") or {}).get("noPivotRoot"))
                     or bool(linux_spec.get("noPivotRoot"))),
    }
    container = Container.new(root, container_id, record)
    fds: list[int] = []
    pid = 0
    try:
        os.mkfifo(container.fifo, 0o622)
        os.chmod(container.fifo, 0o622)  # past the umask: an init that is not root writes to it after setuid
        fifo_fd = os.open(container.fifo, os.O_PATH | os.O_CLOEXEC)
        fds.append(fifo_fd)
        cgroups.create()
        cgroups.apply(linux_spec.get("resources") or {}, spec)
        cgroups.start_warm_up()  # the grace period passes during the imports, the fork and the mounts
        record["cgroups"] = cgroups.to_record()
        container.save()
        from berth.runtimes.builtin import linux
        from berth.runtimes.builtin.process import Launch, launch

        seccomp = _prepare_imports(spec, process)
        console_fd = -1
        if console_socket:
            from berth.runtimes.builtin.console import connect_console_socket

            console_fd = connect_console_socket(console_socket)
            fds.append(console_fd)
        runtime_hooks = None
        if checked.hooks("prestart") or checked.hooks("createRuntime"):
            from berth.runtimes.builtin.hooks import run_hooks

            def runtime_hooks(init_pid: int) -> None:
                state_now = _hook_state(container, "creating", init_pid)
                run_hooks("prestart", checked.hooks("prestart"), state_now)
                run_hooks("createRuntime", checked.hooks("createRuntime"), state_now)

        linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
        pid = launch(Launch(container_id=container_id, spec=spec, process=process, bundle=checked.path,
                            rootfs=checked.rootfs, cgroups=cgroups, init=True, namespaces=checked.namespaces(),
                            fifo_fd=fifo_fd, console_fd=console_fd, no_pivot=record["no_pivot"],
                            no_new_keyring=no_new_keyring, preserve_fds=preserve_fds, seccomp=seccomp,
                            runtime_hooks=runtime_hooks))
        record.update(pid=pid, start_time=process_start_time(pid))
        del record["creator_pid"], record["creator_start_time"]
        container.save()
        _write_pid_file(pid_file, pid)
    except BaseException:
        _kill_all(cgroups, [pid] if pid else [])
        try:
            cgroups.destroy()
        finally:
            container.remove()
        raise
    finally:
        cgroups.finish_warm_up()
        for fd in fds:
            os.close(fd)
    return pid


def start(container_id: str, root: str = DEFAULT_ROOT, *, warn: Warn = _stderr_warn) -> None:
    """Release a created container's init to execve the user's program; then run ``poststart`` hooks
    (a failing one is a warning, as the spec says)."""
    container = Container.load(root, container_id)
    status = container.status()
    if status != "created":
        raise FailedPrecondition(f"cannot start container {container_id}: it is {status}, not created")
    fd = os.open(container.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while True:
            select.select([fd], [], [], 0.05)
            try:
                if os.read(fd, 1):
                    break
            except BlockingIOError:
                pass
            if not container.alive():
                raise FailedPrecondition(f"container {container_id}: the init exited before it was started")
    finally:
        os.close(fd)
    os.unlink(container.fifo)
    hooks = (container.record["spec"].get("hooks") or {}).get("poststart")
    if hooks:
        from berth.runtimes.builtin.hooks import HookFailed, run_hooks

        try:
            run_hooks("poststart", hooks, _hook_state(container, "running", container.pid))
        except HookFailed as exc:
            warn(exc.message)


def state(container_id: str, root: str = DEFAULT_ROOT) -> dict[str, Any]:
    """The OCI state of the container (status read from the live process)."""
    return Container.load(root, container_id).oci_state()


def list_containers(root: str = DEFAULT_ROOT) -> list[dict[str, Any]]:
    """The OCI state of every container under ``root``."""
    return [container.oci_state() for container in Container.list(root)]


def kill(container_id: str, sig: int, root: str = DEFAULT_ROOT, *, all_processes: bool = False) -> None:
    """Send ``sig`` to the init (``all_processes``: to every process in the container's cgroup).
    A stopped container is FailedPrecondition "container not running" (containerd's shim matches that)."""
    container = Container.load(root, container_id)
    status = container.status()
    cgroups = container.cgroups
    if all_processes and cgroups is not None:
        targets = cgroups.pids()
        if not targets and status == "stopped":
            raise FailedPrecondition(f"container {container_id}: container not running")
    elif status == "stopped":
        raise FailedPrecondition(f"container {container_id}: container not running")
    else:
        targets = [container.pid]
    for pid in targets:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
    if sig == signals.SIGKILL and cgroups is not None and cgroups.is_frozen():
        cgroups.freeze(False)


def delete(container_id: str, root: str = DEFAULT_ROOT, *, force: bool = False, warn: Warn = _stderr_warn) -> None:
    """Remove a stopped (or created) container: its processes, cgroups and state, then ``poststop``
    hooks. A running or paused one is refused unless ``force`` (then it is killed first)."""
    container = Container.load(root, container_id)
    status = container.status()
    if status in ("running", "paused", "creating") and not force:
        raise FailedPrecondition(f"cannot delete container {container_id}: it is {status} (use --force)")
    cgroups = container.cgroups
    _kill_all(cgroups, [container.pid] if status != "stopped" else [])
    if cgroups is not None:
        cgroups.destroy()
    hooks = (container.record["spec"].get("hooks") or {}).get("poststop")
    if hooks:
        from berth.runtimes.builtin.hooks import HookFailed, run_hooks

        try:
            run_hooks("poststop", hooks, _hook_state(container, "stopped", 0))
        except HookFailed as exc:
            warn(exc.message)
    container.remove()


def pause(container_id: str, root: str = DEFAULT_ROOT) -> None:
    """Freeze every process of a running container."""
    container = Container.load(root, container_id)
    status = container.status()
    if status != "running":
        raise FailedPrecondition(f"cannot pause container {container_id}: it is {status}")
    _cgroups_of(container).freeze(True)


def resume(container_id: str, root: str = DEFAULT_ROOT) -> None:
    """Thaw a paused container."""
    container = Container.load(root, container_id)
    status = container.status()
    if status != "paused":
        raise FailedPrecondition(f"cannot resume container {container_id}: it is {status}, not paused")
    _cgroups_of(container).freeze(False)


def _cgroups_of(container: Container) -> Cgroups:
    cgroups = container.cgroups
    if cgroups is None:
        raise FailedPrecondition(f"container {container.id} has no cgroups")
    return cgroups


def pids(container_id: str, root: str = DEFAULT_ROOT) -> list[int]:
    """The pids (in the runtime's pid namespace) of every process in the container."""
    return _cgroups_of(Container.load(root, container_id)).pids()


def stats(container_id: str, root: str = DEFAULT_ROOT) -> dict[str, Any]:
    """Resource usage from the container's cgroups (``runc events --stats`` data)."""
    container = Container.load(root, container_id)
    if container.status() == "stopped":
        raise FailedPrecondition(f"container {container_id}: container not running")
    return _cgroups_of(container).stats()


def update(container_id: str, resources: dict[str, Any], root: str = DEFAULT_ROOT) -> None:
    """Apply ``linux.resources`` fields to a live container's cgroups and record them in its spec."""
    container = Container.load(root, container_id)
    if container.status() == "stopped":
        raise FailedPrecondition(f"cannot update container {container_id}: it is stopped")
    spec = container.record["spec"]
    current = (spec.setdefault("linux", {})).setdefault("resources", {})
    for key, value in resources.items():
        if isinstance(value, dict) and isinstance(current.get(key), dict):
            current[key].update(value)
        else:
            current[key] = value
    _cgroups_of(container).apply(resources, spec if "devices" in resources else None)
    container.save()


def exec_process(container_id: str, process: dict[str, Any], root: str = DEFAULT_ROOT, *, detach: bool = False,
         pid_file: str | None = None, console_socket: str | None = None, preserve_fds: int = 0) -> int:
    """Run ``process`` (an OCI process object) in the container's namespaces, cgroups and seccomp
    profile. Detached: return its pid once it has called execve. Otherwise wait and return its exit
    status (128 + signal when killed), forwarding the signals the caller receives."""
    from berth.runtimes.builtin.bundle import check_process
    container = Container.load(root, container_id)
    status = container.status()
    if status not in ("created", "running"):
        raise FailedPrecondition(f"cannot exec in container {container_id}: it is {status}")
    check_process(process)
    if process.get("terminal") and not console_socket:
        raise InvalidArgument("process.terminal is set: a --console-socket is required")
    cgroups = container.cgroups
    if cgroups is not None:
        cgroups.start_warm_up()  # see Cgroups.start_warm_up; finished below, whatever happens
    fds: list[int] = []
    try:
        from berth.runtimes.builtin import linux
        from berth.runtimes.builtin.process import Launch, launch, namespace_files

        spec = container.spec
        seccomp = _prepare_imports({"linux": spec.get("linux")}, process)
        try:
            join = namespace_files(container.pid, spec)
        except FileNotFoundError:
            raise NotFound(f"container {container_id}: its init has exited") from None
        fds.extend(join.values())
        root_fd = -1
        if container.record.get("no_pivot"):
            root_fd = os.open(f"/proc/{container.pid}/root", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
            fds.append(root_fd)
        console_fd = -1
        if console_socket:
            from berth.runtimes.builtin.console import connect_console_socket

            console_fd = connect_console_socket(console_socket)
            fds.append(console_fd)
        if not container.alive():
            raise FailedPrecondition(f"cannot exec in container {container_id}: it has stopped")
        linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
        pid = launch(Launch(container_id=container_id, spec=spec, process=process, bundle=container.bundle,
                            rootfs=container.record.get("rootfs", ""), cgroups=cgroups, init=False,
                            join_fds=join, root_fd=root_fd, console_fd=console_fd, preserve_fds=preserve_fds,
                            seccomp=seccomp))
    finally:
        if cgroups is not None:
            cgroups.finish_warm_up()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                continue
    _write_pid_file(pid_file, pid)
    if detach:
        return pid
    return wait_forwarding(pid)


def run(bundle: str, container_id: str, root: str = DEFAULT_ROOT, *, detach: bool = False,
        pid_file: str | None = None, console_socket: str | None = None, no_pivot: bool = False,
        no_new_keyring: bool = False, preserve_fds: int = 0, warn: Warn = _stderr_warn) -> int:
    """create + start. Detached: return the init's pid. Otherwise wait for the init, delete the
    container and return its exit status (128 + signal when killed)."""
    from berth.runtimes.builtin.bundle import load_bundle
    checked = load_bundle(bundle)
    pid = _create(checked, container_id, root, pid_file=pid_file, console_socket=console_socket,
                  no_pivot=no_pivot, no_new_keyring=no_new_keyring, preserve_fds=preserve_fds)
    try:
        start(container_id, root, warn=warn)
    except BaseException:
        delete(container_id, root, force=True, warn=warn)
        raise
    if detach:
        return pid
    try:
        status = wait_forwarding(pid)
    finally:
        delete(container_id, root, force=True, warn=warn)
    return status


_NOT_FORWARDED = frozenset((signals.SIGKILL, signals.SIGSTOP, signals.SIGCHLD))


def wait_forwarding(pid: int) -> int:
    """Wait for our child ``pid``, passing on every signal we receive; reap other orphans on the way."""
    from berth.runtimes.builtin.process import wait_child
    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    previous = {}
    for signum in signals.valid_signals():
        if signum in _NOT_FORWARDED or signum >= signals.SIGRTMIN:
            continue
        try:
            previous[signum] = signals.signal(signum, forward)
        except (OSError, ValueError):
            continue
    try:
        while True:
            try:
                reaped, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return wait_child(pid)
            if reaped == pid:
                if os.WIFSIGNALED(status):
                    return 128 + os.WTERMSIG(status)
                return os.waitstatus_to_exitcode(status)
    finally:
        for signum, handler in previous.items():
            signals.signal(signum, handler)
