"""The shim's process plumbing, without a daemon: spawning through libc's posix_spawnp (stdio dup'ed onto
0-2, the environment passed, errors as OSError naming the program) and the no-op cgroup migration that pays
the kernel's RCU grace period ahead of the runtime."""

from __future__ import annotations

import os

import pytest
import trio

from berth.runtimes.builtin.cgroups import own_procs_file
from berth.runtimes.shim.cgroupwarm import CgroupWarmUp
from berth.runtimes.shim.reaper import Reaper


async def _spawned(argv: list[str], stdin: int = -1) -> tuple[int, bytes]:
    reaper = Reaper()
    read_end, write_end = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        try:
            pid = await reaper.spawn(argv, stdin=null if stdin < 0 else stdin, stdout=write_end, stderr=write_end)
        finally:
            os.close(write_end)
            os.close(null)
        code = await reaper.wait(pid)
        output = b""
        while chunk := os.read(read_end, 65536):
            output += chunk
        os.close(read_end)
        nursery.cancel_scope.cancel()
    return code, output


def test_spawn_runs_the_command_with_its_stdio_and_environment() -> None:
    os.environ["BERTH_SPAWN_TEST"] = "from the shim"
    try:
        code, output = trio.run(_spawned, ["sh", "-c", 'echo "$BERTH_SPAWN_TEST"; echo err >&2; exit 3'])
    finally:
        del os.environ["BERTH_SPAWN_TEST"]
    assert (code, output) == (3, b"from the shim\nerr\n")


def test_spawn_errors() -> None:
    def spawn(argv: list[str]) -> int:
        return trio.run(lambda: Reaper().spawn(argv, stdin=0, stdout=1, stderr=2))

    with pytest.raises(FileNotFoundError) as raised:
        spawn(["/no/such/program"])
    assert raised.value.filename == "/no/such/program"
    with pytest.raises(ValueError, match="null byte"):
        spawn(["echo", "a\0b"])


@pytest.mark.skipif(own_procs_file() is None, reason="no cgroup hierarchy found")
def test_the_warm_up_moves_the_process_into_its_own_cgroup() -> None:
    procs = own_procs_file()
    assert procs is not None
    assert procs.endswith("/cgroup.procs")
    with open(procs) as f:
        assert str(os.getpid()) in f.read().split()

    warm = CgroupWarmUp()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            warm.start(nursery)
            warm.start(nursery)  # one at a time: this one does nothing

    with open(f"/proc/{os.getpid()}/cgroup") as f:
        before = f.read()
    trio.run(main)
    assert warm._procs == procs  # the write went through (a failed one gives up: None)
    with open(f"/proc/{os.getpid()}/cgroup") as f:
        assert f.read() == before  # moved where it already was
