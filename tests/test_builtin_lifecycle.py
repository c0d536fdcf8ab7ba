"""``berth-runtime``'s runc-compatible commands: the create/start split, state from the real process,
kill, delete, exec, ps, list, pause/resume, update, events, spec, --version and the console socket."""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from polling import alive, wait_for

from tests.runtime_fixture import Runtime, RuntimeLab, base_spec, berth_runtime_binary, runtime_lab

pytestmark = pytest.mark.privileged


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[RuntimeLab]:
    with runtime_lab(tmp_path) as lab:
        yield lab


@pytest.fixture
def runtime(lab: RuntimeLab) -> Runtime:
    return lab.runtime("berth-runtime")


def status_of(runtime: Runtime, container_id: str) -> str:
    return str(runtime.state(container_id)["status"])


def blocked_on_the_fifo(pid: int) -> bool:
    """The init has not exec'd the user's program: it is still the runtime's Python, in open(2)."""
    return Path(f"/proc/{pid}/exe").resolve().name.startswith("python") and \
        Path(f"/proc/{pid}/wchan").read_text() in ("fifo_open", "wait_for_partner", "pipe_wait")


def frozen(pid: int) -> bool:
    """Whether ``pid``'s freezer cgroup (v1) or cgroup (v2) is frozen."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            return Path(f"/sys/fs/cgroup/freezer{path}/freezer.state").read_text().strip() == "FROZEN"
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return "frozen 1" in Path(f"/sys/fs/cgroup{path}/cgroup.events").read_text().splitlines()
    raise AssertionError(f"no freezer cgroup for pid {pid}")


def test_create_blocks_the_init_until_start(lab: RuntimeLab, runtime: Runtime) -> None:
    bundle = lab.bundle(["sh", "-c", "echo started; exec sleep 30"])
    pid_file = lab.base / "init.pid"
    _, out, _ = runtime.create(bundle, "c1", "--pid-file", str(pid_file))
    state = runtime.state("c1")
    assert state["status"] == "created"
    assert state["id"] == "c1"
    assert state["bundle"] == str(bundle)
    assert state["pid"] == int(pid_file.read_text())
    wait_for(lambda: blocked_on_the_fifo(state["pid"]), what="the init blocking on the exec fifo")
    assert out.read_text() == ""
    runtime.run("start", "c1")
    wait_for(lambda: out.read_text() == "started\n", what="the container's output")
    assert status_of(runtime, "c1") == "running"
    assert runtime.run("start", "c1", check=False).returncode != 0
    runtime.run("kill", "c1", "KILL")
    wait_for(lambda: status_of(runtime, "c1") == "stopped", what="stopped")
    assert "pid" not in runtime.state("c1") or runtime.state("c1")["pid"] == 0
    runtime.run("delete", "c1")
    assert runtime.container_ids() == []
    assert runtime.run("state", "c1", check=False).returncode != 0


def test_kill_by_name_and_number_and_all(lab: RuntimeLab, runtime: Runtime) -> None:
    trap = "trap 'echo got-term' TERM; trap 'echo got-usr1' USR1; while true; do sleep 0.05; done"
    bundle = lab.bundle(["sh", "-c", trap])
    _, out, _ = runtime.create(bundle, "c1")
    runtime.run("start", "c1")
    runtime.run("kill", "c1", "USR1")
    wait_for(lambda: "got-usr1" in out.read_text(), what="USR1")
    runtime.run("kill", "c1", str(int(signal.SIGTERM)))
    wait_for(lambda: "got-term" in out.read_text(), what="TERM")
    runtime.run("kill", "c1", "SIGUSR1")
    wait_for(lambda: out.read_text().count("got-usr1") == 2, what="SIGUSR1")
    assert runtime.run("kill", "c1", "NOSUCHSIGNAL", check=False).returncode != 0
    runtime.detached("exec", "-d", "c1", "sleep", "30")
    assert len(json.loads(runtime.run("ps", "--format", "json", "c1").stdout)) >= 2  # sh and the exec'd sleep
    runtime.run("kill", "--all", "c1", "KILL")
    wait_for(lambda: status_of(runtime, "c1") == "stopped", what="stopped")
    runtime.run("delete", "c1")


def test_delete_refuses_a_running_container_unless_forced(lab: RuntimeLab, runtime: Runtime) -> None:
    bundle = lab.bundle(["sleep", "30"])
    runtime.create(bundle, "c1")
    runtime.run("start", "c1")
    pid = runtime.state("c1")["pid"]
    refused = runtime.run("delete", "c1", check=False)
    assert refused.returncode != 0
    assert "running" in refused.stderr
    assert status_of(runtime, "c1") == "running"
    runtime.run("delete", "--force", "c1")
    assert not alive(pid)
    assert runtime.container_ids() == []
    assert lab.cgroup_leftovers() == []


def test_a_created_container_can_be_deleted(lab: RuntimeLab, runtime: Runtime) -> None:
    runtime.create(lab.bundle(["true"]), "c1")
    runtime.run("delete", "c1")
    assert runtime.container_ids() == []


def test_exec_ps_list_pause_resume(lab: RuntimeLab, runtime: Runtime) -> None:
    bundle = lab.bundle(["sleep", "30"])
    runtime.create(bundle, "c1")
    runtime.run("start", "c1")
    result = runtime.run("exec", "--env", "GREETING=hi", "--cwd", "/tmp", "c1", "sh", "-c",
                         'echo "$GREETING $(pwd) $$"; exit 3', check=False)
    assert (result.returncode, result.stdout) == (3, "hi /tmp 2\n")
    process = lab.base / "process.json"
    process.write_text(json.dumps({"args": ["id", "-u"], "cwd": "/", "user": {"uid": 1000, "gid": 1000},
                                   "env": ["PATH=/bin"]}))
    assert runtime.run("exec", "--process", str(process), "c1").stdout == "1000\n"
    assert runtime.run("exec", "--user", "1000:1000", "c1", "id", "-g").stdout == "1000\n"

    pids = json.loads(runtime.run("ps", "--format", "json", "c1").stdout)
    assert pids == [runtime.state("c1")["pid"]]
    table = runtime.run("ps", "c1").stdout.splitlines()
    assert "PID" in table[0]
    assert len(table) == 2
    assert runtime.run("list", "-q").stdout == "c1\n"
    listed = json.loads(runtime.run("list", "--format", "json").stdout)
    assert [(c["id"], c["status"], c["pid"]) for c in listed] == [("c1", "running", pids[0])]
    assert "c1" in runtime.run("list").stdout

    runtime.run("pause", "c1")
    assert status_of(runtime, "c1") == "paused"
    assert frozen(pids[0])
    runtime.run("resume", "c1")
    assert status_of(runtime, "c1") == "running"
    assert not frozen(pids[0])
    runtime.run("delete", "--force", "c1")


def test_update_changes_the_cgroup_limits(lab: RuntimeLab, runtime: Runtime) -> None:
    spec = base_spec()
    spec["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 40}}
    runtime.create(lab.bundle(["sleep", "30"], spec), "c1")
    runtime.run("start", "c1")

    def limits() -> str:
        return runtime.run("exec", "c1", "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                           "/sys/fs/cgroup/pids/pids.max").stdout

    assert limits() == f"{64 << 20}\n40\n"
    runtime.run("update", "--memory", "32m", "--pids-limit", "20", "c1")
    assert limits() == f"{32 << 20}\n20\n"
    runtime.run("update", "--resources", "-", "c1", stdin_text=json.dumps({"pids": {"limit": 30}}))
    assert limits() == f"{32 << 20}\n30\n"
    stats = json.loads(runtime.run("events", "--stats", "c1").stdout)
    assert stats["type"] == "stats"
    assert stats["data"]["pids"]["current"] >= 1
    assert stats["data"]["memory"]["usage"]["limit"] == 32 << 20
    runtime.run("delete", "--force", "c1")


def test_run_returns_the_exit_status_and_detach(lab: RuntimeLab, runtime: Runtime) -> None:
    result = runtime.run("run", "--bundle", str(lab.bundle(["sh", "-c", "echo out; echo err >&2; exit 7"])), "c1",
                         check=False)
    assert (result.returncode, result.stdout, result.stderr) == (7, "out\n", "err\n")
    assert runtime.container_ids() == []
    bundle = lab.bundle(["sleep", "30"])
    runtime.detached("run", "-d", "--bundle", str(bundle), "c2")
    assert status_of(runtime, "c2") == "running"
    runtime.run("delete", "--force", "c2")


def test_spec_and_version(tmp_path: Path) -> None:
    binary = berth_runtime_binary()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("berth-runtime version ")
    assert "spec: 1.0" in version
    subprocess.run([binary, "spec", "--bundle", str(tmp_path)], check=True)
    spec = json.loads((tmp_path / "config.json").read_text())
    assert spec["root"]["path"] == "rootfs"
    assert spec["process"]["args"] == ["sh"]
    assert {ns["type"] for ns in spec["linux"]["namespaces"]} >= {"pid", "mount", "ipc", "uts", "network"}
    again = subprocess.run([binary, "spec", "--bundle", str(tmp_path)], capture_output=True, text=True, check=False)
    assert again.returncode != 0
    assert "exists" in again.stderr


def receive_console(listener: socket.socket) -> int:
    """Accept the runtime's connection and return the pty master it sends over SCM_RIGHTS."""
    conn, _ = listener.accept()
    with conn:
        fds = array.array("i")
        _, ancillary, _, _ = conn.recvmsg(1024, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    assert len(fds) == 1
    return fds[0]


def read_until(fd: int, text: bytes) -> bytes:
    seen = b""
    while text not in seen:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side has closed
            break
        if not chunk:
            break
        seen += chunk
    return seen


def test_console_socket_hands_over_a_pty(lab: RuntimeLab, runtime: Runtime) -> None:
    spec = base_spec()
    spec["process"]["terminal"] = True
    bundle = lab.bundle(["sh", "-c", "tty; test -t 0 && echo stdin-is-a-tty; read line; echo got:$line"], spec)
    path = lab.base / "console.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(30)
        status = subprocess.Popen(runtime.command("create", "--bundle", str(bundle), "--console-socket", str(path),
                                                  "c1"), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            master = receive_console(listener)
            _, err = status.communicate(timeout=30)
        finally:
            if status.poll() is None:  # by PID, should the hand-over fail
                status.kill()
                status.wait()
        assert status.returncode == 0, err
    try:
        runtime.run("start", "c1")
        output = read_until(master, b"stdin-is-a-tty")
        assert b"/dev/pts/0" in output
        os.write(master, b"hello\n")
        assert b"got:hello" in read_until(master, b"got:hello")
    finally:
        os.close(master)
    wait_for(lambda: status_of(runtime, "c1") == "stopped", what="stopped")
    runtime.run("delete", "c1")


def test_the_command_loads_no_daemon_libraries() -> None:
    """What ``create``/``start`` import: no trio, structlog or pluggy (start-up stays close to runc's)."""
    probe = ("import sys; import berth.runtimes.builtin.cli, berth.runtimes.builtin.container; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'structlog', 'pluggy')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded == "[]\n"


def test_the_launcher_runs_the_installed_package(tmp_path: Path) -> None:
    """``berth-runtime`` is the sh launcher (interpreter with -S -I), and it finds the package."""
    binary = Path(berth_runtime_binary())
    assert binary.read_text().startswith("#!/bin/sh")
    assert "-S -I" in binary.read_text()
    result = subprocess.run([str(binary), "--root", str(tmp_path), "list", "-q"], capture_output=True, text=True,
                            check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
