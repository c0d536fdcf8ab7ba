"""The daemon's side of the shims: start one per group, keep a connection to it, find it again after a
restart, and notice when one dies.

Each shim has a directory ``<shims>/<group>/`` (``address``, ``shim.pid``, ``shim.log``) and a socket in
``socket_dir`` named by a hash of that directory (unix socket paths are short). Events a shim publishes
are forwarded to the daemon's exchange as they arrive.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from berth.client.aio import AsyncClient, open_client
from berth.core.errdefs import BerthError, Unavailable
from berth.core.events import Envelope, Exchange
from berth.core.identifiers import validate_identifier

log = structlog.get_logger("berth.shim.manager")

#: Seconds a new shim may take to serve.
START_TIMEOUT = 30.0


@dataclass(eq=False)
class Shim:
    """A connected shim."""

    group: str
    directory: Path
    address: str
    client: AsyncClient
    pid: int
    #: Set when the connection ended (the shim exited, or the daemon is closing).
    gone: trio.Event = field(default_factory=trio.Event)

    async def call(self, method: str, args: dict[str, Any], *, namespace: str) -> Any:
        """Call ``shim.<method>``. Raises: the shim's error; Unavailable when the shim is gone."""
        if self.gone.is_set():
            raise Unavailable(f"shim {self.group} (pid {self.pid}) is gone")
        return await self.client.call(f"shim.{method}", args, namespace=namespace)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, args: dict[str, Any], *, namespace: str) -> AsyncIterator[
            AsyncIterator[Any]]:
        """A streaming call on a connection of its own (a slow reader must not hold up the others)."""
        async with open_client(self.address, namespace=namespace) as client, \
                client.stream(f"shim.{method}", args) as items:
            yield items


class ShimManager:
    """Starts and connects shims; runs their connections in ``nursery``.

    Args:
        directory: where the shims' directories go (``<directory>/<group>``).
        socket_dir: where their sockets go.
        on_gone: awaited with the group's name when a shim's connection ends while the daemon runs.
    """

    def __init__(self, *, directory: Path, socket_dir: Path, exchange: Exchange, nursery: trio.Nursery,
                 on_gone: Callable[[str], Awaitable[None]]) -> None:
        self.directory = directory
        self.socket_dir = socket_dir
        self.exchange = exchange
        self.nursery = nursery
        self.on_gone = on_gone
        self.shims: dict[str, Shim] = {}
        self._locks: dict[str, trio.Lock] = {}
        #: Groups whose shim is being asked to exit: a get() waits for that, then starts a new one.
        self._stopping: set[str] = set()
        self._closing = False

    def socket_path(self, group: str) -> Path:
        return shim_socket_path(self.socket_dir, self.directory / group)

    async def get(self, group: str) -> Shim:
        """The shim of ``group``, connecting to it or starting it first.

        Raises: Unavailable when the shim cannot be started or reached.
        """
        validate_identifier(group, "shim group")
        shim = self.shims.get(group)
        if shim is not None and not shim.gone.is_set() and group not in self._stopping:
            return shim
        async with self._locks.setdefault(group, trio.Lock()):
            shim = self.shims.get(group)
            if shim is not None and not shim.gone.is_set():
                return shim
            with contextlib.suppress(Unavailable):
                return await self.connect(group)
            await self._start(group)
            return await self.connect(group)

    async def _start(self, group: str) -> None:
        directory = self.directory / group
        command = [sys.executable, "-m", "berth.runtimes.shim", "start", "--dir", str(directory),
                   "--socket", str(self.socket_path(group))]
        with trio.move_on_after(START_TIMEOUT) as scope:
            result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False,
                                            stdin=b"")
        if scope.cancelled_caught:
            raise Unavailable(f"shim {group} did not start within {START_TIMEOUT:g} s")
        if result.returncode != 0:
            raise Unavailable(f"shim {group} failed to start: {result.stderr.decode(errors='replace').strip()}")
        log.info("shim_started", group=group, address=result.stdout.decode().strip())

    async def connect(self, group: str) -> Shim:
        """Connect to the running shim of ``group`` (as recorded in its directory) and follow its events.

        Raises: Unavailable when there is none or it does not answer.
        """
        directory = self.directory / group
        recorded = await trio.to_thread.run_sync(_recorded, directory)
        if recorded is None:
            raise Unavailable(f"shim {group} is not running (no address in {directory})")
        address, pid = recorded
        shim: Shim = await self.nursery.start(self._hold, group, directory, address, pid)
        self.shims[group] = shim
        return shim

    async def _hold(self, group: str, directory: Path, address: str, pid: int,
                    task_status: trio.TaskStatus[Shim]) -> None:
        shim: Shim | None = None
        failure = ""
        try:
            async with open_client(address) as client, client.stream("shim.events", {}) as events:
                async for item in events:
                    if shim is None:  # the first item says the subscription is in place
                        shim = Shim(group, directory, address, client, pid)
                        task_status.started(shim)
                        continue
                    self._forward(group, item)
        except* (BerthError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as group_error:
            failure = "; ".join(str(e) for e in group_error.exceptions)
        finally:
            if shim is not None:
                shim.gone.set()
                if self.shims.get(group) is shim:
                    del self.shims[group]
        if shim is None:
            raise Unavailable(f"shim {group} at {address} does not answer: {failure or 'connection closed'}")
        log.info("shim_disconnected", group=group, pid=pid, reason=failure or "connection closed")
        if not self._closing:
            try:
                await self.on_gone(group)
            except Exception as err:
                log.error("shim_cleanup_failed", group=group, error=repr(err))

    def _forward(self, group: str, item: Any) -> None:
        try:
            self.exchange.forward(Envelope(float(item["timestamp"]), str(item["namespace"]), str(item["topic"]),
                                           dict(item["event"])))
        except (BerthError, KeyError, TypeError, ValueError) as err:
            log.warning("shim_event_invalid", group=group, error=str(err))

    def existing_groups(self) -> list[str]:
        """The groups that have a shim directory (a shim may or may not be running there)."""
        try:
            return sorted(p.name for p in self.directory.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    async def shutdown(self, group: str) -> None:
        """Ask the shim of ``group`` to exit if it supervises nothing any more, and wait until it has
        (so that a later :meth:`get` starts a fresh one)."""
        self._stopping.add(group)  # from now on get() waits for the lock: never hands out a shim that exits
        try:
            async with self._locks.setdefault(group, trio.Lock()):
                shim = self.shims.get(group)
                if shim is None:
                    return
                with contextlib.suppress(BerthError):
                    answer = await shim.call("shutdown", {}, namespace="default")
                    if answer.get("stopping"):
                        with trio.move_on_after(5):
                            await shim.gone.wait()
                        with trio.move_on_after(5):  # its socket path is the next shim's: let it go first
                            await _exited(shim.pid)
        finally:
            self._stopping.discard(group)

    async def running(self, group: str) -> bool:
        """Whether the shim recorded for ``group`` is alive."""
        def check() -> bool:
            recorded = _recorded(self.directory / group)
            return recorded is not None and _alive(recorded[1]) and _is_shim(recorded[1])
        return await trio.to_thread.run_sync(check)

    async def kill(self, group: str) -> None:
        """SIGKILL the shim of ``group`` by its recorded pid (it does not answer), and remove its socket."""
        def kill() -> None:
            recorded = _recorded(self.directory / group)
            if recorded is None:
                return
            with contextlib.suppress(ProcessLookupError):
                if _is_shim(recorded[1]):
                    os.kill(recorded[1], signal.SIGKILL)
            with contextlib.suppress(OSError):  # a killed shim cannot remove its socket itself
                self.socket_path(group).unlink()
        await trio.to_thread.run_sync(kill)

    def close(self) -> None:
        """The daemon is stopping: connections ending now are not shims dying."""
        self._closing = True


def _recorded(directory: Path) -> tuple[str, int] | None:
    """The ``(address, pid)`` a shim recorded in its directory, if it did."""
    try:
        return (directory / "address").read_text().strip(), int((directory / "shim.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def shim_socket_path(socket_dir: Path, shim_directory: Path) -> Path:
    """The socket of the shim whose directory is ``shim_directory`` (named by a hash: socket paths are short)."""
    digest = hashlib.sha256(str(shim_directory).encode()).hexdigest()[:24]
    return socket_dir / f"{digest}.sock"


async def _exited(pid: int) -> None:
    """Wait until process ``pid`` has exited (its pidfd turns readable)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _is_shim(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"berth.runtimes.shim" in f.read()
    except OSError:
        return False
