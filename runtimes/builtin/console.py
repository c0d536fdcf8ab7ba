"""The container's terminal: a pty made inside the container and its master sent over a console socket.

As with runc, the caller of ``create --console-socket PATH`` listens on a unix socket; the runtime connects
to it before the container process starts, and the container process, once in its own ``/dev/pts``, opens
``/dev/ptmx``, makes the pty slave its controlling terminal and its stdio, bind-mounts the slave on
``/dev/console`` (the init only) and sends the master with ``SCM_RIGHTS`` (one message: the name
``/dev/ptmx`` and one descriptor). :func:`receive_pty` is the other side, for callers and tests.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import termios

from berth.core.errdefs import InvalidArgument
from berth.core.linux import MS_BIND
from berth.runtimes.builtin import linux

__all__ = ["connect_console_socket", "receive_pty", "setup_pty"]

_TIOCGPTN = 0x80045430
_TIOCSPTLCK = 0x40045431


def connect_console_socket(path: str) -> int:
    """A descriptor connected to the console socket at ``path`` (inherited by the container process)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise InvalidArgument(f"cannot connect to console socket {path}: {exc.strerror}") from None
    return sock.detach()


def setup_pty(console_fd: int, mount_console: bool) -> None:
    """In the container: make a pty, send its master on ``console_fd``, and take the slave as the
    controlling terminal and stdin, stdout and stderr."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
        number = struct.unpack("I", fcntl.ioctl(master, _TIOCGPTN, b"\0\0\0\0"))[0]
        slave_path = f"/dev/pts/{number}"
        slave = os.open(slave_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        if mount_console:
            if not os.path.exists("/dev/console"):
                os.close(os.open("/dev/console", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            linux.mount(slave_path, "/dev/console", None, MS_BIND)
        sock = socket.socket(fileno=console_fd)
        try:
            sock.sendmsg([b"/dev/ptmx"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [master]))])
        finally:
            sock.close()
    finally:
        os.close(master)
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    os.close(slave)


def receive_pty(sock: socket.socket) -> int:
    """Receive the pty master a container sends on an accepted console connection."""
    fds = array.array("i")
    _, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_LEN(fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if not fds:
        raise InvalidArgument("the console socket message carried no descriptor")
    return fds[0]
