"""The shim's command line: ``start`` forks a detached shim, waits until it serves, prints its address.

``python -m berth.runtimes.shim start --dir DIR --socket PATH``: the shim runs in a new session (so
the daemon's death or its terminal's signals do not reach it), with ``DIR`` as its home: ``shim.pid``,
``shim.log`` (JSON lines) and ``address``. Exit status 0 once it serves; 1 with the reason on stderr.
Only the standard library is imported before the fork, so the detached shim starts clean.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio

    from berth.core.rpc.server import RPCServer
    from berth.runtimes.shim.service import ShimService


def _serve(directory: Path, socket_path: Path, ready_fd: int) -> None:
    """Run the shim (in the detached child) until it is told to stop."""
    # The shim logs JSON lines: structlog's console extras would import rich (6 MiB and 100 ms of
    # start-up for every shim). A None entry makes `import rich` fail, which structlog handles.
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    import trio

    from berth.core.log import configure_logging
    from berth.core.rpc.protocol import DEFAULT_MAX_MESSAGE_SIZE
    from berth.core.rpc.server import RPCServer, serve_unix
    from berth.runtimes.shim.reaper import Reaper, become_subreaper
    from berth.runtimes.shim.service import ShimService

    configure_logging("info", "json")
    become_subreaper()

    async def main() -> None:
        stop = trio.Event()
        reaper = Reaper()
        service = ShimService(reaper=reaper, socket_dir=socket_path.parent, stop=stop)
        own_uid = os.getuid()
        server = RPCServer.from_services([service], max_message_size=DEFAULT_MAX_MESSAGE_SIZE,
                                         authorize=lambda peer: peer.uid == own_uid)  # the daemon's user only
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            await nursery.start(service.run)
            await nursery.start(lambda task_status: serve_unix(server, socket_path, stop=stop, grace=1.0,
                                                               task_status=task_status))
            nursery.start_soon(_exit_when_orphaned, server, service, stop)
            (directory / "address").write_text(str(socket_path))
            os.write(ready_fd, b"ok")
            os.close(ready_fd)
            await stop.wait()
            await trio.sleep(0.1)  # let the shutdown answer go out
            _forget(directory)  # before the connections close: the daemon may start a new shim here then
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        _forget(directory)


#: Seconds a shim with no task and no daemon connected waits before it exits.
ORPHAN_TIMEOUT = 5.0


async def _exit_when_orphaned(server: RPCServer, service: ShimService, stop: trio.Event) -> None:
    """Stop the shim once it has had neither a task nor a connection for ``ORPHAN_TIMEOUT`` seconds
    (a daemon that stopped, or died, cannot ask it to)."""
    import trio

    idle_since: float | None = None
    while True:
        await trio.sleep(0.5)
        if service.tasks or server.connections:
            idle_since = None
        elif idle_since is None:
            idle_since = trio.current_time()
        elif trio.current_time() - idle_since >= ORPHAN_TIMEOUT:
            stop.set()
            return


def _forget(directory: Path) -> None:
    """Remove this shim's ``address`` and ``shim.pid`` (not those of a newer shim in the same place)."""
    with contextlib.suppress(OSError, ValueError):
        if int((directory / "shim.pid").read_text()) == os.getpid():
            for name in ("address", "shim.pid"):
                with contextlib.suppress(OSError):
                    (directory / name).unlink()


def start(directory: Path, socket_path: Path) -> int:
    """Fork the detached shim and wait for it to serve; return the exit status for this command."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the shim
        try:
            os.close(read_end)
            os.setsid()
            os.chdir("/")
            null = os.open(os.devnull, os.O_RDWR)
            log = os.open(directory / "shim.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(null)
            os.close(log)
            (directory / "shim.pid").write_text(str(os.getpid()))
            _serve(directory, socket_path, write_end)
            code = 0
        except BaseException as err:
            print(f"berth-shim: {err!r}", file=sys.stderr)
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        answer = ready.read()
    if answer != b"ok":
        _, status = os.waitpid(pid, 0)
        tail = ""
        with contextlib.suppress(OSError):
            tail = (directory / "shim.log").read_text()[-2000:]
        print(f"berth-shim: the shim exited before serving (status {status}): {tail}", file=sys.stderr)
        return 1
    print(socket_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m berth.runtimes.shim")
    sub = parser.add_subparsers(dest="command", required=True)
    start_parser = sub.add_parser("start", help="start a detached shim and print its socket")
    start_parser.add_argument("--dir", required=True, type=Path, help="the shim's own directory")
    start_parser.add_argument("--socket", required=True, type=Path, help="the unix socket to serve on")
    args = parser.parse_args(argv)
    return start(args.dir.resolve(), args.socket)


if __name__ == "__main__":
    sys.exit(main())
