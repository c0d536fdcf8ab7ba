"""Network namespaces bind-mounted at a path, made and entered from a worker thread.

Namespaces belong to threads: a worker thread can ``unshare(CLONE_NEWNET)``, bind-mount its
``/proc/thread-self/ns/net`` on a file, open netlink sockets there (a socket stays in the namespace it
was made in) and ``setns`` back, without forking and without touching the event loop's thread. Every
function here blocks: call them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from berth.core.linux import MNT_DETACH, MS_BIND

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


@contextlib.contextmanager
def entered(path: str | None) -> Iterator[None]:
    """Run the block in the network namespace bind-mounted at ``path`` (``None``: a new one), on this
    thread only; the thread is back in its own namespace afterwards, whatever happens."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if path is None:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        else:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _check(_libc.setns(target, CLONE_NEWNET), f"setns({path})")
            finally:
                os.close(target)
        try:
            yield
        finally:
            _check(_libc.setns(own, CLONE_NEWNET), "setns(back)")
    finally:
        os.close(own)


def create(path: Path) -> None:
    """Make a new network namespace and bind-mount it at ``path`` (its parent directories are made).

    Raises: FileExistsError when something is mounted there already; OSError.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_mounted(path):
        raise FileExistsError(errno.EEXIST, f"a network namespace is mounted at {path} already")
    path.touch(mode=0o444)
    try:
        with entered(None):
            _check(_libc.mount(b"/proc/thread-self/ns/net", str(path).encode(), None, MS_BIND, None),
                   f"bind-mount the network namespace on {path}")
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def remove(path: Path) -> None:
    """Unmount and delete the namespace file at ``path`` (nothing there is not an error)."""
    if _libc.umount2(str(path).encode(), MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL,
                                                                                           errno.ENOENT):
        code = ctypes.get_errno()
        raise OSError(code, f"unmount {path}: {os.strerror(code)}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def is_mounted(path: Path) -> bool:
    """Whether a namespace is bind-mounted at ``path``."""
    wanted = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == wanted for line in f)
