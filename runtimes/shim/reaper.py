"""Spawning and reaping child processes in the shim, which is a child subreaper.

The shim reaps every child itself (``waitpid(-1)`` on each ``SIGCHLD``): the container processes
reparented to it by runc, and the runtime commands it spawns. So it never uses ``subprocess`` or
``trio.run_process`` (they would race with it for the same exit statuses); it spawns with
:func:`os.posix_spawnp` and waits through :class:`Reaper`.
"""

from __future__ import annotations

import collections
import ctypes
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

    def spawn(self, argv: Sequence[str], *, stdin: int, stdout: int, stderr: int,
              env: Mapping[str, str] | None = None) -> int:
        """Start ``argv`` (searched on ``PATH``) with the given descriptors as its stdio; return its pid.

        Watch it with :meth:`watch` or :meth:`wait` before the next checkpoint. Raises: OSError.
        """
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate((stdin, stdout, stderr))]
        return os.posix_spawnp(argv[0], list(argv), dict(os.environ if env is None else env),
                               file_actions=actions)

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
