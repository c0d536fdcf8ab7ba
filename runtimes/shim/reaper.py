"""Spawning and reaping child processes in the shim, which is a child subreaper.

The shim reaps every child itself (``waitpid(-1)`` on each ``SIGCHLD``): the container processes
reparented to it by runc, and the runtime commands it spawns. So it never uses ``subprocess`` or
``trio.run_process`` (they would race with it for the same exit statuses); it spawns with libc's
``posix_spawnp`` and waits through :class:`Reaper`.

The spawn runs in a worker thread, through ctypes, which releases the GIL: :func:`os.posix_spawnp`
holds it until the child has exec'd (the parent of a vfork waits for that), and a busy machine makes
that wait milliseconds long, for which every other task of the shim would stand still.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import signal
from collections.abc import Callable, Mapping, Sequence

import trio

PR_SET_CHILD_SUBREAPER = 36
#: Statuses of children nobody watched yet, kept so a watcher registered late still gets its exit.
_UNCLAIMED_LIMIT = 1024


def become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (``PR_SET_CHILD_SUBREAPER``).

    Raises: OSError from ``prctl``.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + the signal that killed it."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


class Reaper:
    """Reaps children and hands each exit code to whoever watches that pid.

    Run :meth:`run` in a nursery (from the main thread: it installs the ``SIGCHLD`` receiver) before
    spawning anything.
    """

    def __init__(self) -> None:
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._unclaimed: collections.OrderedDict[int, int] = collections.OrderedDict()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reap children on every ``SIGCHLD`` until cancelled."""
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            self.reap()
            task_status.started()
            async for _ in signals:
                self.reap()

    def reap(self) -> None:
        """Collect every exited child now (no waiting)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = exit_code(status)
            callback = self._callbacks.pop(pid, None)
            if callback is not None:
                callback(code)
            else:
                self._unclaimed[pid] = code
                while len(self._unclaimed) > _UNCLAIMED_LIMIT:
                    self._unclaimed.popitem(last=False)

    def watch(self, pid: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(exit_code)`` when ``pid`` exits (at once if it was reaped already)."""
        code = self._unclaimed.pop(pid, None)
        if code is not None:
            callback(code)
        else:
            self._callbacks[pid] = callback

    async def spawn(self, argv: Sequence[str], *, stdin: int, stdout: int, stderr: int,
                    env: Mapping[str, str] | None = None) -> int:
        """Start ``argv`` (searched on ``PATH``) with the given descriptors as its stdio; return its pid.
        The descriptors must stay open until this returns.

        Watch it with :meth:`watch` or :meth:`wait` (an exit reaped meanwhile is kept for that).
        Raises: OSError (ENOENT, EACCES, ... naming ``argv[0]``); ValueError for a NUL in an argument.
        """
        args = [os.fsencode(a) for a in argv]
        environ = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in (os.environ if env is None else env).items()]
        if any(b"\0" in item for item in (*args, *environ)):
            raise ValueError("embedded null byte in a command's argument or environment")
        return await trio.to_thread.run_sync(_posix_spawnp, args, environ, (stdin, stdout, stderr))

    async def wait(self, pid: int) -> int:
        """Wait for ``pid`` (a child of this process) to exit; return its exit code.

        On cancellation the pid is still reaped later; its status is dropped.
        """
        done = trio.Event()
        result: list[int] = []

        def exited(code: int) -> None:
            result.append(code)
            done.set()

        self.watch(pid, exited)
        await done.wait()
        return result[0]


_libc: ctypes.CDLL | None = None
#: Bytes for glibc's ``posix_spawn_file_actions_t`` (80 on x86-64 and arm64), with room to spare.
_FILE_ACTIONS_SIZE = 512


def _posix_spawnp(args: list[bytes], environ: list[bytes], stdio: tuple[int, int, int]) -> int:
    """libc's ``posix_spawnp`` with ``stdio`` dup'ed onto 0, 1 and 2 (as ``os.posix_spawnp`` with
    ``POSIX_SPAWN_DUP2`` actions does), called with the GIL released. Blocking: run it in a thread."""
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        pointer = ctypes.c_void_p
        libc.posix_spawn_file_actions_init.argtypes = [pointer]
        libc.posix_spawn_file_actions_adddup2.argtypes = [pointer, ctypes.c_int, ctypes.c_int]
        libc.posix_spawn_file_actions_destroy.argtypes = [pointer]
        libc.posix_spawnp.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, pointer, pointer,
                                      ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)]
        _libc = libc
    argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
    envp = (ctypes.c_char_p * (len(environ) + 1))(*environ, None)
    actions = ctypes.create_string_buffer(_FILE_ACTIONS_SIZE)
    if _libc.posix_spawn_file_actions_init(actions) != 0:
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
    try:
        for target, fd in enumerate(stdio):
            code = _libc.posix_spawn_file_actions_adddup2(actions, fd, target)
            if code != 0:
                raise OSError(code, os.strerror(code))
        pid = ctypes.c_int()
        code = _libc.posix_spawnp(ctypes.byref(pid), args[0], actions, None, argv, envp)
        if code != 0:
            raise OSError(code, os.strerror(code), os.fsdecode(args[0]))
        return pid.value
    finally:
        _libc.posix_spawn_file_actions_destroy(actions)
