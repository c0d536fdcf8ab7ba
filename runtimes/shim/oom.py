"""Noticing that the kernel's OOM killer struck inside a container's memory cgroup.

cgroup v1: an eventfd registered on ``memory.oom_control`` through ``cgroup.event_control``; cgroup v2:
the ``oom_kill`` counter of ``memory.events``, read every half second. The cgroup is the one the
container's init is in (``/proc/<pid>/cgroup``), so it works whatever ``cgroupsPath`` the spec used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: How often the cgroup v2 counter is read.
V2_POLL_INTERVAL = 0.5


def memory_cgroup(pid: int) -> tuple[Path, int] | None:
    """``(directory, version)`` of the memory cgroup ``pid`` is in, or ``None`` when there is none."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    unified = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / "memory" / path.lstrip("/"), 1
        if controllers == "":
            unified = path
    if unified is not None and (CGROUP_ROOT / "cgroup.controllers").exists():
        directory = CGROUP_ROOT / unified.lstrip("/")
        if (directory / "memory.events").exists():
            return directory, 2
    return None


def _oom_kills(directory: Path, name: str = "memory.events") -> int | None:
    """The ``oom_kill`` counter of ``memory.events`` (v2) or ``memory.oom_control`` (v1); ``None`` once the
    cgroup is gone."""
    try:
        text = (directory / name).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            with contextlib.suppress(ValueError):
                return int(value)
    return 0


@dataclass(eq=False)
class OOMWatch:
    """What :func:`watch_oom` watches: the init's memory cgroup, its version, the registered eventfd (v1;
    owned by the watch, closed by :func:`watch_oom`) and the OOM kills counted so far."""

    directory: Path
    version: int
    eventfd: int | None
    seen: int


async def watch_oom(watch: OOMWatch | None, on_oom: Callable[[], None]) -> None:
    """Call ``on_oom()`` each time a process in the watched cgroup is OOM-killed, until cancelled or the
    cgroup goes; close the watch's eventfd then, even when cancelled before it ran. Returns at once for
    ``None`` (nothing to watch)."""
    if watch is None:
        return
    try:
        if watch.version == 2:
            while True:
                await trio.sleep(V2_POLL_INTERVAL)
                count = await trio.to_thread.run_sync(_oom_kills, watch.directory)
                if count is None:
                    return
                if count > watch.seen:
                    watch.seen = count
                    on_oom()
        assert watch.eventfd is not None
        while True:
            await trio.lowlevel.wait_readable(watch.eventfd)
            try:
                os.eventfd_read(watch.eventfd)
            except BlockingIOError:
                continue
            # One OOM can wake the eventfd several times; the kill counter says how many processes died.
            # The cgroup's removal wakes it too: then the counter is gone.
            count = await trio.to_thread.run_sync(_oom_kills, watch.directory, "memory.oom_control")
            if count is None:
                return
            if count > watch.seen:
                watch.seen = count
                on_oom()
    except OSError:
        return
    finally:
        if watch.eventfd is not None:
            os.close(watch.eventfd)


def open_watch(pid: int) -> OOMWatch | None:
    """The OOM watch of ``pid``'s memory cgroup (its eventfd registered, for cgroup v1); ``None`` when
    there is nothing to watch. Blocking: a worker thread's job. Hand the watch to :func:`watch_oom`."""
    found = memory_cgroup(pid)
    if found is None:
        return None
    directory, version = found
    if version == 2:
        return OOMWatch(directory, 2, None, _oom_kills(directory) or 0)
    try:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    except OSError:
        return None
    try:
        _register_v1(directory, efd)
        return OOMWatch(directory, 1, efd, _oom_kills(directory, "memory.oom_control") or 0)
    except OSError:
        os.close(efd)
        return None


def _register_v1(directory: Path, efd: int) -> None:
    control = os.open(directory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with open(directory / "cgroup.event_control", "w") as f:
            f.write(f"{efd} {control}")
    finally:
        os.close(control)
