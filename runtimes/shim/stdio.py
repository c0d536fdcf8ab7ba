"""The stdio of one container process, held by the shim so that it outlives the daemon.

Output (stdout and stderr, or a terminal's single stream) is read by the shim and delivered to every
sink the process has: its log file (appended, raw), its output FIFOs, and the readers attached at that
moment (an attached reader gets what is written from then on; the log file keeps everything). Input
comes from :meth:`ProcessIO.write` calls and the stdin FIFO.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import struct
import termios
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from berth.core.errdefs import FailedPrecondition, InvalidArgument, NotFound

log = structlog.get_logger("berth.shim.stdio")

#: Items an attached reader may fall behind before the output waits for it.
_READER_BUFFER = 64
_CHUNK = 64 * 1024
#: How long to wait for the pty master from the runtime's ``--console-socket`` connection.
CONSOLE_TIMEOUT = 10.0
#: Bytes of output kept for the first reader of a ``hold`` stdio; past that, all of it is dropped (a reader
#: would otherwise get output with a hole in it) and is only in the log.
HOLD_LIMIT = 1 << 20
_INT = struct.Struct("i")


@dataclass(frozen=True, kw_only=True)
class StdioConfig:
    """Where a process's stdio goes (the wire form the daemon sends the shim)."""

    #: Keep stdin open for :meth:`ProcessIO.write` (otherwise it is ``/dev/null``).
    stdin: bool = False
    terminal: bool = False
    #: Append all output to this file.
    log: str = ""
    stdin_fifo: str = ""
    stdout_fifo: str = ""
    stderr_fifo: str = ""
    #: Keep the output written before the first reader attaches and give it to that reader first: a task
    #: started at once (``runc run``) loses nothing to the attach after it (none is kept past ``HOLD_LIMIT``).
    hold: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"stdin": self.stdin, "terminal": self.terminal, "log": self.log, "stdin_fifo": self.stdin_fifo,
                "stdout_fifo": self.stdout_fifo, "stderr_fifo": self.stderr_fifo, "hold": self.hold}

    @classmethod
    def from_wire(cls, raw: dict[str, Any] | None) -> StdioConfig:
        raw = raw or {}
        for key in ("log", "stdin_fifo", "stdout_fifo", "stderr_fifo"):
            value = raw.get(key, "")
            if not isinstance(value, str) or (value and not value.startswith("/")):
                raise InvalidArgument(f"stdio {key} must be an absolute path, not {value!r}")
        return cls(stdin=bool(raw.get("stdin")), terminal=bool(raw.get("terminal")), log=raw.get("log", ""),
                   stdin_fifo=raw.get("stdin_fifo", ""), stdout_fifo=raw.get("stdout_fifo", ""),
                   stderr_fifo=raw.get("stderr_fifo", ""), hold=bool(raw.get("hold")))


class ProcessIO:
    """One process's stdio in the shim.

    Without a terminal: :meth:`open_pipes` gives the child's three descriptors (pass them to the
    runtime, then :meth:`close_child_ends`). With one: :meth:`console_socket` gives the path for the
    runtime's ``--console-socket`` and :meth:`receive_console` takes the pty master. Then :meth:`start`
    copies output until both streams end; ``drained`` is set then.
    """

    def __init__(self, config: StdioConfig) -> None:
        self.config = config
        self.drained = trio.Event()
        self._child_fds: list[int] = []
        self._outputs: list[tuple[str, trio.lowlevel.FdStream]] = []
        self._stdin: trio.lowlevel.FdStream | None = None
        self._master: int | None = None
        self._console: socket.socket | None = None
        self._console_path: Path | None = None
        self._readers: set[trio.MemorySendChannel[tuple[str, bytes]]] = set()
        self._log_fd: int | None = None
        self._fifos: dict[str, trio.lowlevel.FdStream] = {}
        self._closed = False
        #: Writes to the log file that failed (a full disk): their bytes are not in the log.
        self.log_errors = 0
        #: Output kept for the first reader (``config.hold``); ``None`` once a reader has it.
        self._held: list[tuple[str, bytes]] | None = [] if config.hold else None
        self._held_bytes = 0

    # ------------------------------------------------------------------ set-up

    def open_pipes(self) -> tuple[int, int, int]:
        """Make the pipes; return the child's (stdin, stdout, stderr) descriptors."""
        if self.config.stdin or self.config.stdin_fifo:
            child_in, parent_in = os.pipe()
            self._stdin = trio.lowlevel.FdStream(parent_in)
        else:
            child_in = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._child_fds.append(child_in)
        child = [child_in]
        for name in ("stdout", "stderr"):
            read_end, write_end = os.pipe()
            self._outputs.append((name, trio.lowlevel.FdStream(read_end)))
            self._child_fds.append(write_end)
            child.append(write_end)
        return child[0], child[1], child[2]

    def null_stdio(self) -> tuple[int, int, int]:
        """Descriptors for a runtime command whose process gets a terminal (its own stdio is unused)."""
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._child_fds.append(null)
        return null, null, null

    def close_child_ends(self) -> None:
        """Close the child's descriptors in the shim (once the runtime has passed them on)."""
        for fd in self._child_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._child_fds.clear()

    def console_socket(self, path: Path) -> Path:
        """Listen at ``path`` for the runtime's pty master; return ``path``."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(1)
        self._console, self._console_path = sock, path
        return path

    async def receive_console(self) -> None:
        """Take the pty master the runtime sent to the console socket.

        Raises: FailedPrecondition when none arrives in time or the message holds no descriptor.
        """
        assert self._console is not None
        listener = trio.socket.from_stdlib_socket(self._console)
        try:
            with trio.move_on_after(CONSOLE_TIMEOUT):
                conn, _ = await listener.accept()
                with conn:
                    _, ancillary, _, _ = await conn.recvmsg(4096, socket.CMSG_SPACE(4 * _INT.size))
                fds = [fd for level, kind, data in ancillary
                       if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                       for (fd,) in _INT.iter_unpack(data[:len(data) - len(data) % _INT.size])]
                if fds:
                    self._master = fds[0]
                    for extra in fds[1:]:
                        os.close(extra)
        finally:
            listener.close()
            self._console = None
            if self._console_path is not None:
                with contextlib.suppress(OSError):
                    self._console_path.unlink()
        if self._master is None:
            raise FailedPrecondition("the runtime sent no terminal to the console socket")
        master = self._master
        self._outputs.append(("stdout", trio.lowlevel.FdStream(os.dup(master))))
        self._stdin = trio.lowlevel.FdStream(master)

    # ------------------------------------------------------------------ running

    def open_log(self) -> None:
        """Open the log file (``config.log``, if any) for :meth:`start`. Blocking: a worker thread's job,
        done with the caller's other set-up. Raises: OSError."""
        if self.config.log and self._log_fd is None:
            self._log_fd = os.open(self.config.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    async def start(self, nursery: trio.Nursery) -> None:
        """Open the log file (unless :meth:`open_log` did) and the FIFOs, then copy output (and the stdin
        FIFO) in ``nursery``'s tasks.

        Raises: OSError opening the log file or a FIFO.
        """
        if self.config.log and self._log_fd is None:  # not opened with the caller's set-up
            await trio.to_thread.run_sync(self.open_log)
        for name in ("stdout", "stderr"):
            path = getattr(self.config, f"{name}_fifo")
            if path:
                self._fifos[name] = trio.lowlevel.FdStream(await _open_fifo(path))
        if self.config.stdin_fifo and self._stdin is not None:
            nursery.start_soon(self._copy_stdin_fifo, await _open_fifo(self.config.stdin_fifo))
        if not self._outputs:
            self.drained.set()
        remaining = [len(self._outputs)]
        for name, stream in self._outputs:
            nursery.start_soon(self._pump, name, stream, remaining)

    async def _pump(self, name: str, stream: trio.lowlevel.FdStream, remaining: list[int]) -> None:
        try:
            while True:
                try:
                    data = await stream.receive_some(_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    data = b""  # EIO from a pty master whose last slave closed: the end of output
                if not data:
                    return
                await self._deliver(name, data)
        finally:
            with contextlib.suppress(OSError):
                await stream.aclose()
            remaining[0] -= 1
            if remaining[0] == 0:
                for reader in list(self._readers):
                    reader.close()
                self._readers.clear()
                self.drained.set()

    async def _deliver(self, name: str, data: bytes) -> None:
        if self._log_fd is not None:
            fd = self._log_fd
            try:
                await trio.to_thread.run_sync(_write_all, fd, data)
            except OSError as err:  # a full disk loses log lines, never the container or its other readers
                self.log_errors += 1
                if self.log_errors == 1:
                    log.warning("log_write_failed", path=self.config.log, error=str(err))
        fifo = self._fifos.get(name)
        if fifo is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await fifo.send_all(data)
        if self._held is not None:
            if self._held_bytes + len(data) <= HOLD_LIMIT:
                self._held.append((name, data))
                self._held_bytes += len(data)
            else:
                log.warning("held_output_dropped", limit=HOLD_LIMIT, reason="no reader attached yet")
                self._held = None
        for reader in list(self._readers):
            try:
                await reader.send((name, data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._readers.discard(reader)

    async def _copy_stdin_fifo(self, fd: int) -> None:
        async with trio.lowlevel.FdStream(fd) as fifo:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                while data := await fifo.receive_some(_CHUNK):
                    await self.write(data)

    def attach(self) -> tuple[list[tuple[str, bytes]], trio.MemoryReceiveChannel[tuple[str, bytes]]]:
        """The output held for the first reader (empty for later ones, or without ``hold``), and a channel of
        ``(stream name, bytes)`` written from now on, which closes when output ends."""
        held, self._held = self._held or [], None
        send, receive = trio.open_memory_channel[tuple[str, bytes]](_READER_BUFFER)
        if self.drained.is_set():
            send.close()
        else:
            self._readers.add(send)
        return held, receive

    async def write(self, data: bytes) -> None:
        """Write to the process's stdin.

        Raises: FailedPrecondition when stdin is not open (not requested, or closed).
        """
        if self._stdin is None:
            raise FailedPrecondition("the process's stdin is not open")
        try:
            await self._stdin.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
            raise FailedPrecondition(f"the process's stdin is closed: {err}") from None

    async def close_stdin(self) -> None:
        """Close stdin (the process reads end-of-file). A terminal is sent ``^D`` instead."""
        if self._stdin is None:
            return
        if self._master is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._stdin.send_all(b"\x04")
            return
        stream, self._stdin = self._stdin, None
        with contextlib.suppress(OSError):
            await stream.aclose()

    def resize(self, width: int, height: int) -> None:
        """Set the terminal's size. Raises: FailedPrecondition without a terminal."""
        if self._master is None:
            raise FailedPrecondition("the process has no terminal")
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def aclose(self) -> None:
        """Close every descriptor the shim holds for this process."""
        if self._closed:
            return
        self._closed = True
        self.close_child_ends()
        if self._console is not None:
            self._console.close()
        streams: list[trio.lowlevel.FdStream] = [s for _, s in self._outputs] + list(self._fifos.values())
        if self._stdin is not None:
            streams.append(self._stdin)
        self._stdin = None
        for stream in streams:
            with contextlib.suppress(OSError):
                await stream.aclose()
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        for reader in list(self._readers):  # no more output: attached readers end
            reader.close()
        self._readers.clear()
        self.drained.set()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def _open_fifo(path: str) -> int:
    """Open a FIFO read-write and non-blocking, so neither end's absence blocks the shim."""
    def opener() -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"FIFO {path} does not exist") from None
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArgument(f"{path} is not a FIFO")
        return fd
    return await trio.to_thread.run_sync(opener)
