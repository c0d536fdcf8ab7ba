"""Mounting and unmounting :class:`~berth.core.snapshots.snapshotter.Mount` values, with mount(2).

The calls block: run them through ``trio.to_thread.run_sync`` (the ``async`` wrappers here do).
:func:`mount_all` undoes what it mounted when a later mount fails, so a failure leaves nothing
mounted. Overlay mounts whose option string would exceed what mount(2) accepts (one page) are made
shorter by passing the ``lowerdir`` paths relative to their longest common directory, from a forked
child that changes into it (the parent's working directory never changes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Sequence
from pathlib import Path

import trio

from berth.core.errdefs import InvalidArgument
from berth.core.linux import (
    MNT_DETACH,
    MOUNT_FLAGS,
    MOUNT_PROPAGATION,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REMOUNT,
    UMOUNT_NOFOLLOW,
)
from berth.core.snapshots.snapshotter import Mount

__all__ = ["MountError", "is_mountpoint", "mount", "mount_all", "parse_options", "unmount", "unmount_all"]

_PAGE_LIMIT = os.sysconf("SC_PAGESIZE") - 512

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(OSError):
    """mount(2) or umount2(2) failed; the message names the mount and the reason."""


def parse_options(options: Sequence[str]) -> tuple[int, int, str]:
    """Split mount options into (flags, propagation flags, data string)."""
    flags = propagation = 0
    data = []
    for option in options:
        if option in MOUNT_FLAGS:
            clear, flag = MOUNT_FLAGS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in MOUNT_PROPAGATION:
            propagation |= MOUNT_PROPAGATION[option]
        else:
            data.append(option)
    return flags, propagation, ",".join(data)


def _syscall_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"mount {fstype or 'bind'} {source} on {target} failed: {os.strerror(err)}")


def _compact_lowerdirs(data: str) -> tuple[str, str] | None:
    """Rewrite an overlay option string with lowerdirs relative to their common directory.

    Returns ``(directory, options)``, or ``None`` if nothing can be gained.
    """
    parts = data.split(",")
    lower = next((p for p in parts if p.startswith("lowerdir=")), None)
    if lower is None:
        return None
    dirs = lower.removeprefix("lowerdir=").split(":")
    common = os.path.commonpath(dirs)
    if common in ("", "/"):
        return None
    relative = ":".join(os.path.relpath(d, common) for d in dirs)
    rewritten = [f"lowerdir={relative}" if p is lower else p for p in parts]
    return common, ",".join(rewritten)


def _mount_from(directory: str, source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2) in a forked child whose working directory is ``directory``."""
    pid = os.fork()
    if pid == 0:  # the child: only syscalls, then _exit
        code = 0
        try:
            os.chdir(directory)
            if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
                code = ctypes.get_errno() or errno.EIO
        except BaseException:
            code = errno.EIO
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise MountError(code, f"mount {fstype} {source} on {target} failed: {os.strerror(code)}")


def mount(m: Mount, target: Path) -> None:
    """Mount ``m`` on ``target`` (plus ``m.target`` below it). Blocks.

    Raises:
        MountError: the kernel refused; InvalidArgument: the options cannot fit in one page.
    """
    where = str(target / m.target.lstrip("/")) if m.target else str(target)
    flags, propagation, data = parse_options(m.options)
    fstype = "" if flags & MS_BIND else m.type
    if fstype == "overlay" and len(data) > _PAGE_LIMIT:
        compact = _compact_lowerdirs(data)
        if compact is None or len(compact[1]) > _PAGE_LIMIT:
            raise InvalidArgument(f"overlay mount options are too long ({len(data)} bytes) for {where}")
        _mount_from(compact[0], m.source, where, fstype, flags & ~MS_REMOUNT, compact[1])
    else:
        _syscall_mount(m.source, where, fstype, flags & ~MS_REMOUNT if flags & MS_BIND else flags, data)
    if flags & MS_BIND and flags & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC):
        # A bind mount ignores these flags; apply them with a remount of the bind.
        try:
            _syscall_mount("", where, "", flags | MS_REMOUNT | MS_BIND, "")
        except MountError:
            unmount(Path(where))
            raise
    if propagation:
        _syscall_mount("", where, "", propagation, "")


def mount_all(mounts: Sequence[Mount], target: Path) -> None:
    """Mount every mount in order on ``target``; on failure unmount those already made, then raise."""
    done: list[Path] = []
    try:
        for m in mounts:
            mount(m, target)
            done.append(target / m.target.lstrip("/") if m.target else target)
    except BaseException:
        for where in reversed(done):
            unmount(where)
        raise


def is_mountpoint(path: Path) -> bool:
    """Whether something is mounted exactly at ``path`` (per /proc/self/mountinfo)."""
    wanted = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == wanted:
                return True
    return False


def unmount(target: Path, *, detach: bool = False) -> None:
    """Unmount ``target`` once; a target that is not mounted is not an error.

    Raises: MountError (e.g. EBUSY).
    """
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0)
    if _libc.umount2(str(target).encode(), flags) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
            return
        raise MountError(err, f"unmount {target} failed: {os.strerror(err)}")


def unmount_all(target: Path) -> None:
    """Unmount everything stacked on ``target``."""
    while is_mountpoint(target):
        unmount(target)


async def amount_all(mounts: Sequence[Mount], target: Path) -> None:
    """:func:`mount_all` in a worker thread."""
    await trio.to_thread.run_sync(mount_all, mounts, target)


async def aunmount_all(target: Path) -> None:
    """:func:`unmount_all` in a worker thread."""
    await trio.to_thread.run_sync(unmount_all, target)
