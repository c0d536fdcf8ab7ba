"""A warm process that runs ``berth`` commands for the ``berth`` launcher, so a command costs a fork
instead of an interpreter start-up (the design of Mercurial's chg and of nailgun).

The launcher (``bin/berth``, a few lines of Python run with ``-S -I`` so it imports nothing) connects to
this server's socket and sends its working directory, its arguments and its environment, with its
stdin, stdout and stderr as file descriptors (``SCM_RIGHTS``). The server forks; the child takes those
descriptors as its own 0, 1 and 2, takes the directory and environment, runs
:func:`berth.client.cli.main` and sends back the exit status. So the command runs exactly as it would
in a fresh process (same terminal, same pipes, same variables), but with every module already imported.
Signals the launcher receives (SIGINT, SIGTERM, SIGHUP, SIGWINCH) are forwarded to the child; if the
launcher goes away, the child gets SIGHUP.

Wire format (all integers big-endian): the launcher sends ``u32 length`` then ``length`` bytes of
NUL-separated fields ``b"berth-cli-1", cwd, argc, argv..., env...`` with the three descriptors attached;
then at any time ``b"S" + u8 signal``. The server answers ``b"X" + i32 status`` when the command ends,
or ``b"R"`` when it will not run it (its code changed since it started, or the request was malformed):
the launcher then runs the command itself and starts a fresh server.

The socket lives in a directory only the user can enter (``$XDG_RUNTIME_DIR/berth`` or
``/tmp/berth-cli-<uid>``, mode 0700, checked by both sides), and the server serves only peers with its
own uid (``SO_PEERCRED``). One server serves a socket: it holds ``cli.lock`` beside it (a server started
while another holds the lock waits a moment for it, then leaves). It exits after ``--idle`` seconds
without a command (default 600), at the first command after its code changed, or within seconds of its
socket being removed or replaced; on the way out it answers ``R`` to every launcher still waiting in its
backlog, so none is left without an answer. Its PID is in ``cli.pid`` beside the socket.
``BERTH_CLI_SERVER=0`` makes the launcher never use or start one.

Run: ``python -m berth.client.cliserver [--idle SECONDS] [--foreground] SOCKET``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import sys
import time

__all__ = ["PROTOCOL", "code_fingerprint", "default_socket_path", "main", "pid_file_of", "serve"]

PROTOCOL = b"berth-cli-1"
_MAX_REQUEST = 4 << 20
#: Seconds between two checks, while idle, that the socket is still this server's.
_SOCKET_CHECK_INTERVAL = 2.0
#: Seconds a new server waits for the lock of one that is on its way out.
_LOCK_WAIT = 2.0


def default_socket_path() -> str:
    """Where the launcher looks for the server of the current user (the launcher repeats this rule)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    directory = f"{runtime}/berth" if runtime else f"/tmp/berth-cli-{os.getuid()}"
    return f"{directory}/cli.sock"


def pid_file_of(socket_path: str) -> str:
    """The file beside the socket that holds the serving process's PID."""
    return os.path.join(os.path.dirname(socket_path), "cli.pid")


def _source_paths() -> list[str]:
    """berth's client and core packages: their directories and Python files."""
    import berth.client
    import berth.core

    paths: list[str] = []
    for package in (berth.client, berth.core):
        for top in package.__path__:
            for directory, dirs, files in os.walk(top):
                dirs[:] = [d for d in dirs if d != "__pycache__"]  # compiling a module is not a change
                paths.append(directory)
                paths.extend(os.path.join(directory, name) for name in files if name.endswith(".py"))
    return paths


def code_fingerprint(paths: list[str]) -> tuple[int, ...]:
    """The modification times of ``paths`` (-1 for a missing one): a change means the server is stale."""
    times = []
    for path in paths:
        try:
            times.append(os.stat(path).st_mtime_ns)
        except FileNotFoundError:
            times.append(-1)
    return tuple(times)


def _private_directory(path: str) -> None:
    """Create the socket's directory (0700) or check that an existing one is ours and private.

    Raises: PermissionError when it is not.
    """
    directory = os.path.dirname(path)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{directory} must be a directory owned by uid {os.getuid()} with mode 0700")


def _receive_request(conn: socket.socket) -> tuple[list[bytes], list[int]]:
    """Read one request: (fields, descriptors). Raises ValueError for a malformed one."""
    fds: list[int] = []
    data = b""
    header_size = 4
    while True:
        want = header_size if len(data) < header_size else header_size + struct.unpack(">I", data[:4])[0] - len(data)
        if len(data) >= header_size and want <= 0:
            break
        message, ancillary, _flags, _addr = conn.recvmsg(max(want, 1), socket.CMSG_SPACE(3 * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) - len(payload) % 4]))
        if not message:
            raise ValueError("connection closed in the middle of a request")
        data += message
        if len(data) >= 4 and struct.unpack(">I", data[:4])[0] > _MAX_REQUEST:
            raise ValueError("request too large")
    fields = data[4:].split(b"\0")
    if len(fds) != 3 or not fields or fields[0] != PROTOCOL:
        for fd in fds:
            os.close(fd)
        raise ValueError("not a berth-cli-1 request with three descriptors")
    return fields, fds


class _SignalForwarder:
    """In the child: turn the launcher's ``S<sig>`` messages into signals to itself, and its going away
    before the command's status was sent into SIGHUP (after it, the launcher leaving is the normal end).

    The connection raises SIGIO when something arrives (``O_ASYNC``), so no thread waits on it: a thread
    would cost the fork another stack and its copied pages, every command."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.answered = False
        self.gone = False
        signal.signal(signal.SIGIO, self._on_io)
        fd = conn.fileno()
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
        self._on_io(signal.SIGIO, None)  # what arrived before the connection raised SIGIO

    def _on_io(self, signum: int, frame: object) -> None:
        # Read everything queued first: SIGIO is not raised again for what is already there, and a
        # signal's handler (KeyboardInterrupt) may raise as soon as this one returns.
        signals = []
        while not self.gone:
            try:
                message = self.conn.recv(2, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                message = b""
            if len(message) == 2 and message[:1] == b"S":
                signals.append(message[1])
                continue
            self.gone = True
            if not self.answered:
                signals.append(signal.SIGHUP)
        for number in signals:
            with contextlib.suppress(OSError, ValueError):  # not a signal number: nothing to pass on
                os.kill(os.getpid(), number)


def _exit_with_signal_status(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run_child(conn: socket.socket, fields: list[bytes], fds: list[int]) -> None:
    """In the forked child: become the launcher's process and run the command; never returns."""
    status = 1
    forwarder: _SignalForwarder | None = None
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        cwd, argc = fields[1], int(fields[2])
        argv = [os.fsdecode(arg) for arg in fields[3:3 + argc]]
        environ = {}
        for entry in fields[3 + argc:]:
            key, sep, value = entry.partition(b"=")
            if sep and key:
                environ[os.fsdecode(key)] = os.fsdecode(value)
        os.chdir(cwd)
        for name in os.environ.keys() - environ.keys():
            del os.environ[name]
        for name, setting in environ.items():  # mostly the environment the server started with: few changes
            if os.environ.get(name) != setting:
                os.environ[name] = setting
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # A forwarded SIGTERM or SIGHUP ends the command with the status a shell gives a process killed by
        # it, and the launcher gets that status (a default action would kill the child before it could tell).
        signal.signal(signal.SIGTERM, _exit_with_signal_status)
        signal.signal(signal.SIGHUP, _exit_with_signal_status)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        forwarder = _SignalForwarder(conn)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdio, closed at exit
        sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.argv = ["berth", *argv]
        from berth.client.cli import main

        try:
            status = main(argv)
        except SystemExit as exit_:
            code = exit_.code
            status = code if isinstance(code, int) else (0 if code is None else 1)
            if code is not None and not isinstance(code, int):
                sys.stderr.write(f"{code}\n")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BrokenPipeError, ValueError):
                stream.flush()
    except SystemExit as exit_:  # a forwarded SIGTERM or SIGHUP outside the command's own code
        status = exit_.code if isinstance(exit_.code, int) else 1
    except KeyboardInterrupt:
        status = 130
    except BaseException as err:  # whatever happens, the launcher must get a status
        with contextlib.suppress(OSError):
            os.write(2, f"berth: {type(err).__name__}: {err}\n".encode())
    if forwarder is not None:
        forwarder.answered = True
    try:
        conn.sendall(b"X" + struct.pack(">i", status))
    finally:
        os._exit(0)


def _warm_up() -> None:
    """Import and exercise what every command needs once, so that each fork inherits it warm."""
    import json  # noqa: F401 - used by --format json

    from berth.client import cli

    cli.prebuild_parser()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _same_socket(path: str, identity: tuple[int, int]) -> bool:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False
    return (info.st_dev, info.st_ino) == identity


def _take_lock(path: str) -> int | None:
    """Lock ``cli.lock`` beside ``path`` for this server's life; wait up to ``_LOCK_WAIT`` seconds for a
    server on its way out. Returns the locked descriptor, or None when another server keeps the lock."""
    fd = os.open(os.path.join(os.path.dirname(path), "cli.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


def _hand_back_waiting(listener: socket.socket) -> None:
    """Answer ``R`` to every launcher still queued on ``listener``: each runs its command itself."""
    listener.setblocking(False)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn, contextlib.suppress(OSError):
            conn.setblocking(True)
            conn.sendall(b"R")


def serve(path: str, *, idle: float = 600.0) -> None:
    """Listen on ``path`` and run commands until idle for ``idle`` seconds, the socket is removed or
    replaced, or a command finds the code changed; return if another server keeps the lock (after
    waiting ``_LOCK_WAIT`` seconds for it). Raises PermissionError when the socket's directory is not
    private."""
    _warm_up()
    _private_directory(path)
    lock = _take_lock(path)
    if lock is None:
        return
    server = os.getpid()
    sources = _source_paths()
    fingerprint = code_fingerprint(sources)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    temporary = f"{path}.{server}"
    listener.bind(temporary)
    listener.listen(64)
    os.rename(temporary, path)
    identity = (os.stat(path).st_dev, os.stat(path).st_ino)
    pid_file = pid_file_of(path)
    with open(f"{pid_file}.{server}", "w") as handle:
        handle.write(f"{server}\n")
    os.rename(f"{pid_file}.{server}", pid_file)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, _exit_on_signal)  # clean up the socket and PID file on the way out
    idle_until = time.monotonic() + idle
    try:
        while True:
            wait = min(_SOCKET_CHECK_INTERVAL, idle_until - time.monotonic())
            ready, _, _ = select.select([listener], [], [], max(wait, 0.0))
            if not _same_socket(path, identity):
                return
            if not ready:
                if time.monotonic() >= idle_until:
                    return
                continue
            idle_until = time.monotonic() + idle
            conn, _ = listener.accept()
            try:
                _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                if uid != os.getuid():
                    continue
                try:
                    fields, fds = _receive_request(conn)
                except (ValueError, OSError):
                    conn.sendall(b"R")
                    continue
                if code_fingerprint(sources) != fingerprint:
                    for fd in fds:
                        os.close(fd)
                    conn.sendall(b"R")
                    return
                try:
                    child = os.fork()
                except OSError:  # no process to spare: the launcher runs the command itself
                    for fd in fds:
                        os.close(fd)
                    conn.sendall(b"R")
                    continue
                if child == 0:
                    try:  # the child leaves only through os._exit: it never runs the server's clean-up
                        listener.close()
                        os.close(lock)  # a long command must not keep the next server out
                        _run_child(conn, fields, fds)
                    finally:
                        os._exit(255)
                for fd in fds:
                    os.close(fd)
            except OSError:
                continue
            finally:
                conn.close()
    finally:
        if os.getpid() == server:
            if _same_socket(path, identity):
                os.unlink(path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pid_file)
            _hand_back_waiting(listener)
            listener.close()
            os.close(lock)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m berth.client.cliserver",
                                     description="serve berth commands to the berth launcher from a warm process")
    parser.add_argument("--idle", type=float, default=600.0, help="exit after this many idle seconds")
    parser.add_argument("--foreground", action="store_true", help="do not detach from the terminal")
    parser.add_argument("socket", nargs="?", default=None, help="socket path (default: the launcher's)")
    args = parser.parse_args(argv)
    path = args.socket or default_socket_path()
    if not args.foreground and os.fork() != 0:
        return 0
    if not args.foreground:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
    serve(path, idle=args.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
