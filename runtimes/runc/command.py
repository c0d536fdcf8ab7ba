"""runc's command line, run from the shim (containerd's ``go-runc``).

Every call goes through the shim's :class:`~berth.runtimes.shim.reaper.Reaper`. A failed command
raises the :mod:`berth.core.errdefs` class its message implies, with runc's own message: from its
JSON log (``--log-format json``) for ``create`` and ``exec``, whose stderr is the container's, and from
stderr for the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from berth.core.errdefs import AlreadyExists, BerthError, FailedPrecondition, Internal, NotFound
from berth.runtimes.shim.reaper import Reaper

#: Bytes of a command's stdout or stderr kept (``runc state``/``ps``/``events --stats`` are small).
_OUTPUT_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class RuntimeBinary:
    """How to run one runc-compatible binary: the wire form the daemon sends the shim."""

    #: The runtime's name in berth (``runc``, ``builtin``).
    name: str
    #: An absolute path.
    binary: str
    #: runc's ``--root``: where it keeps container state.
    root: str
    systemd_cgroup: bool = False
    no_pivot: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "binary": self.binary, "root": self.root,
                "systemd_cgroup": self.systemd_cgroup, "no_pivot": self.no_pivot}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> RuntimeBinary:
        return cls(name=str(raw["name"]), binary=str(raw["binary"]), root=str(raw["root"]),
                   systemd_cgroup=bool(raw.get("systemd_cgroup")), no_pivot=bool(raw.get("no_pivot")))


def classify(message: str, command: str) -> BerthError:
    """The error class a runtime's failure message implies."""
    text = f"{command}: {message}"
    lowered = message.lower()
    if "does not exist" in lowered or "not found" in lowered or "no such process" in lowered:
        return NotFound(text)
    if "already exists" in lowered:
        return AlreadyExists(text)
    if ("not running" in lowered or "not stopped" in lowered or "not paused" in lowered
            or ("cannot" in lowered and "state" in lowered) or "is paused" in lowered):
        return FailedPrecondition(text)
    return Internal(text)


def last_log_error(path: Path) -> str:
    """The last ``error``/``fatal`` message of a runtime's JSON log (empty if none)."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("level") in ("error", "fatal") and entry.get("msg"):
                return str(entry["msg"])
    return ""


async def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(65536):
            if size < _OUTPUT_LIMIT:
                chunks.append(chunk)
                size += len(chunk)
    return b"".join(chunks)


class RuncCommand:
    """One runtime binary, run as the shim's child processes."""

    def __init__(self, runtime: RuntimeBinary, reaper: Reaper) -> None:
        self.runtime = runtime
        self.reaper = reaper

    def _argv(self, args: Sequence[str], log: Path | None = None) -> list[str]:
        argv = [self.runtime.binary, "--root", self.runtime.root]
        if log is not None:
            argv += ["--log", str(log), "--log-format", "json"]
        if self.runtime.systemd_cgroup:
            argv.append("--systemd-cgroup")
        return argv + list(args)

    async def _run(self, args: Sequence[str], *, stdin: bytes | None = None) -> bytes:
        """Run a command that exits on its own; return its stdout. Raises as :func:`classify`."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if stdin is not None else (os.open(os.devnull, os.O_RDONLY), -1)
        try:
            pid = await self.reaper.spawn(self._argv(args), stdin=in_r, stdout=out_w, stderr=err_w)
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, in_r):
                os.close(fd)
        outputs: dict[str, bytes] = {}

        async def collect(name: str, fd: int) -> None:
            outputs[name] = await _read_all(fd)

        async def feed() -> None:
            async with trio.lowlevel.FdStream(in_w) as stream:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(stdin or b"")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, "out", out_r)
            nursery.start_soon(collect, "err", err_r)
            if stdin is not None:
                nursery.start_soon(feed)
            code = await self.reaper.wait(pid)
        if code != 0:
            message = outputs["err"].decode(errors="replace").strip() or f"exit status {code}"
            raise classify(message, f"{self.runtime.name} {args[0]}")
        return outputs["out"]

    async def _run_with_log(self, args: Sequence[str], log: Path, *, stdio: tuple[int, int, int]) -> None:
        """Run ``create``/``exec``: the child's stdio is the container's; errors come from ``log``, which
        must hold no earlier run's (the caller removes it with the rest of its set-up)."""
        pid = await self.reaper.spawn(self._argv(args, log), stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])
        code = await self.reaper.wait(pid)
        if code != 0:
            message = await trio.to_thread.run_sync(last_log_error, log)
            raise classify(message or f"exit status {code}", f"{self.runtime.name} {args[0]}")

    async def create(self, container_id: str, bundle: Path, *, pid_file: Path, log: Path,
                     stdio: tuple[int, int, int], console_socket: Path | None = None, start: bool = False) -> None:
        """``create``; with ``start``, ``run --detach`` (created and started by one runtime process). The
        runtime's errors go to ``log`` (which must not hold an earlier run's)."""
        args = ["run", "--detach"] if start else ["create"]
        args += ["--bundle", str(bundle), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        if self.runtime.no_pivot:
            args.append("--no-pivot")
        await self._run_with_log([*args, container_id], log, stdio=stdio)

    async def exec(self, container_id: str, process: Path, *, pid_file: Path, log: Path,
                   stdio: tuple[int, int, int], console_socket: Path | None = None) -> None:
        """``exec --detach``; the runtime's errors go to ``log`` (which must not hold an earlier run's)."""
        args = ["exec", "--detach", "--process", str(process), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        await self._run_with_log([*args, container_id], log, stdio=stdio)

    async def start(self, container_id: str) -> None:
        await self._run(["start", container_id])

    async def state(self, container_id: str) -> dict[str, Any]:
        return json.loads(await self._run(["state", container_id]))  # type: ignore[no-any-return]

    async def kill(self, container_id: str, signal: int, *, all_processes: bool = False) -> None:
        await self._run(["kill", *(["--all"] if all_processes else []), container_id, str(signal)])

    async def delete(self, container_id: str, *, force: bool = False) -> None:
        await self._run(["delete", *(["--force"] if force else []), container_id])

    async def pause(self, container_id: str) -> None:
        await self._run(["pause", container_id])

    async def resume(self, container_id: str) -> None:
        await self._run(["resume", container_id])

    async def ps(self, container_id: str) -> list[int]:
        pids = json.loads(await self._run(["ps", "--format", "json", container_id]) or b"[]")
        return [int(pid) for pid in pids or []]

    async def stats(self, container_id: str) -> dict[str, Any]:
        """``events --stats``: one sample of the container's cgroup statistics."""
        event = json.loads(await self._run(["events", "--stats", container_id]))
        data: dict[str, Any] = event.get("data") or {}
        return data

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        await self._run(["update", "--resources", "-", container_id], stdin=json.dumps(resources).encode())
