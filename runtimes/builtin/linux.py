"""The Linux system calls the runtime needs and Python's ``os`` lacks, through ctypes over libc.

Every function raises :class:`OSError` (errno, message, and the path when there is one) on failure, so the
rest of the runtime reads as plain Python. Only the stdlib is imported here. Constants are the kernel's
(``<linux/sched.h>``, ``<linux/prctl.h>``, ``<linux/capability.h>``); the mount flags are in
:mod:`berth.core.linux`.
"""

from __future__ import annotations

import ctypes
import os

# clone/unshare/setns namespace flags.
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080


# statvfs f_flag bits (ST_*), which a bind remount must keep when they are locked.
ST_RDONLY = 0x1
ST_NOSUID = 0x2
ST_NODEV = 0x4
ST_NOEXEC = 0x8
ST_NOATIME = 0x400
ST_NODIRATIME = 0x800
ST_RELATIME = 0x1000

# prctl(2) options.
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

# keyctl(2).
KEYCTL_JOIN_SESSION_KEYRING = 1

# bpf(2).
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_QUERY = 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2

# Syscall numbers the libc has no wrapper for (or, for old libcs, might not have).
_SYSCALLS = {
    "x86_64": {"pivot_root": 155, "keyctl": 250, "bpf": 321, "close_range": 436, "capset": 126},
    "aarch64": {"pivot_root": 41, "keyctl": 219, "bpf": 280, "close_range": 436, "capset": 91},
}

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.sethostname.argtypes = (ctypes.c_char_p, ctypes.c_size_t)
_libc.setdomainname.argtypes = (ctypes.c_char_p, ctypes.c_size_t)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_MACHINE = os.uname().machine


def _number(name: str) -> int:
    try:
        return _SYSCALLS[_MACHINE][name]
    except KeyError:
        raise OSError(38, f"{name}: no syscall number known for {_MACHINE}") from None


def _check(result: int, what: str, path: str | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2). ``target`` is named in the error."""
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data or None)),
           f"mount {source or 'none'} on {target} ({fstype or 'no type'}, flags {flags:#x}, data {data!r})", target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc.umount2(os.fsencode(target), flags), f"umount {target}", target)


def unshare(flags: int) -> None:
    """unshare(2): the calling process leaves the namespaces named by ``flags`` (CLONE_NEW*)."""
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2): join the namespace that ``fd`` (an nsfs file or a pidfd) refers to."""
    _check(_libc.setns(fd, nstype), f"setns({nstype:#x})")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2)."""
    _check(_libc.syscall(_number("pivot_root"), os.fsencode(new_root), os.fsencode(put_old)),
           f"pivot_root {new_root}", new_root)


def sethostname(name: str) -> None:
    """sethostname(2), in the caller's UTS namespace."""
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), f"sethostname {name!r}")


def setdomainname(name: str) -> None:
    """setdomainname(2), in the caller's UTS namespace."""
    raw = name.encode()
    _check(_libc.setdomainname(raw, len(raw)), f"setdomainname {name!r}")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2); returns its (non-negative) result."""
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def close_range(first: int, last: int, flags: int) -> None:
    """close_range(2) (with CLOSE_RANGE_CLOEXEC in ``flags``, marks instead of closing)."""
    _check(_libc.syscall(_number("close_range"), ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(flags)),
           "close_range")


def join_session_keyring(name: str) -> None:
    """keyctl(KEYCTL_JOIN_SESSION_KEYRING): a new session keyring called ``name``."""
    _check(_libc.syscall(_number("keyctl"), KEYCTL_JOIN_SESSION_KEYRING, os.fsencode(name)),
           "join session keyring")


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32))


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) on the calling thread with 64-bit masks (capability version 3)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.syscall(_number("capset"), ctypes.byref(header), ctypes.byref(data)), "capset")


def bpf(command: int, attr: ctypes.Structure) -> int:
    """bpf(2) with ``attr`` as the command's attribute union; returns the result (an fd for loads)."""
    return _check(_libc.syscall(_number("bpf"), command, ctypes.byref(attr), ctypes.sizeof(attr)), f"bpf({command})")

