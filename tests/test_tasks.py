"""Tasks on real containers (runc, a locally built busybox image) through a real berthd: output and exit
codes, stdio (attach, stdin, a TTY, FIFOs, the log), what the spec gives the container (env, cwd, user,
bind mounts, a read-only rootfs, limits, capabilities), pause/resume, exec, kill and wait, the lifecycle's
refusals, listing, metrics and events.

One daemon serves the whole module; every test makes its own containers (ids from the test's name) and
removes them, task and snapshot, whatever happens.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IMAGE, BerthdProcess
from fsflags import EXT_MAGIC, filesystem_type, has_topdir_flag
from polling import TaskEvents, wait_for

from berth.client.sync import Client
from berth.conformance.runtime import RuntimeTarget, Session
from berth.core.errdefs import AlreadyExists, BerthError, FailedPrecondition, NotFound

ROOT_PROCESS = {"cwd": "/", "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "user": {"uid": 0, "gid": 0}}

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="real containers need root"),
]



class Tasks(Session):
    """The containers of one test: the conformance suite's session on this module's daemon (its default
    runtime), with the calls only these tests make."""

    def __init__(self, daemon: BerthdProcess, name: str) -> None:
        super().__init__(RuntimeTarget(address=str(daemon.address), runtime="", image=IMAGE, prefix="t", timeout=30),
                         name)
        self.daemon = daemon

    def create(self, name: str, args: list[str], *, stdio: dict[str, Any] | None = None, **options: Any) -> str:
        return self.task(name, args, stdio=stdio, start=False, **options)

    def log(self, container_id: str) -> bytes:
        return b"".join(item["data"] for item in self.client.stream("tasks.logs", {"container_id": container_id}))

    def attached(self, container_id: str, then: Callable[[Client], object], exec_id: str = "") -> dict[str, bytes]:
        """Attach to the process, run ``then`` on a second connection (start it, write to it...), and
        return what each stream carried until the output ended."""
        return self.attach_and(container_id, exec_id, then)

    def run_attached(self, name: str, args: list[str], *, stdio: dict[str, Any] | None = None,
                     **options: Any) -> tuple[dict[str, bytes], int]:
        """Create, attach, start, collect the output; return it and the exit status."""
        container_id = self.create(name, args, stdio=stdio, **options)
        output = self.attached(container_id, lambda side: side.call("tasks.start", {"container_id": container_id}))
        return output, self.wait(container_id)


@pytest.fixture
def tasks(daemon: BerthdProcess, request: pytest.FixtureRequest) -> Iterator[Tasks]:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_").lower()).strip("-")
    made = Tasks(daemon, name[:40])
    try:
        yield made
    finally:
        made.close()



# ---------------------------------------------------------------------------------------------- output


def test_output_and_exit_code(tasks: Tasks) -> None:
    output, status = tasks.run_attached("seven", ["sh", "-c", "echo hi; exit 7"])
    assert (output, status) == ({"stdout": b"hi\n", "stderr": b""}, 7)
    cid = tasks.made[-1]
    assert tasks.wait(cid) == 7  # asked again, the same answer
    assert tasks.log(cid) == b"hi\n"
    deleted = tasks.call("tasks.delete", cid)
    assert deleted["exit_status"] == 7
    with pytest.raises(NotFound):
        tasks.call("tasks.get", cid)


@pytest.mark.parametrize("code", [0, 1, 127, 255])
def test_exit_codes(tasks: Tasks, code: int) -> None:
    assert tasks.run_attached("code", ["sh", "-c", f"exit {code}"])[1] == code


def test_a_missing_command_fails_create(tasks: Tasks) -> None:
    cid = tasks.container("missing", ["/no/such/binary"])
    with pytest.raises(BerthError) as raised:
        tasks.call("tasks.create", cid)
    assert "no/such/binary" in str(raised.value)
    with pytest.raises(NotFound):
        tasks.call("tasks.get", cid)  # nothing left of it
    tasks.client.call("containers.delete", {"id": cid, "snapshot_cleanup": True})
    tasks.made.remove(cid)


def test_stdout_and_stderr_are_separate(tasks: Tasks) -> None:
    script = "echo one; echo two >&2; echo three; echo four >&2"
    output, status = tasks.run_attached("split", ["sh", "-c", script])
    assert status == 0
    assert output == {"stdout": b"one\nthree\n", "stderr": b"two\nfour\n"}


def test_stdin_through_write_and_close_io(tasks: Tasks) -> None:
    cid = tasks.create("stdin", ["sh", "-c", "cat; echo end-of-input"], stdio={"stdin": True})

    def type_in(side: Client) -> None:
        side.call("tasks.start", {"container_id": cid})
        side.call("tasks.write", {"container_id": cid, "data": b"line one\n"})
        side.call("tasks.write", {"container_id": cid, "data": b"\x00binary\xff\n"})
        side.call("tasks.close_io", {"container_id": cid})

    output = tasks.attached(cid, type_in)
    assert output["stdout"] == b"line one\n\x00binary\xff\nend-of-input\n"
    assert tasks.wait(cid) == 0
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.write", cid, data=b"late")  # stdin is closed


def test_write_without_stdin_is_refused(tasks: Tasks) -> None:
    cid = tasks.task("nostdin", ["sleep", "300"])
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.write", cid, data=b"x")


def test_a_big_output_arrives_whole(tasks: Tasks) -> None:
    output, status = tasks.run_attached("big", ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"])
    assert status == 0
    assert output["stdout"] == b"x" * 3_000_000
    assert tasks.log(tasks.made[-1]) == b"x" * 3_000_000


# ---------------------------------------------------------------------------------------------- spec


def test_env_cwd_and_user(tasks: Tasks) -> None:
    output, status = tasks.run_attached(
        "env", ["sh", "-c", "echo $GREETING; echo $PATH; pwd; id -u; id -g; echo $HOME"],
        env=["GREETING=hello there"], cwd="/tmp", user="nobody")
    assert status == 0, output
    greeting, path, cwd, uid, gid, _home = output["stdout"].decode().splitlines()
    assert greeting == "hello there"
    assert "/bin" in path.split(":")  # the image's PATH is kept
    assert (cwd, uid, gid) == ("/tmp", "65534", "65534")


def test_numeric_user_and_group(tasks: Tasks) -> None:
    output, status = tasks.run_attached("uidgid", ["sh", "-c", "id -u; id -g"], user="1234:5678")
    assert (output["stdout"], status) == (b"1234\n5678\n", 0)


def test_an_unknown_user_is_refused(tasks: Tasks) -> None:
    with pytest.raises(NotFound):
        tasks.container("nouser", ["true"], user="no-such-user")
    tasks.made.clear()


def test_hostname(tasks: Tasks) -> None:
    output, _ = tasks.run_attached("host", ["sh", "-c", "hostname; cat /etc/hostname"], hostname="box1")
    assert output["stdout"] == b"box1\nbox1\n"


def test_the_directories_of_every_container_are_spread(tasks: Tasks, daemon: BerthdProcess) -> None:
    """The parents of the container directories, the bundles and runc's state of a namespace carry
    FS_TOPDIR_FL (core/directories.py), where the file system has it."""
    if filesystem_type(daemon.root) != EXT_MAGIC or filesystem_type(daemon.state) != EXT_MAGIC:
        pytest.skip("the daemon's directories are not on ext2/3/4, the file systems with FS_TOPDIR_FL")
    container_id = tasks.create("spread", ["true"])
    service = "io.berth.service.v1.tasks-service"
    for parent in (daemon.root / service / "default", daemon.state / service / "default",
                   daemon.state / "io.berth.runtime.v1.runc" / "root" / "default"):
        assert (parent / container_id).is_dir(), parent
        assert has_topdir_flag(parent), parent


def test_bind_mounts(tasks: Tasks, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("host data\n")
    mounts = [f"type=bind,src={shared},dst=/data,options=rbind:rw",
              f"type=bind,src={shared},dst=/ro,options=rbind:ro",
              {"type": "bind", "source": str(shared), "destination": "/oci", "options": ["rbind", "ro"]}]
    script = ("cat /data/from-host; echo written > /data/from-container && echo rw-ok; "
              "touch /ro/x 2>/dev/null || echo ro-refused; touch /oci/x 2>/dev/null || echo oci-refused; "
              "cat /ro/from-container")
    output, status = tasks.run_attached("bind", ["sh", "-c", script], mounts=mounts)
    assert status == 0, output
    assert output["stdout"] == b"host data\nrw-ok\nro-refused\noci-refused\nwritten\n"
    assert (shared / "from-container").read_text() == "written\n"
    assert not (shared / "x").exists()


def test_read_only_rootfs_refuses_writes(tasks: Tasks) -> None:
    script = "touch /new-file 2>&1; echo status=$?; echo x > /etc/motd 2>/dev/null || echo etc-refused"
    output, status = tasks.run_attached("ro", ["sh", "-c", script], read_only=True)
    assert status == 0
    out = output["stdout"].decode()
    assert "Read-only file system" in out
    assert "status=1" in out
    assert "etc-refused" in out
    writable, _ = tasks.run_attached("rw", ["sh", "-c", "touch /new-file && echo wrote"])
    assert writable["stdout"] == b"wrote\n"


def test_memory_limit_is_in_the_containers_cgroup(tasks: Tasks) -> None:
    limit = 48 << 20
    script = "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max"
    output, status = tasks.run_attached("mem", ["sh", "-c", script], memory_limit=limit)
    assert (output["stdout"], status) == (f"{limit}\n".encode(), 0)
    cid = tasks.task("memmetrics", ["sleep", "300"], memory_limit=limit)
    metrics = tasks.call("tasks.metrics", cid)["metrics"]
    assert int(metrics["memory"]["usage"]["limit"]) == limit


def test_pids_limit_stops_a_fork_bomb(tasks: Tasks) -> None:
    # 40 background sleeps asked for; a fork refused past the limit ends only that subshell
    script = ("cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max; "
              "for i in $(seq 40); do (sleep 100 &) 2>/dev/null; done; echo done; exec sleep 100")
    cid = tasks.create("bomb", ["sh", "-c", script], pids_limit=20)
    received = bytearray()
    items = tasks.client.stream("tasks.attach", {"container_id": cid})
    assert next(items) == {"attached": True}
    with tasks.daemon.client() as side:  # a sync connection drops other streams' items during a call
        side.call("tasks.start", {"container_id": cid})
    for item in items:
        received += item.get("stdout", b"")
        if b"done\n" in received:
            break
    items.close()
    assert received == b"20\ndone\n"
    running = tasks.call("tasks.pids", cid)["processes"]
    assert 10 < len(running) <= 20
    assert int(tasks.call("tasks.metrics", cid)["metrics"]["pids"]["current"]) <= 20
    assert tasks.status(cid) == "running"  # the limit refused forks; it killed nothing
    tasks.call("tasks.kill", cid, signal=9, all=True)
    assert tasks.wait(cid) == 137


def test_default_capabilities_forbid_mount_and_sysrq(tasks: Tasks) -> None:
    script = ("mkdir -p /tmp/m; mount -t tmpfs tmpfs /tmp/m 2>/dev/null && echo mounted; "
              "(echo h > /proc/sysrq-trigger) 2>/dev/null && echo wrote-sysrq; "
              "(echo 1 > /proc/sys/kernel/panic) 2>/dev/null && echo wrote-sysctl; echo done")
    output, status = tasks.run_attached("caps", ["sh", "-c", script])
    assert (output["stdout"], status) == (b"done\n", 0)
    mount = "mkdir -p /tmp/m; mount -t tmpfs tmpfs /tmp/m && echo mounted"
    added, _ = tasks.run_attached("capadd", ["sh", "-c", mount], cap_add=["CAP_SYS_ADMIN"])
    assert added["stdout"] == b"mounted\n"
    dropped, _ = tasks.run_attached("capdrop", ["sh", "-c", "chown nobody /tmp 2>/dev/null || echo chown-refused"],
                                    cap_drop=["CAP_CHOWN"])
    assert dropped["stdout"] == b"chown-refused\n"
    effective, _ = tasks.run_attached("capeff", ["sh", "-c", "grep CapEff /proc/self/status"])
    assert int(effective["stdout"].split()[-1], 16) == 0xa80425fb  # containerd's 14 default capabilities
    privileged, _ = tasks.run_attached("priv", ["sh", "-c", mount], privileged=True)
    assert privileged["stdout"] == b"mounted\n"


# ---------------------------------------------------------------------------------------------- lifecycle


def test_pause_freezes_and_resume_thaws(tasks: Tasks) -> None:
    cid = tasks.task("freeze", ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.02; done"])
    pid = tasks.call("tasks.get", cid)["task"]["pid"]
    counter = Path(f"/proc/{pid}/root/tmp/n")
    wait_for(counter.exists, what="the counter to start")
    tasks.call("tasks.pause", cid)
    assert tasks.status(cid) == "paused"
    frozen = counter.read_text()
    time.sleep(0.3)
    assert counter.read_text() == frozen  # the loop does not move while frozen
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.pause", cid)
    tasks.call("tasks.resume", cid)
    assert tasks.status(cid) == "running"
    wait_for(lambda: counter.read_text() != frozen, what="the counter to move again")
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.resume", cid)


def test_a_paused_task_can_be_killed(tasks: Tasks) -> None:
    cid = tasks.task("pausekill", ["sleep", "300"])
    tasks.call("tasks.pause", cid)
    tasks.call("tasks.kill", cid, signal=9)
    assert tasks.wait(cid) == 137
    assert tasks.status(cid) == "stopped"
    assert tasks.call("tasks.delete", cid)["exit_status"] == 137


def test_exec_into_a_running_task(tasks: Tasks) -> None:
    cid = tasks.task("host", ["sleep", "300"], env=["FROM_INIT=1"])
    process = {**ROOT_PROCESS, "args": ["sh", "-c", "echo out $PWD $(id -u); echo err >&2; exit 3"],
               "cwd": "/etc", "user": {"uid": 65534, "gid": 65534}}
    tasks.call("tasks.exec", cid, exec_id="e1", process=process)
    output = tasks.attached(cid, lambda side: side.call("tasks.start", {"container_id": cid, "exec_id": "e1"}),
                            exec_id="e1")
    assert output == {"stdout": b"out /etc 65534\n", "stderr": b"err\n"}
    assert tasks.wait(cid, "e1") == 3
    assert tasks.call("tasks.get", cid, exec_id="e1")["task"]["status"] == "stopped"
    assert tasks.call("tasks.delete", cid, exec_id="e1")["exit_status"] == 3
    with pytest.raises(NotFound):
        tasks.call("tasks.get", cid, exec_id="e1")
    # the same id can be used again once deleted; the exec sees the init's processes
    tasks.call("tasks.exec", cid, exec_id="e1",
               process={**ROOT_PROCESS, "args": ["sh", "-c", "ps -o comm | grep -c sleep"]})
    again = tasks.attached(cid, lambda side: side.call("tasks.start", {"container_id": cid, "exec_id": "e1"}),
                           exec_id="e1")
    assert again["stdout"] == b"1\n"
    assert tasks.status(cid) == "running"


def test_an_exec_cannot_start_in_a_paused_or_stopped_task(tasks: Tasks) -> None:
    cid = tasks.task("execstate", ["sleep", "300"])
    tasks.call("tasks.exec", cid, exec_id="later", process={**ROOT_PROCESS, "args": ["true"]})
    tasks.call("tasks.pause", cid)
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.start", cid, exec_id="later")
    tasks.call("tasks.resume", cid)
    tasks.call("tasks.kill", cid, signal=9)
    assert tasks.wait(cid) == 137
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.start", cid, exec_id="later")
    assert tasks.call("tasks.get", cid, exec_id="later")["task"]["status"] == "created"
    assert tasks.call("tasks.delete", cid)["exit_status"] == 137


def test_an_exec_that_cannot_start_ends_its_attach(tasks: Tasks) -> None:
    cid = tasks.task("execfail", ["sleep", "300"])
    tasks.call("tasks.exec", cid, exec_id="bad", process={**ROOT_PROCESS, "args": ["/no/such/binary"]})
    items = tasks.client.stream("tasks.attach", {"container_id": cid, "exec_id": "bad"})
    assert next(items) == {"attached": True}
    with tasks.daemon.client() as side, pytest.raises(BerthError) as raised:
        side.call("tasks.start", {"container_id": cid, "exec_id": "bad"})
    assert "/no/such/binary" in str(raised.value)
    assert list(items) == []  # the attach ends (it used to wait for output that never comes)
    assert tasks.wait(cid, "bad") == 255
    assert tasks.call("tasks.get", cid, exec_id="bad")["task"]["status"] == "stopped"
    assert tasks.call("tasks.delete", cid, exec_id="bad")["exit_status"] == 255
    assert tasks.status(cid) == "running"


def test_an_exec_takes_what_it_leaves_out_from_the_container(tasks: Tasks) -> None:
    cid = tasks.task("execdefaults", ["sleep", "300"], env=["FROM_CONTAINER=yes"], cwd="/tmp", user="nobody")
    tasks.call("tasks.exec", cid, exec_id="bare", process={"args": ["sh", "-c", "pwd; id -u; echo $FROM_CONTAINER"]})
    output = tasks.attached(cid, lambda side: side.call("tasks.start", {"container_id": cid, "exec_id": "bare"}),
                            exec_id="bare")
    assert output["stdout"] == b"/tmp\n65534\nyes\n"
    tasks.call("tasks.exec", cid, exec_id="own", process={"args": ["sh", "-c", "pwd; id -u"], "cwd": "/",
                                                          "user": {"uid": 0, "gid": 0}})
    output = tasks.attached(cid, lambda side: side.call("tasks.start", {"container_id": cid, "exec_id": "own"}),
                            exec_id="own")
    assert output["stdout"] == b"/\n0\n"


def test_exec_with_stdin(tasks: Tasks) -> None:
    cid = tasks.task("execin", ["sleep", "300"])
    tasks.call("tasks.exec", cid, exec_id="cat", process={**ROOT_PROCESS, "args": ["cat"]}, stdio={"stdin": True})

    def feed(side: Client) -> None:
        side.call("tasks.start", {"container_id": cid, "exec_id": "cat"})
        side.call("tasks.write", {"container_id": cid, "exec_id": "cat", "data": b"to the exec\n"})
        side.call("tasks.close_io", {"container_id": cid, "exec_id": "cat"})

    assert tasks.attached(cid, feed, exec_id="cat")["stdout"] == b"to the exec\n"
    assert tasks.wait(cid, "cat") == 0


def test_kill_and_wait(tasks: Tasks) -> None:
    # SIGTERM to the whole container: the shell's child dies of it, and the shell reports 128+15
    cid = tasks.task("term", ["sh", "-c", "sleep 300 & wait $!"])
    wait_for(lambda: len(tasks.call("tasks.pids", cid)["processes"]) == 2, what="the child to start")
    tasks.call("tasks.kill", cid, signal=15, all=True)
    assert tasks.wait(cid) == 143
    with pytest.raises(NotFound):
        tasks.call("tasks.kill", cid, signal=9)  # it has finished
    # an exec process (not the namespace's init) dies of SIGTERM itself: 143
    host = tasks.task("termexec", ["sleep", "300"])
    tasks.call("tasks.exec", host, exec_id="s", process={**ROOT_PROCESS, "args": ["sleep", "300"]})
    tasks.call("tasks.start", host, exec_id="s")
    tasks.call("tasks.kill", host, exec_id="s", signal=15)
    assert tasks.wait(host, "s") == 143
    with pytest.raises(NotFound):
        tasks.call("tasks.kill", host, exec_id="s", signal=15)
    # the init ignores SIGTERM (pid 1 without a handler) but not SIGKILL
    tasks.call("tasks.kill", host, signal=15)
    time.sleep(0.2)
    assert tasks.status(host) == "running"
    tasks.call("tasks.kill", host, signal=9)
    assert tasks.wait(host) == 137
    # a trap is honoured
    trapped = tasks.task("trap", ["sh", "-c",
                                  "trap 'exit 42' TERM; touch /tmp/trapped; while true; do sleep 0.05; done"])
    trapped_pid = tasks.call("tasks.get", trapped)["task"]["pid"]
    wait_for(lambda: Path(f"/proc/{trapped_pid}/root/tmp/trapped").exists(), what="the trap to be set")
    tasks.call("tasks.kill", trapped, signal=15)
    assert tasks.wait(trapped) == 42


def test_wait_from_several_callers(tasks: Tasks, daemon: BerthdProcess) -> None:
    cid = tasks.task("waiters", ["sh", "-c", "sleep 0.5; exit 9"])
    results: list[int] = []

    def waiter() -> None:
        with daemon.client(timeout=30) as own:
            results.append(own.call("tasks.wait", {"container_id": cid})["exit_status"])

    threads = [threading.Thread(target=waiter) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert results == [9, 9, 9, 9]


def test_lifecycle_errors(tasks: Tasks) -> None:
    with pytest.raises(NotFound):
        tasks.call("tasks.create", "no-such-container")
    with pytest.raises(NotFound):
        tasks.call("tasks.start", "no-such-container")
    cid = tasks.create("life", ["sleep", "300"])
    assert tasks.status(cid) == "created"
    with pytest.raises(AlreadyExists):
        tasks.call("tasks.create", cid)
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.exec", cid, exec_id="early", process={**ROOT_PROCESS, "args": ["true"]})
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.pause", cid)
    tasks.call("tasks.start", cid)
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.start", cid)
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.resume", cid)
    tasks.call("tasks.kill", cid, signal=15)
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.delete", cid)  # pid 1 ignores SIGTERM: still running
    with pytest.raises(FailedPrecondition):
        tasks.client.call("containers.delete", {"id": cid, "snapshot_cleanup": True})
    with pytest.raises(NotFound):
        tasks.call("tasks.start", cid, exec_id="never-added")
    tasks.call("tasks.kill", cid, signal=9, all=True)
    assert tasks.wait(cid) == 137
    with pytest.raises(NotFound):
        tasks.call("tasks.kill", cid, signal=9)  # already finished
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.start", cid)
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.exec", cid, exec_id="late", process={**ROOT_PROCESS, "args": ["true"]})
    with pytest.raises(FailedPrecondition):
        tasks.call("tasks.pause", cid)
    assert tasks.call("tasks.delete", cid)["exit_status"] == 137
    with pytest.raises(NotFound):
        tasks.call("tasks.delete", cid)
    # a container whose task is gone can have a new one; deleting it before it starts kills its init
    tasks.call("tasks.create", cid)
    assert tasks.call("tasks.delete", cid)["exit_status"] == 137
    tasks.call("tasks.create", cid)
    tasks.call("tasks.start", cid)
    assert tasks.status(cid) == "running"


def test_concurrent_deletes_one_wins(tasks: Tasks, daemon: BerthdProcess) -> None:
    cid = tasks.task("twice", ["sh", "-c", "exit 2"])
    tasks.wait(cid)
    results: list[Any] = []

    def delete() -> None:
        with daemon.client(timeout=30) as own:
            try:
                results.append(own.call("tasks.delete", {"container_id": cid})["exit_status"])
            except BerthError as err:
                results.append(type(err))

    threads = [threading.Thread(target=delete) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert sorted(results, key=str) == sorted([2, NotFound, NotFound], key=str)
    with pytest.raises(NotFound):
        tasks.call("tasks.get", cid)
    tasks.call("tasks.create", cid)  # the container can have a task again


def test_a_missing_fifo_is_not_found_and_leaves_nothing(tasks: Tasks, tmp_path: Path) -> None:
    cid = tasks.container("nofifo", ["true"])
    with pytest.raises(NotFound):
        tasks.call("tasks.create", cid, stdio={"stdout_fifo": str(tmp_path / "missing")})
    with pytest.raises(NotFound):
        tasks.call("tasks.get", cid)
    tasks.call("tasks.create", cid)
    tasks.call("tasks.start", cid)
    assert tasks.wait(cid) == 0


def test_list_and_get_report_each_status(tasks: Tasks) -> None:
    created = tasks.create("created", ["sleep", "300"])
    running = tasks.task("running", ["sleep", "300"])
    paused = tasks.task("paused", ["sleep", "300"])
    tasks.call("tasks.pause", paused)
    stopped = tasks.task("stopped", ["sh", "-c", "exit 4"])
    tasks.wait(stopped)
    listed = {t["id"]: t for t in tasks.client.call("tasks.list", {})["tasks"]}
    expected = {created: "created", running: "running", paused: "paused", stopped: "stopped"}
    assert {cid: listed[cid]["status"] for cid in expected} == expected
    assert listed[stopped]["exit_status"] == 4
    for cid, status in expected.items():
        task = tasks.call("tasks.get", cid)["task"]
        assert task["status"] == status
        assert task["pid"] == listed[cid]["pid"] > 0


def test_logs_and_follow(tasks: Tasks) -> None:
    cid = tasks.task("logs", ["sh", "-c", "echo first; sleep 0.6; echo second >&2; sleep 0.3; echo third"])
    followed = b"".join(item["data"] for item in tasks.client.stream("tasks.logs", {"container_id": cid,
                                                                                    "follow": True}))
    assert followed == b"first\nsecond\nthird\n"  # the follow ended with the task (else the test times out)
    assert tasks.status(cid) == "stopped"
    assert tasks.log(cid) == followed
    with pytest.raises(NotFound):
        next(iter(tasks.client.stream("tasks.logs", {"container_id": "no-such-container"})))


def test_metrics_and_pids(tasks: Tasks) -> None:
    cid = tasks.task("metrics", ["sh", "-c", "sleep 300 & sleep 300 & wait"], pids_limit=64)
    wait_for(lambda: len(tasks.call("tasks.pids", cid)["processes"]) == 3, what="three processes")
    metrics = tasks.call("tasks.metrics", cid)["metrics"]
    assert int(metrics["memory"]["usage"]["usage"]) > 0
    assert int(metrics["pids"]["current"]) == 3
    assert int(metrics["pids"]["limit"]) == 64
    tasks.call("tasks.update", cid, resources={"pids": {"limit": 10}})
    assert int(tasks.call("tasks.metrics", cid)["metrics"]["pids"]["limit"]) == 10
    pids = {p["pid"] for p in tasks.call("tasks.pids", cid)["processes"]}
    assert tasks.call("tasks.get", cid)["task"]["pid"] in pids


# ---------------------------------------------------------------------------------------------- terminals


def test_tty(tasks: Tasks) -> None:
    output, status = tasks.run_attached("tty", ["sh", "-c", "tty; echo a line; exit 5"], stdio={"terminal": True},
                                        tty=True)
    assert status == 5
    assert output["stdout"] == b"/dev/pts/0\r\na line\r\n"
    assert output["stderr"] == b""


def test_the_tasks_stdio_decides_whether_it_has_a_terminal(tasks: Tasks) -> None:
    # a container made without tty, run with a terminal, and the other way round
    output, status = tasks.run_attached("ttylate", ["tty"], stdio={"terminal": True})
    assert (output["stdout"], status) == (b"/dev/pts/0\r\n", 0)
    output, status = tasks.run_attached("ttyoff", ["sh", "-c", "tty; true"], stdio={"terminal": False}, tty=True)
    assert (output["stdout"], status) == (b"not a tty\n", 0)


def test_tty_resize_and_input(tasks: Tasks) -> None:
    cid = tasks.create("resize", ["sh", "-c", "read line; stty size; echo got $line"],
                       stdio={"terminal": True, "stdin": True}, tty=True)

    def drive(side: Client) -> None:
        side.call("tasks.start", {"container_id": cid})
        side.call("tasks.resize", {"container_id": cid, "width": 123, "height": 45})
        side.call("tasks.write", {"container_id": cid, "data": b"typed\n"})

    output = tasks.attached(cid, drive)["stdout"].decode()
    assert "45 123\r\n" in output
    assert output.endswith("got typed\r\n")
    assert tasks.wait(cid) == 0


# ---------------------------------------------------------------------------------------------- FIFOs, events


def test_fifo_stdio(tasks: Tasks, tmp_path: Path) -> None:
    paths = {name: tmp_path / name for name in ("in", "out", "err")}
    for path in paths.values():
        os.mkfifo(path)
    received: dict[str, bytes] = {"out": b"", "err": b""}

    def read(name: str, until: bytes) -> None:
        with open(paths[name], "rb", buffering=0) as fifo:
            while until not in received[name]:
                chunk = fifo.read(4096)
                if not chunk:
                    return
                received[name] += chunk

    readers = [threading.Thread(target=read, args=("out", b"out:3\n"), daemon=True),
               threading.Thread(target=read, args=("err", b"err:ping\n"), daemon=True)]
    for reader in readers:
        reader.start()
    cid = tasks.create("fifo", ["sh", "-c", "read x; for i in 1 2 3; do echo out:$i; sleep 0.1; done; "
                                            "echo err:$x >&2; sleep 300"],
                       stdio={"stdin_fifo": str(paths["in"]), "stdout_fifo": str(paths["out"]),
                              "stderr_fifo": str(paths["err"])})
    tasks.call("tasks.start", cid)
    with open(paths["in"], "wb") as fifo:
        fifo.write(b"ping\n")
    for reader in readers:
        reader.join(timeout=15)
    assert received == {"out": b"out:1\nout:2\nout:3\n", "err": b"err:ping\n"}
    assert tasks.status(cid) == "running"  # read while the task runs
    assert sorted(tasks.log(cid).splitlines()) == [b"err:ping", b"out:1", b"out:2", b"out:3"]  # log: on by default


def test_events_in_containerds_order(tasks: Tasks, daemon: BerthdProcess) -> None:
    last = tasks.container("quick", ["true"])  # deleted last: its /tasks/delete ends the subscription
    cid = tasks.container("events", ["sh", "-c", "sleep 300"])
    events_seen = TaskEvents(lambda: daemon.client(timeout=None),
                             lambda topic, event: topic == "/tasks/delete" and event.get("container_id") == last)
    tasks.call("tasks.create", cid)
    tasks.call("tasks.start", cid)
    tasks.call("tasks.exec", cid, exec_id="x", process={**ROOT_PROCESS, "args": ["sh", "-c", "exit 6"]})
    tasks.call("tasks.start", cid, exec_id="x")
    assert tasks.wait(cid, "x") == 6
    tasks.call("tasks.delete", cid, exec_id="x")
    tasks.call("tasks.pause", cid)
    tasks.call("tasks.resume", cid)
    tasks.call("tasks.kill", cid, signal=9)
    tasks.wait(cid)
    tasks.call("tasks.delete", cid)
    # a task that exits at once still has its exit after its start
    tasks.call("tasks.create", last)
    tasks.call("tasks.start", last)
    tasks.wait(last)
    tasks.call("tasks.delete", last)
    mine = events_seen.of(cid)
    assert [topic for topic, _ in mine] == ["/tasks/create", "/tasks/start", "/tasks/exec-added",
                                            "/tasks/exec-started", "/tasks/exit", "/tasks/paused", "/tasks/resumed",
                                            "/tasks/exit", "/tasks/delete"]
    events = [event for _, event in mine]
    pid = events[0]["pid"]
    assert events[1]["pid"] == pid
    assert events[2]["exec_id"] == events[3]["exec_id"] == "x"
    assert (events[4]["id"], events[4]["exit_status"]) == ("x", 6)
    assert (events[7]["id"], events[7]["pid"], events[7]["exit_status"]) == (cid, pid, 137)
    assert (events[8]["pid"], events[8]["exit_status"]) == (pid, 137)
    order = [topic for topic, _ in events_seen.of(last)]
    assert order == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]


def test_an_oom_kill_is_an_event_and_137(tasks: Tasks, daemon: BerthdProcess) -> None:
    cid = tasks.container("oom", ["sh", "-c", "head -c 128m /dev/zero | tail"], memory_limit=16 << 20)
    events_seen = TaskEvents(lambda: daemon.client(timeout=None),
                             lambda topic, event: topic == "/tasks/exit" and event.get("container_id") == cid)
    tasks.call("tasks.create", cid)
    tasks.call("tasks.start", cid)
    assert tasks.wait(cid) == 137  # the pipeline's last command, tail, was OOM-killed
    assert [topic for topic, _ in events_seen.of(cid)] == ["/tasks/create", "/tasks/start", "/tasks/oom", "/tasks/exit"]


def test_update_changes_the_memory_limit(tasks: Tasks) -> None:
    cid = tasks.task("update", ["sleep", "300"], memory_limit=64 << 20)
    tasks.call("tasks.update", cid, resources={"memory": {"limit": 96 << 20}})
    pid = tasks.call("tasks.get", cid)["task"]["pid"]
    cgroup = Path(f"/proc/{pid}/cgroup").read_text()
    v1 = [line.split(":", 2)[2] for line in cgroup.splitlines() if ":memory:" in line]
    if v1:  # hybrid or v1 (this machine)
        limit = Path(f"/sys/fs/cgroup/memory{v1[0]}/memory.limit_in_bytes").read_text().strip()
    else:  # pure v2
        unified = next(line.split(":", 2)[2] for line in cgroup.splitlines() if line.startswith("0::"))
        limit = Path(f"/sys/fs/cgroup{unified}/memory.max").read_text().strip()
    assert int(limit) == 96 << 20
    assert int(tasks.call("tasks.metrics", cid)["metrics"]["memory"]["usage"]["limit"]) == 96 << 20
