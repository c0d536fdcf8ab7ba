"""The default seccomp profile: containerd's allow-list, as an OCI ``linux.seccomp`` structure.

Everything not listed fails with ``EPERM``. Calls that only make sense with a capability are allowed
only when the process's bounding set holds it (``CAP_SYS_ADMIN`` opens ``mount``, ``unshare``,
``setns`` and unrestricted ``clone``; without it ``clone`` may not create namespaces and ``clone3``
fails with ``ENOSYS`` so that libcs fall back to ``clone``).
"""

from __future__ import annotations

import errno
import platform
from collections.abc import Iterable
from typing import Any

__all__ = ["ARCHITECTURES", "default_seccomp_profile"]

#: libseccomp architectures covered on each machine (a 64-bit host also runs its 32-bit binaries).
ARCHITECTURES: dict[str, list[str]] = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"],
}

# Allowed for everyone, on every architecture (names a kernel lacks are ignored by the runtime);
# ptrace too, as containerd allows it on kernels from 4.8 on (every kernel berth supports).
_ALLOWED_NAMES = """
accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown chown32 clock_adjtime
clock_adjtime64 clock_getres clock_getres_time64 clock_gettime clock_gettime64 clock_nanosleep
clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2 dup3 epoll_create
epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2
execve execveat exit exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir
fchmod fchmodat fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr flock fork
fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync ftruncate ftruncate64 futex
futex_time64 futex_waitv futimesat getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32
getgid getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid getppid getpriority
getrandom getresgid getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage getsid
getsockname getsockopt get_thread_area gettid gettimeofday getuid getuid32 getxattr inotify_add_watch
inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy io_getevents io_pgetevents
io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit io_uring_enter io_uring_register
io_uring_setup ipc kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lchown32
lgetxattr link linkat listen listxattr llistxattr _llseek lremovexattr lseek lsetxattr lstat lstat64
madvise membarrier memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall
mmap mmap2 mprotect mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedreceive_time64 mq_timedsend
mq_timedsend_time64 mq_unlink mremap msgctl msgget msgrcv msgsnd msync munlock munlockall munmap
nanosleep newfstatat _newselect open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 poll
ppoll ppoll_time64 prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6 pselect6_time64
pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv recv recvfrom recvmmsg
recvmmsg_time64 recvmsg remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir
rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam
sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval
sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam sched_setscheduler
sched_yield seccomp select semctl semget semop semtimedop semtimedop_time64 send sendfile sendfile64
sendmmsg sendmsg sendto setfsgid setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32
setitimer setpgid setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid
setreuid32 setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid setuid32
setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 sigprocmask sigreturn socket
socketcall socketpair splice stat stat64 statfs statfs64 statx symlink symlinkat sync sync_file_range
syncfs sysinfo tee tgkill time timer_create timer_delete timer_getoverrun timer_gettime timer_gettime64
timer_settime timer_settime64 timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime
timerfd_settime64 times tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat utime utimensat
utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write writev
ptrace
"""
_ALLOWED = _ALLOWED_NAMES.split()

# personality(2) personas a container may switch to: PER_LINUX, PER_LINUX32, UNAME26,
# UNAME26|PER_LINUX32, and the query value 0xffffffff.
_PERSONAS = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

_BY_MACHINE: dict[str, list[str]] = {
    "x86_64": ["arch_prctl", "modify_ldt"],
    "aarch64": ["arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint", "cacheflush",
                "set_tls"],
}

#: Calls opened by a capability in the bounding set.
_BY_CAPABILITY: dict[str, list[str]] = {
    "CAP_DAC_READ_SEARCH": ["open_by_handle_at"],
    "CAP_SYS_ADMIN": ["bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount", "fsopen", "fspick",
                      "lookup_dcookie", "mount", "mount_setattr", "move_mount", "name_to_handle_at", "open_tree",
                      "perf_event_open", "quotactl", "quotactl_fd", "setdomainname", "sethostname", "setns",
                      "syslog", "umount", "umount2", "unshare"],
    "CAP_SYS_BOOT": ["reboot"],
    "CAP_SYS_CHROOT": ["chroot"],
    "CAP_SYS_MODULE": ["delete_module", "init_module", "finit_module"],
    "CAP_SYS_PACCT": ["acct"],
    "CAP_SYS_PTRACE": ["kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev"],
    "CAP_SYS_RAWIO": ["iopl", "ioperm"],
    "CAP_SYS_TIME": ["settimeofday", "stime", "clock_settime", "clock_settime64"],
    "CAP_SYS_TTY_CONFIG": ["vhangup"],
    "CAP_SYSLOG": ["syslog"],
    "CAP_BPF": ["bpf"],
    "CAP_PERFMON": ["perf_event_open"],
}

# Namespace flags clone(2) may not carry without CAP_SYS_ADMIN: NEWNS, NEWUTS, NEWIPC, NEWUSER,
# NEWPID, NEWNET and NEWCGROUP (Python 3.11's os module has no CLONE_* constants).
_CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x02000000


def _allow(names: Iterable[str], args: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"names": list(names), "action": "SCMP_ACT_ALLOW", "args": args or []}


def default_seccomp_profile(capabilities: Iterable[str] = (), machine: str | None = None) -> dict[str, Any]:
    """containerd's default profile for ``machine`` (default: this one's, ``x86_64`` or ``aarch64``),
    opened further by the capabilities in ``capabilities`` (the process's bounding set).

    Returns the OCI ``linux.seccomp`` object (plain JSON data).

    Raises:
        ValueError: the machine is neither ``x86_64`` nor ``aarch64``.
    """
    machine = machine or platform.machine()
    if machine not in ARCHITECTURES:
        raise ValueError(f"no default seccomp profile for machine {machine!r} (x86_64 or aarch64)")
    syscalls = [_allow(_ALLOWED)]
    syscalls += [_allow(["personality"], [{"index": 0, "value": persona, "op": "SCMP_CMP_EQ"}])
                 for persona in _PERSONAS]
    syscalls.append(_allow(_BY_MACHINE[machine]))
    caps = set(capabilities)
    syscalls += [_allow(names) for cap, names in _BY_CAPABILITY.items() if cap in caps]
    if "CAP_SYS_ADMIN" not in caps:
        syscalls.append(_allow(["clone"], [{"index": 0, "value": _CLONE_NAMESPACE_FLAGS, "valueTwo": 0,
                                            "op": "SCMP_CMP_MASKED_EQ"}]))
        syscalls.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
    return {"defaultAction": "SCMP_ACT_ERRNO", "architectures": list(ARCHITECTURES[machine]),
            "syscalls": syscalls}
