"""Privileges of the container process: user and groups, the five capability sets, no_new_privs, seccomp.

:func:`drop_privileges` runs in the container process just before ``start`` releases it, in the order
that keeps each step possible: the bounding set is cut first (that needs ``CAP_SETPCAP``), then the uid
and gids change with ``PR_SET_KEEPCAPS`` so the permitted set survives, then ``capset`` sets effective,
permitted and inheritable, and last the ambient set is raised (a capability can only be ambient if it
is permitted and inheritable; as runc does, one that cannot be raised is skipped).

:func:`build_seccomp` turns ``linux.seccomp`` into a loaded-later ``pyseccomp.SyscallFilter``. It is
called before the pivot, while libseccomp can still be found on the host; pyseccomp is imported only
then, so a spec without seccomp never loads it.
"""

from __future__ import annotations

import errno
import os

from berth.core.errdefs import InvalidArgument
from berth.core.linux import ALL_CAPABILITIES
from berth.runtimes.builtin import linux

TYPE_CHECKING = False  # not typing's: importing typing costs every runtime call ~5 ms
if TYPE_CHECKING:
    from typing import Any

__all__ = ["CAPABILITIES", "build_seccomp", "capability_mask", "drop_privileges"]

#: Every capability name in kernel number order (CAP_CHOWN is 0).
CAPABILITIES = ALL_CAPABILITIES
_NUMBERS = {name: number for number, name in enumerate(CAPABILITIES)}


def last_capability() -> int:
    """The highest capability number this kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return len(CAPABILITIES) - 1


def capability_mask(names: list[str], last: int) -> int:
    """The bit mask of ``names``; capabilities the kernel does not know (above ``last``) are left out.
    Raises InvalidArgument for a name that is not a capability."""
    mask = 0
    for name in names:
        number = _NUMBERS.get(name.upper() if name.upper().startswith("CAP_") else "CAP_" + name.upper())
        if number is None:
            raise InvalidArgument(f"unknown capability {name!r}")
        if number <= last:
            mask |= 1 << number
    return mask


def drop_privileges(process: dict[str, Any], *, set_groups: bool) -> None:
    """Become ``process.user`` with ``process.capabilities`` (see the module docstring for the order).
    ``set_groups`` is False where setgroups(2) is denied (a user namespace with setgroups=deny)."""
    caps = process.get("capabilities")
    last = last_capability()
    if caps is not None:
        bounding = capability_mask(caps.get("bounding") or [], last)
        for number in range(last + 1):
            if not bounding & (1 << number):
                linux.prctl(linux.PR_CAPBSET_DROP, number)
    user = process.get("user") or {}
    uid, gid = int(user.get("uid", 0)), int(user.get("gid", 0))
    linux.prctl(linux.PR_SET_KEEPCAPS, 1)
    if set_groups:
        os.setgroups([int(g) for g in user.get("additionalGids") or ()])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    linux.prctl(linux.PR_SET_KEEPCAPS, 0)
    if caps is None:
        return
    linux.capset(capability_mask(caps.get("effective") or [], last), capability_mask(caps.get("permitted") or [], last),
                 capability_mask(caps.get("inheritable") or [], last))
    linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
    ambient = capability_mask(caps.get("ambient") or [], last)
    for number in range(last + 1):
        if ambient & (1 << number):
            try:
                linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_RAISE, number)
            except PermissionError:
                continue


_ACTIONS = ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP", "SCMP_ACT_ERRNO",
            "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG")
_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6,
        "SCMP_CMP_MASKED_EQ": 7}


def _action(seccomp: Any, name: str, errno_ret: int | None) -> int:
    if name not in _ACTIONS:
        raise InvalidArgument(f"linux.seccomp: action {name!r} is not supported")
    if name == "SCMP_ACT_ERRNO":
        return int(seccomp.ERRNO(errno.EPERM if errno_ret is None else errno_ret))
    if name == "SCMP_ACT_TRACE":
        return int(seccomp.TRACE(errno.EPERM if errno_ret is None else errno_ret))
    return int({"SCMP_ACT_KILL": seccomp.KILL, "SCMP_ACT_KILL_THREAD": seccomp.KILL_THREAD,
                "SCMP_ACT_KILL_PROCESS": seccomp.KILL_PROCESS, "SCMP_ACT_TRAP": seccomp.TRAP,
                "SCMP_ACT_ALLOW": seccomp.ALLOW, "SCMP_ACT_LOG": seccomp.LOG}[name])


def build_seccomp(config: dict[str, Any], no_new_privileges: bool) -> Any:
    """A pyseccomp filter for ``linux.seccomp`` (``load()`` it in the container process). Syscall names
    this libseccomp does not know are skipped, as runc skips them. Raises InvalidArgument for a bad profile."""
    import pyseccomp

    default = _action(pyseccomp, config.get("defaultAction") or "", config.get("defaultErrnoRet"))
    try:
        flt = pyseccomp.SyscallFilter(default)
        # libseccomp sets no_new_privs when it loads a filter unless told not to: leave that to the spec.
        flt.set_attr(pyseccomp.Attr.CTL_NNP, 1 if no_new_privileges else 0)
        for flag in config.get("flags") or ():
            if flag == "SECCOMP_FILTER_FLAG_LOG":
                flt.set_attr(pyseccomp.Attr.CTL_LOG, 1)
            elif flag == "SECCOMP_FILTER_FLAG_SPEC_ALLOW":
                flt.set_attr(pyseccomp.Attr.CTL_SSB, 1)
            elif flag != "SECCOMP_FILTER_FLAG_TSYNC":
                raise InvalidArgument(f"linux.seccomp: flag {flag!r} is not supported")
        for arch in config.get("architectures") or ():
            value = getattr(pyseccomp.Arch, arch.removeprefix("SCMP_ARCH_"), None)
            if value is None:
                raise InvalidArgument(f"linux.seccomp: unknown architecture {arch!r}")
            if not flt.exist_arch(value):
                flt.add_arch(value)
        for rule in config.get("syscalls") or ():
            action = _action(pyseccomp, rule.get("action") or "", rule.get("errnoRet"))
            if action == default:
                continue
            args = [pyseccomp.Arg(int(arg["index"]), _OPS[arg["op"]], int(arg.get("value", 0)),
                                  int(arg.get("valueTwo", 0))) for arg in rule.get("args") or ()]
            # libseccomp compares an argument once per rule: several conditions on one argument
            # become one rule each (any of them matches).
            indexes = [arg.get("index") for arg in rule.get("args") or ()]
            groups = [[a] for a in args] if len(set(indexes)) < len(indexes) else [args]
            for name in rule.get("names") or ():
                if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) < 0:
                    continue
                for group in groups:
                    try:
                        flt.add_rule(action, name, *group)
                    except OSError as exc:
                        if exc.errno != errno.EEXIST:  # a rule given twice (podman's profile has some) adds nothing
                            raise
    except KeyError as exc:
        raise InvalidArgument(f"linux.seccomp: unknown operator or missing field {exc}") from None
    except OSError as exc:
        raise InvalidArgument(f"linux.seccomp: libseccomp refused the profile: {exc.strerror}") from None
    return flt
