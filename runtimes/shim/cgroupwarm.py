"""Paying the kernel's RCU grace period of a cgroup migration before the runtime needs one.

The first write to any ``cgroup.procs`` after a quiet spell waits for an RCU grace period (the writer
side of the kernel's ``cgroup_threadgroup_rwsem``: 5-20 ms on the machines berth is built on), and one
made soon after another (within about a grace period) does not: the lock stays in its slow mode for a
while. The runtime (``runc run``/``create``) moves the container's init into its cgroups at the end of
its set-up, so the shim moves itself into the cgroup it is already in (a no-op migration) in a worker
thread as soon as a create arrives: the grace period passes while the runtime starts, and the
runtime's own migration finds the lock already switched.

Nothing depends on it: a shim that cannot write its ``cgroup.procs`` (no cgroupfs, another user)
simply does not warm anything.
"""

from __future__ import annotations

import os

import trio

from berth.runtimes.builtin.cgroups import own_procs_file  # berth-runtime's own warm-up looks it up alike

__all__ = ["CgroupWarmUp"]


class CgroupWarmUp:
    """Starts no-op migrations of this process, one at a time (:meth:`start` while one runs does nothing)."""

    def __init__(self) -> None:
        #: ``""``: not looked up yet; ``None``: none found (or writing failed), never try again.
        self._procs: str | None = ""
        self._running = False

    def start(self, nursery: trio.Nursery) -> None:
        """Start a migration in a worker thread of ``nursery`` (it never raises)."""
        if self._running or self._procs is None:
            return
        self._running = True
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        try:
            await trio.to_thread.run_sync(self._migrate)
        finally:
            self._running = False

    def _migrate(self) -> None:
        if self._procs == "":
            self._procs = own_procs_file()
        if self._procs is None:
            return
        try:
            fd = os.open(self._procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        except OSError:
            self._procs = None  # not allowed here (or the cgroup went away): stop trying
