"""Starting a container process: the container's init (``create``) or an extra process (``exec``).

Three processes take part, as in runc. The *runtime* (the caller of :func:`launch`) forks a *stage-1*
child, which joins the namespaces given by path (or, for ``exec``, those of the container's init),
unshares the new ones and forks the *container process* (pid 1 of a new pid namespace). Stage 1 reports
that pid and exits. The runtime moves the container process into its cgroups, sets its rlimits and
``oom_score_adj``, and acknowledges; meanwhile an init does its mounts, since a cgroup migration may wait
for an RCU grace period (5-15 ms). Only a new cgroup namespace needs its cgroups first: then stage 1
joins them before it unshares. The container process finishes setting itself up after the
acknowledgement and, for an init, reports ``ready`` and blocks opening the exec fifo until ``start``; an
``exec`` process simply calls execve, which closes the channel. The runtime also writes the uid/gid maps
of a new user namespace (asked by stage 1) and runs the ``prestart`` and ``createRuntime`` hooks when the
init asks (after its mounts, before its pivot).

The channel is a pair of close-on-exec pipes carrying one JSON object per line. A failure in either
child travels back as ``{"type": "error", "code", "message"}`` and is raised in the runtime as the
matching :mod:`berth.core.errdefs` error; whatever was started is killed and reaped before that.

Everything the container process needs after ``pivot_root`` is imported before the fork: the host's
Python library is out of reach once the root has changed.
"""

from __future__ import annotations

import os

from berth.core.errdefs import BerthError, FailedPrecondition, Internal, error_from_wire
from berth.runtimes.builtin import linux, quickjson, signals
from berth.runtimes.builtin.bundle import NAMESPACE_TYPES
from berth.runtimes.builtin.cgroups import Cgroups
from berth.runtimes.builtin.rootfs import Mounter, finalize_rootfs, pivot
from berth.runtimes.builtin.security import drop_privileges

TYPE_CHECKING = False  # not typing's: importing typing costs every runtime call ~5 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["Launch", "launch", "wait_child"]

_CLONE_FLAGS = {
    "pid": linux.CLONE_NEWPID, "network": linux.CLONE_NEWNET, "mount": linux.CLONE_NEWNS, "ipc": linux.CLONE_NEWIPC,
    "uts": linux.CLONE_NEWUTS, "user": linux.CLONE_NEWUSER, "cgroup": linux.CLONE_NEWCGROUP,
    "time": linux.CLONE_NEWTIME,
}
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CLOSE_RANGE_CLOEXEC = 4


class Launch:
    """What one container process needs: the spec, the process to run, and how to get there."""

    def __init__(self, *, container_id: str, spec: dict[str, Any], process: dict[str, Any], bundle: str,
                 rootfs: str, cgroups: Cgroups | None, init: bool, namespaces: dict[str, str] | None = None,
                 join_fds: dict[str, int] | None = None, fifo_fd: int = -1, console_fd: int = -1,
                 root_fd: int = -1, no_pivot: bool = False, no_new_keyring: bool = False, preserve_fds: int = 0,
                 seccomp: Any = None, runtime_hooks: Callable[[int], None] | None = None) -> None:
        self.id = container_id
        self.spec = spec
        self.process = process
        self.bundle = bundle
        self.rootfs = rootfs
        self.cgroups = cgroups
        self.init = init
        self.namespaces = namespaces or {}  # init: type -> path to join or "" for new
        self.join_fds = join_fds or {}  # exec: type -> an open nsfs descriptor of the init's namespace
        self.fifo_fd = fifo_fd
        self.console_fd = console_fd
        self.root_fd = root_fd
        self.no_pivot = no_pivot
        self.no_new_keyring = no_new_keyring
        self.preserve_fds = preserve_fds
        self.seccomp = seccomp
        self.runtime_hooks = runtime_hooks


class _Channel:
    """JSON lines over a read and a write descriptor."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        self._buffer = b""

    def send(self, **message: Any) -> None:
        data = quickjson.dumps(message).encode() + b"\n"
        while data:
            data = data[os.write(self.wfd, data):]

    def recv(self) -> dict[str, Any] | None:
        while b"\n" not in self._buffer:
            chunk = os.read(self.rfd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = quickjson.loads(line.decode())
        if not isinstance(message, dict):
            raise Internal(f"bad message on the container channel: {line!r}")
        return message

    def expect_ok(self) -> dict[str, Any]:
        message = self.recv()
        if message is None or message.get("type") != "ok":
            os._exit(1)  # the runtime has gone or failed: it cleans up, nothing to say
        return message

    def close(self) -> None:
        """Close both ends; a later send raises OSError (EBADF) instead of writing to a reused number."""
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                continue
        self.rfd = self.wfd = -1


def wait_child(pid: int) -> int:
    """Reap child ``pid``; its exit status, or 128 + the signal that killed it."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return 255
        except InterruptedError:
            continue
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
        return os.waitstatus_to_exitcode(status)


def launch(ctx: Launch) -> int:
    """Start the container process of ``ctx`` and return its pid (in the caller's pid namespace) once it
    is ready (an init, blocked on the exec fifo) or has called execve (an exec process)."""
    if ctx.cgroups is not None and _stage1_joins_cgroups(ctx):
        ctx.cgroups.finish_warm_up()  # stage 1 joins: no thread may be left behind in a fork
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    stage1 = os.fork()
    if stage1 == 0:
        os.close(down_w)
        os.close(up_r)
        _child_main(ctx, _Channel(down_r, up_w))
    os.close(down_r)
    os.close(up_w)
    chan = _Channel(up_r, down_w)
    pid = 0
    stage1_reaped = False
    try:
        while True:
            message = chan.recv()
            if message is None:
                break
            kind = message.get("type")
            if kind == "userns":
                _write_id_maps(stage1, ctx.spec)
                chan.send(type="ok")
            elif kind == "pid":
                pid = int(message["pid"])
                wait_child(stage1)
                stage1_reaped = True
                try:
                    if ctx.cgroups is not None and not _stage1_joins_cgroups(ctx):
                        ctx.cgroups.finish_warm_up()
                        ctx.cgroups.add(pid)
                    _apply_limits(pid, ctx.process)
                    chan.send(type="ok", pid=pid)
                except (BerthError, OSError):
                    reported = _reported_error(chan, pid)  # the container process failed first: its reason
                    if reported is not None:
                        raise reported from None
                    raise
            elif kind == "hooks" and ctx.runtime_hooks is not None:
                ctx.runtime_hooks(pid)
                chan.send(type="ok")
            elif kind == "ready":
                break
            elif kind == "error":
                raise error_from_wire({"code": message.get("code"), "message": message.get("message")})
            else:
                raise Internal(f"unexpected message from the container process: {message!r}")
        if pid == 0:
            raise FailedPrecondition("the container process exited before it reported its pid")
        if message is None and ctx.init:
            raise FailedPrecondition("the container init exited before it was ready")
    except BaseException:
        for victim in (pid, stage1):
            if victim:
                try:
                    os.kill(victim, signals.SIGKILL)
                except ProcessLookupError:
                    continue
        if pid:
            wait_child(pid)  # ours once stage 1 is gone: the runtime is a subreaper
        raise
    finally:
        chan.close()
        if not stage1_reaped:
            wait_child(stage1)
    return pid


def _reported_error(chan: _Channel, pid: int) -> BerthError | None:
    """The error the container process ``pid`` reported, if it did: it is killed and the channel read to
    its end (the process mounts while the runtime joins it to its cgroups, so a failure of its own can
    be the reason why the runtime could not reach it)."""
    try:
        os.kill(pid, signals.SIGKILL)
    except ProcessLookupError:
        pass
    while (message := chan.recv()) is not None:
        if message.get("type") == "error":
            return error_from_wire({"code": message.get("code"), "message": message.get("message")})
    return None


def _write_id_maps(pid: int, spec: dict[str, Any]) -> None:
    linux_spec = spec.get("linux") or {}
    for key, name in (("uidMappings", "uid_map"), ("gidMappings", "gid_map")):
        lines = "".join(f"{m['containerID']} {m['hostID']} {m['size']}\n" for m in linux_spec.get(key) or ())
        try:
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(lines)
        except OSError as exc:
            raise FailedPrecondition(f"cannot write the user namespace's {name}: {exc.strerror}") from None


def _apply_limits(pid: int, process: dict[str, Any]) -> None:
    """rlimits and oom_score_adj, set from outside: raising a hard limit needs privileges in the host's
    user namespace, which the container process may no longer have."""
    rlimits = process.get("rlimits") or ()
    if rlimits:
        import resource

        for rlimit in rlimits:
            number = getattr(resource, rlimit["type"], None)
            if number is None:
                raise FailedPrecondition(f"unknown rlimit {rlimit['type']}")
            try:
                resource.prlimit(pid, number, (rlimit["soft"], rlimit["hard"]))
            except (OSError, ValueError) as exc:
                raise FailedPrecondition(f"cannot set {rlimit['type']} to {rlimit['soft']}:{rlimit['hard']}: "
                                         f"{exc}") from None
    score = process.get("oomScoreAdj")
    if score is not None:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(score))


def _report(chan: _Channel, exc: BaseException) -> None:
    if isinstance(exc, BerthError):
        code, message = exc.code, exc.message
    elif isinstance(exc, OSError):
        code, message = "failed_precondition", str(exc.strerror or exc)
        if exc.filename is not None and str(exc.filename) not in message:
            message += f": {exc.filename}"
    else:
        code, message = "internal", f"{type(exc).__name__}: {exc}"
    try:
        chan.send(type="error", code=code, message=message)
    except OSError:  # after "ready" the runtime has gone: the container's stderr is the only witness
        try:
            os.write(2, f"berth-runtime: {message}\n".encode())
        except OSError:
            pass


def _child_main(ctx: Launch, chan: _Channel) -> None:
    """Stage 1, then (in its child) the container process. Never returns."""
    try:
        if _stage1(ctx, chan):
            os._exit(0)
        _container_process(ctx, chan)
    except BaseException as exc:
        _report(chan, exc)
    os._exit(1)


def _stage1_joins_cgroups(ctx: Launch) -> bool:
    """A new cgroup namespace is rooted at the cgroup of the process that unshares it: stage 1 joins the
    container's cgroups before. Otherwise the runtime moves the container process once it exists."""
    return ctx.cgroups is not None and ctx.namespaces.get("cgroup") == ""


def _stage1(ctx: Launch, chan: _Channel) -> bool:
    """Join cgroups (see :func:`_stage1_joins_cgroups`) and namespaces, unshare, fork. True in stage 1
    (which then exits), False in the child."""
    if ctx.cgroups is not None and _stage1_joins_cgroups(ctx):
        ctx.cgroups.add(os.getpid())
    joins = ctx.join_fds or {kind: os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                             for kind, path in ctx.namespaces.items() if path}
    # A joined user namespace first: it owns the others and gives the rights to enter them.
    for kind in sorted(joins, key=lambda k: k != "user"):
        linux.setns(joins[kind], _CLONE_FLAGS[kind])
        os.close(joins[kind])
    flags = 0
    for kind, path in ctx.namespaces.items():
        if not path:
            flags |= _CLONE_FLAGS[kind]
    if flags:
        linux.unshare(flags)
    if "user" in ctx.namespaces or "user" in ctx.join_fds:
        if flags & linux.CLONE_NEWUSER:
            chan.send(type="userns")
            chan.expect_ok()
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    child = os.fork()
    if child:
        chan.send(type="pid", pid=child)
        return True
    return False


def _container_process(ctx: Launch, chan: _Channel) -> None:
    """Set the container process up and execve the user's program (see the module docstring)."""
    os.setsid()
    spec, process = ctx.spec, ctx.process
    # The runtime moves this process into its cgroups and then acknowledges, with its pid on the host.
    # Hooks run in the cgroups: with hooks, the acknowledgement is awaited after the mounts; without, as
    # late as possible (before seccomp, which could forbid reading it), so the setup overlaps the move.
    container_hooks = (spec.get("hooks") or {}).get("createContainer") if ctx.init else None
    hooks_first = ctx.init and (ctx.runtime_hooks is not None or bool(container_hooks))
    host_pid = 0
    if ctx.init:
        user_ns = "user" in ctx.namespaces
        Mounter(spec, ctx.rootfs, ctx.bundle, ctx.cgroups, "cgroup" in ctx.namespaces, user_ns).prepare()
    if hooks_first:
        host_pid = int(chan.expect_ok()["pid"])
    if ctx.init:
        if ctx.runtime_hooks is not None:
            chan.send(type="hooks")
            chan.expect_ok()
        if container_hooks:
            from berth.runtimes.builtin.hooks import run_hooks

            run_hooks("createContainer", container_hooks, _hook_state(ctx, "creating", host_pid))
        pivot(ctx.rootfs, ctx.no_pivot)
    elif ctx.root_fd >= 0:
        os.fchdir(ctx.root_fd)
        os.chroot(".")
        os.close(ctx.root_fd)
    if process.get("terminal"):
        if ctx.console_fd < 0:
            raise FailedPrecondition("process.terminal is set but no console socket was given")
        from berth.runtimes.builtin.console import setup_pty

        setup_pty(ctx.console_fd, mount_console=ctx.init)
    if ctx.init:
        _init_system(ctx)
    if not hooks_first:
        host_pid = int(chan.expect_ok()["pid"])
    if ctx.seccomp is not None and not process.get("noNewPrivileges"):
        ctx.seccomp.load()
    if process.get("noNewPrivileges"):
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    cwd = process.get("cwd") or "/"
    try:  # the user may be able to when root could not (root squashing): see below
        os.chdir(cwd)
    except OSError:
        pass
    set_groups = True
    if "user" in ctx.namespaces or "user" in ctx.join_fds:
        with open("/proc/self/setgroups") as f:
            set_groups = f.read().strip() != "deny"
    drop_privileges(process, set_groups=set_groups)
    try:
        os.chdir(cwd)
    except OSError as exc:
        raise FailedPrecondition(f"cannot change to the working directory {cwd}: {exc.strerror}") from None
    user = process.get("user") or {}
    os.umask(int(user["umask"]) if user.get("umask") is not None else 0o022)
    env = _environment(process, int(user.get("uid", 0)))
    args = list(process["args"])
    path = _find_executable(args[0], env)
    _cloexec_from(3 + ctx.preserve_fds)
    if ctx.init:
        chan.send(type="ready")
        chan.close()
        fifo = os.open(f"/proc/self/fd/{ctx.fifo_fd}", os.O_WRONLY | os.O_CLOEXEC)
        os.write(fifo, b"0")
        os.close(fifo)
        os.close(ctx.fifo_fd)
        start_hooks = (spec.get("hooks") or {}).get("startContainer")
        if start_hooks:
            try:
                from berth.runtimes.builtin.hooks import run_hooks

                run_hooks("startContainer", start_hooks, _hook_state(ctx, "created", host_pid))
            except BerthError as exc:
                os.write(2, f"berth-runtime: {exc.message}\n".encode())
                os._exit(1)
    if ctx.seccomp is not None and process.get("noNewPrivileges"):
        ctx.seccomp.load()
    for signum in (signals.SIGPIPE, signals.SIGXFSZ):  # Python ignores these; the program must not inherit that
        signals.signal(signum, signals.SIG_DFL)
    try:
        os.execve(path, args, env)
    except OSError as exc:
        if not ctx.init:
            raise
        os.write(2, f"berth-runtime: exec {args[0]}: {exc.strerror}\n".encode())
        os._exit(127)


def _hook_state(ctx: Launch, status: str, pid: int) -> dict[str, Any]:
    from berth.runtimes.builtin.hooks import hook_state  # only with hooks: it imports json and subprocess

    return hook_state(ctx.id, status, pid, ctx.bundle, ctx.spec)


def _init_system(ctx: Launch) -> None:
    """After the pivot, in the init: hostname, sysctls, then read-only and masked paths (as runc does: a
    sysctl is written before ``/proc/sys`` turns read-only), and the session keyring."""
    spec = ctx.spec
    if spec.get("hostname"):
        linux.sethostname(spec["hostname"])
    if spec.get("domainname"):
        linux.setdomainname(spec["domainname"])
    for key, value in ((spec.get("linux") or {}).get("sysctl") or {}).items():
        try:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(str(value))
        except OSError as exc:
            raise FailedPrecondition(f"cannot set sysctl {key} to {value!r}: {exc.strerror}") from None
    finalize_rootfs(spec)
    if not ctx.no_new_keyring:
        try:
            linux.join_session_keyring(f"_ses.{ctx.id}")
        except OSError as exc:
            if exc.errno not in (38, 13, 1):  # ENOSYS, EACCES, EPERM: no keyrings here, as runc allows
                raise


def _environment(process: dict[str, Any], uid: int) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in process.get("env") or ():
        key, sep, value = entry.partition("=")
        if sep:
            env[key] = value
    if "HOME" not in env:
        env["HOME"] = _home_of(uid)
    return env


def _home_of(uid: int) -> str:
    try:
        with open("/etc/passwd") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 6 and fields[2] == str(uid):
                    return fields[5] or "/"
    except OSError:
        pass
    return "/"


def _find_executable(name: str, env: dict[str, str]) -> str:
    """``name`` looked up as execvp would, in the container's PATH; errors worded as runc's."""
    if "/" in name:
        if not os.path.exists(name):
            raise FailedPrecondition(f'exec: "{name}": stat {name}: no such file or directory')
        if not os.access(name, os.X_OK) or os.path.isdir(name):
            raise FailedPrecondition(f'exec: "{name}": permission denied')
        return name
    for directory in (env.get("PATH") or _DEFAULT_PATH).split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FailedPrecondition(f'exec: "{name}": executable file not found in $PATH')


def _cloexec_from(first: int) -> None:
    """Mark every descriptor from ``first`` up close-on-exec, so nothing of the runtime's leaks in."""
    try:
        linux.close_range(first, 0xFFFFFFFF, _CLOSE_RANGE_CLOEXEC)
    except OSError:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd >= first:
                try:
                    os.set_inheritable(fd, False)
                except OSError:
                    continue


def namespace_files(pid: int, spec: dict[str, Any]) -> dict[str, int]:
    """Open the init's namespaces that the spec names (for ``exec`` to join)."""
    out: dict[str, int] = {}
    for kind in (spec.get("linux") or {}).get("namespaces") or ():
        name = NAMESPACE_TYPES[kind["type"]]
        out[kind["type"]] = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    return out

