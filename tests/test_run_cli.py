"""``berth run``, ``tasks`` and ``logs`` as a user types them: real containers from a locally built busybox
image, run by runc through a real berthd and its shim."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BERTH, IMAGE, BerthdProcess, clean_env

from berth.client.taskcmds import parse_signal
from berth.core.errdefs import InvalidArgument
from berth.plugins.services.tasks import parse_port


@pytest.fixture
def cid(daemon: BerthdProcess, request: pytest.FixtureRequest) -> Iterator[str]:
    """A container id for one test; whatever the test left of that container is removed afterwards."""
    container_id = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:60]
    yield container_id
    daemon.cli("tasks", "rm", "-f", container_id)
    daemon.cli("containers", "rm", container_id)


def test_run_prints_output_and_exits_with_the_containers_status(daemon: BerthdProcess, cid: str) -> None:
    result = daemon.cli("run", "--rm", IMAGE, cid, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (result.returncode, result.stdout, result.stderr) == (7, "out\n", "err\n")
    assert cid not in daemon.cli("containers", "ls", "-q").stdout.split()  # --rm removed it


def test_run_passes_stdin_and_closes_it_at_end_of_input(daemon: BerthdProcess, cid: str) -> None:
    command = [*BERTH, "--address", str(daemon.address), "run", "--rm", IMAGE, cid,
               "sh", "-c", "read first; cat; echo got $first"]
    result = subprocess.run(command, input="one\ntwo\n", capture_output=True, text=True, env=clean_env(),
                            timeout=60, check=False)
    assert (result.returncode, result.stdout) == (0, "two\ngot one\n"), result.stderr


def test_run_options_reach_the_container(daemon: BerthdProcess, cid: str, tmp_path: Path) -> None:
    (tmp_path / "shared.txt").write_text("from the host\n")
    tmp_path.chmod(0o755)  # the container's user is nobody
    script = "echo $GREETING; pwd; id -u; cat /data/shared.txt; touch /data/new 2>/dev/null || echo ro-mount; " \
             "touch /x 2>/dev/null || echo ro-root; hostname"
    result = daemon.cli("run", "--rm", "--env", "GREETING=ahoy", "--cwd", "/tmp", "--user", "nobody",
                        "--mount", f"type=bind,src={tmp_path},dst=/data,options=rbind:ro", "--read-only",
                        "--hostname", "shipshape", IMAGE, cid, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n") == ["ahoy", "/tmp", "65534", "from the host", "ro-mount", "ro-root",
                                         "shipshape", ""]


def test_detached_run_logs_and_removal(daemon: BerthdProcess, cid: str) -> None:
    result = daemon.cli("run", "-d", IMAGE, cid, "sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.1; done; exit 3")
    assert (result.returncode, result.stdout) == (0, f"{cid}\n")
    assert daemon.cli("containers", "rm", cid).returncode == 1  # refused while it has a task
    logs = daemon.cli("logs", "--follow", cid)
    assert logs.stdout == "tick 1\ntick 2\ntick 3\n"
    listed = daemon.cli("tasks", "ls").stdout
    assert "STOPPED (3)" in next(line for line in listed.splitlines() if line.startswith(cid))
    removed = daemon.cli("tasks", "rm", cid)
    assert removed.stdout == f"{cid}\t3\n"
    assert daemon.cli("containers", "rm", cid).returncode == 0


def test_exec_pause_resume_kill(daemon: BerthdProcess, cid: str) -> None:
    assert daemon.cli("run", "-d", IMAGE, cid, "sleep", "300").returncode == 0
    executed = daemon.cli("tasks", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo inside; exit 4")
    assert (executed.returncode, executed.stdout) == (4, "inside\n")
    assert daemon.cli("tasks", "pause", cid).returncode == 0
    assert "PAUSED" in daemon.cli("tasks", "ls").stdout
    assert daemon.cli("tasks", "resume", cid).returncode == 0
    assert "RUNNING" in daemon.cli("tasks", "ls").stdout
    processes = daemon.cli("tasks", "ps", cid).stdout.splitlines()
    assert processes[0].split() == ["PID", "EXEC"]
    assert len(processes) == 2
    metrics = daemon.cli("tasks", "metrics", "--format", "json", cid)
    assert '"memory"' in metrics.stdout
    assert daemon.cli("tasks", "kill", "-s", "KILL", cid).returncode == 0
    assert daemon.cli("tasks", "rm", "-f", cid).stdout == f"{cid}\t137\n"


def test_signals_to_an_attached_run_reach_the_container(daemon: BerthdProcess, cid: str) -> None:
    command = [*BERTH, "--address", str(daemon.address), "run", "--rm", IMAGE, cid,
               "sh", "-c", "trap 'echo got TERM; exit 5' TERM; echo ready; while true; do sleep 0.1; done"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=clean_env(), text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out) == (5, "got TERM\n"), err


def test_run_with_a_terminal(daemon: BerthdProcess, cid: str) -> None:
    inner = " ".join([*BERTH, "--address", str(daemon.address), "run", "--rm", "-t", IMAGE, cid,
                      "sh", "-c", "'tty; exit 3'"])
    result = subprocess.run(["script", "-qec", inner, "/dev/null"], capture_output=True, text=True,
                            env=clean_env(), timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "/dev/pts/0" in result.stdout  # the container has a terminal


def test_network_modes_without_a_network_plugin(daemon: BerthdProcess, cid: str) -> None:
    assert daemon.cli("run", "-d", IMAGE, cid, "sleep", "300").returncode == 0
    pid = next(line.split()[1] for line in daemon.cli("tasks", "ls").stdout.splitlines() if line.startswith(cid))
    joined = daemon.cli("run", "--rm", "--net", f"container:{cid}", IMAGE, f"{cid}-2", "readlink",
                        "/proc/self/ns/net")
    assert joined.stdout.strip() == os.readlink(f"/proc/{pid}/ns/net")
    host = daemon.cli("run", "--rm", "--net", "host", IMAGE, f"{cid}-3", "readlink", "/proc/self/ns/net")
    assert host.stdout.strip() == os.readlink("/proc/self/ns/net")
    alone = daemon.cli("run", "--rm", IMAGE, f"{cid}-4", "sh", "-c", "ls /sys/class/net")
    assert alone.stdout.split() == ["lo"]
    refused = daemon.cli("run", "--rm", "-p", "8080:80", IMAGE, f"{cid}-5", "true")
    assert refused.returncode == 1
    assert "published ports need a named network" in refused.stderr


def test_errors_name_what_is_wrong(daemon: BerthdProcess, cid: str) -> None:
    missing = daemon.cli("run", "--rm", "localhost/nothing:here", cid, "true")
    assert missing.returncode == 1
    assert "localhost/nothing:here" in missing.stderr
    bad_runtime = daemon.cli("run", "--rm", "--runtime", "nosuch", IMAGE, cid, "true")
    assert bad_runtime.returncode == 1
    assert "runtime 'nosuch' is not loaded" in bad_runtime.stderr
    no_command = daemon.cli("run", "--rm", IMAGE, cid, "/no/such/binary")
    assert no_command.returncode != 0
    assert "/no/such/binary" in no_command.stderr
    assert cid not in daemon.cli("containers", "ls", "-q").stdout.split()  # nothing left behind
    assert daemon.cli("tasks", "kill", "nosuch").returncode == 1


def test_parse_port_and_signal() -> None:
    assert parse_port("8080:80").to_wire() == {"host_port": 8080, "container_port": 80, "protocol": "tcp",
                                               "host_ip": "127.0.0.1"}
    assert parse_port("0.0.0.0:53:53/udp").to_wire() == {"host_port": 53, "container_port": 53,
                                                          "protocol": "udp", "host_ip": "0.0.0.0"}
    for bad in ("80", "a:b", "8080:80/sctp", "70000:80"):
        with pytest.raises(InvalidArgument):
            parse_port(bad)
    assert (parse_signal("9"), parse_signal("KILL"), parse_signal("sigterm")) == (9, 9, 15)
    with pytest.raises(InvalidArgument):
        parse_signal("NOPE")


def test_run_is_quick_to_clean_up(daemon: BerthdProcess, cid: str) -> None:
    """A task's bundle and rootfs mount go with it."""
    assert daemon.cli("run", "--rm", IMAGE, cid, "true").returncode == 0
    bundle = daemon.state / "io.berth.service.v1.tasks-service" / "default" / cid
    deadline = time.monotonic() + 5
    while bundle.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not bundle.exists()
    assert str(bundle) not in Path("/proc/self/mountinfo").read_text()


def test_a_full_disk_loses_log_lines_not_the_container(daemon: BerthdProcess, cid: str, tmp_path: Path) -> None:
    """The container's log directory is a 64 KiB tmpfs: writing 1 MiB fills it. The attached reader still
    gets every byte, the exit status is right, and the shim carries on."""
    assert daemon.cli("containers", "create", IMAGE, cid, "sh", "-c",
                      "head -c 1048576 /dev/zero | tr '\\0' x; exit 9").returncode == 0
    directory = daemon.root / "io.berth.service.v1.tasks-service" / "default" / cid
    saved = tmp_path / "saved"  # its /etc files, put back on the tmpfs
    shutil.copytree(directory, saved)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)], check=True)
    try:
        shutil.copytree(saved, directory, dirs_exist_ok=True)
        with daemon.client(timeout=60) as client:
            client.call("tasks.create", {"container_id": cid})
            received = 0
            stream = client.stream("tasks.attach", {"container_id": cid})
            assert next(stream) == {"attached": True}
            with daemon.client(timeout=60) as starter:
                starter.call("tasks.start", {"container_id": cid})
            for item in stream:
                received += len(item.get("stdout", b""))
            assert received == 1 << 20
            assert client.call("tasks.wait", {"container_id": cid})["exit_status"] == 9
            assert client.call("tasks.delete", {"container_id": cid})["exit_status"] == 9
        assert (directory / "log").stat().st_size < 64 * 1024
        assert daemon.cli("run", "--rm", IMAGE, f"{cid}-after", "echo", "still here").stdout == "still here\n"
    finally:
        subprocess.run(["umount", str(directory)], check=False)
