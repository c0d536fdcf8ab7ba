"""What a task's container gets and may do, checked inside real containers (runc, a locally built busybox
image): resource limits enforced, freezing, default capabilities, exec with a TTY, FIFO stdio, the
lifecycle's refusals, and the events in containerd's order."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IMAGE, BerthdProcess
from polling import TaskEvents

from berth.client.sync import Client
from berth.core.errdefs import AlreadyExists, BerthError, FailedPrecondition, InvalidArgument, NotFound


@pytest.fixture
def client(daemon: BerthdProcess) -> Iterator[Client]:
    with daemon.client(timeout=60) as connection:
        yield connection


class Containers:
    """Makes containers for one test and removes all of them (task first) afterwards."""

    def __init__(self, client: Client, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.made: list[str] = []

    def new(self, name: str, args: list[str], **options: Any) -> str:
        container_id = f"{self.prefix}-{name}"[:76]
        self.client.call("containers.new", {"id": container_id, "image": IMAGE,
                                            "options": {"args": args, **options}})
        self.made.append(container_id)
        return container_id

    def run(self, name: str, args: list[str], *, stdio: dict[str, Any] | None = None, **options: Any) -> str:
        container_id = self.new(name, args, **options)
        self.client.call("tasks.create", {"container_id": container_id, "stdio": stdio or {}})
        self.client.call("tasks.start", {"container_id": container_id})
        return container_id

    def output(self, container_id: str) -> str:
        self.client.call("tasks.wait", {"container_id": container_id})
        return b"".join(item["data"] for item in self.client.stream("tasks.logs", {"container_id": container_id})
                        ).decode()

    def remove_all(self) -> None:
        for container_id in self.made:
            with contextlib.suppress(BerthError):
                self.client.call("tasks.kill", {"container_id": container_id, "signal": 9, "all": True})
            with contextlib.suppress(BerthError):
                self.client.call("tasks.wait", {"container_id": container_id})
            with contextlib.suppress(BerthError):
                self.client.call("tasks.delete", {"container_id": container_id})
            with contextlib.suppress(BerthError):
                self.client.call("containers.delete", {"id": container_id, "snapshot_cleanup": True})


@pytest.fixture
def containers(client: Client, request: pytest.FixtureRequest) -> Iterator[Containers]:
    made = Containers(client, request.node.name.removeprefix("test_").replace("_", "-")[:40])
    try:
        yield made
    finally:
        made.remove_all()


def test_memory_limit_is_set_and_enforced(containers: Containers, client: Client) -> None:
    limit = 32 << 20
    cid = containers.run("mem", ["sh", "-c", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || "
                                             "cat /sys/fs/cgroup/memory.max; head -c 128m /dev/zero | tail"],
                         memory_limit=limit)
    status = client.call("tasks.wait", {"container_id": cid})["exit_status"]
    assert containers.output(cid).splitlines()[0] == str(limit)
    assert status == 137  # the shell's pipeline ends with tail, OOM-killed


def test_a_fork_bomb_is_stopped_by_the_pids_limit(containers: Containers, client: Client) -> None:
    script = ("cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max; "
              "for i in $(seq 60); do (sleep 30 &) 2>/dev/null || true; done; echo done; sleep 30")
    cid = containers.run("bomb", ["sh", "-c", script], pids_limit=20)
    deadline = time.monotonic() + 20
    while b"done" not in b"".join(i["data"] for i in client.stream("tasks.logs", {"container_id": cid})):
        assert time.monotonic() < deadline, "the fork loop did not finish"
        time.sleep(0.1)
    processes = client.call("tasks.pids", {"container_id": cid})["processes"]
    assert 10 < len(processes) <= 20  # 60 were asked for; the limit stopped the rest
    log = b"".join(i["data"] for i in client.stream("tasks.logs", {"container_id": cid})).decode()
    assert log.splitlines()[0] == "20"


def test_pause_freezes_and_resume_thaws(containers: Containers, client: Client) -> None:
    cid = containers.run("freeze", ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.05; done"])
    time.sleep(0.3)
    client.call("tasks.pause", {"container_id": cid})
    task = client.call("tasks.get", {"container_id": cid})["task"]
    assert task["status"] == "paused"
    counter = Path(f"/proc/{task['pid']}/root/tmp/n")  # read from the host: an exec would not run now
    before = counter.read_text()
    time.sleep(0.4)
    assert counter.read_text() == before  # frozen: the counter does not move
    with pytest.raises(FailedPrecondition):
        client.call("tasks.exec", {"container_id": cid, "exec_id": "late", "process": {
            "args": ["cat", "/tmp/n"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}})
    client.call("tasks.resume", {"container_id": cid})
    time.sleep(0.4)
    assert int(counter.read_text()) > int(before)


def test_default_capabilities_forbid_mounts_and_sysrq(containers: Containers, client: Client) -> None:
    cid = containers.run("caps", ["sh", "-c", "mkdir -p /tmp/m; mount -t tmpfs tmpfs /tmp/m 2>/dev/null && "
                                              "echo mounted; "
                                              "(echo h > /proc/sysrq-trigger) 2>/dev/null && echo wrote-sysrq; "
                                              "grep CapEff /proc/self/status"])
    assert client.call("tasks.wait", {"container_id": cid})["exit_status"] == 0
    out = containers.output(cid)
    assert "mounted" not in out
    assert "wrote-sysrq" not in out
    effective = int(out.split()[-1], 16)
    assert effective == 0xa80425fb  # containerd's 14 default capabilities
    privileged = containers.run("priv", ["sh", "-c", "mkdir -p /tmp/m; mount -t tmpfs tmpfs /tmp/m && echo mounted"],
                                 privileged=True)
    assert client.call("tasks.wait", {"container_id": privileged})["exit_status"] == 0
    assert containers.output(privileged) == "mounted\n"


def test_exec_with_a_terminal_and_resize(containers: Containers, client: Client) -> None:
    cid = containers.run("tty", ["sleep", "300"])
    client.call("tasks.exec", {"container_id": cid, "exec_id": "shell", "stdio": {"terminal": True, "stdin": True},
                               "process": {"args": ["sh", "-c", "read line; tty; stty size; echo got $line"],
                                           "cwd": "/", "env": ["PATH=/bin", "TERM=xterm"], "terminal": True,
                                           "user": {"uid": 0, "gid": 0}}})
    stream = client.stream("tasks.attach", {"container_id": cid, "exec_id": "shell"})
    assert next(stream) == {"attached": True}
    with Client(client.address) as side:
        side.call("tasks.start", {"container_id": cid, "exec_id": "shell"})
        side.call("tasks.resize", {"container_id": cid, "exec_id": "shell", "width": 100, "height": 40})
        side.call("tasks.write", {"container_id": cid, "exec_id": "shell", "data": b"hello\n"})
    output = b"".join(item.get("stdout", b"") for item in stream).decode()
    assert "/dev/pts/" in output
    assert "40 100\r\n" in output
    assert output.endswith("got hello\r\n")
    assert client.call("tasks.wait", {"container_id": cid, "exec_id": "shell"})["exit_status"] == 0
    with pytest.raises(FailedPrecondition):
        client.call("tasks.resize", {"container_id": cid, "width": 10, "height": 10})  # the init has no TTY


def test_fifo_stdio(containers: Containers, client: Client, tmp_path: Path) -> None:
    paths = {name: tmp_path / name for name in ("in", "out", "err")}
    for path in paths.values():
        os.mkfifo(path)
    received: dict[str, bytes] = {}

    def read(name: str) -> None:
        with open(paths[name], "rb", buffering=0) as fifo:  # one read: the shim keeps the FIFO open
            received[name] = fifo.read(64)

    readers = [threading.Thread(target=read, args=(name,), daemon=True) for name in ("out", "err")]
    for reader in readers:
        reader.start()
    cid = containers.new("fifo", ["sh", "-c", "read x; echo out:$x; echo err:$x >&2; sleep 0.5"])
    client.call("tasks.create", {"container_id": cid, "stdio": {
        "stdin_fifo": str(paths["in"]), "stdout_fifo": str(paths["out"]), "stderr_fifo": str(paths["err"]),
        "log": False}})
    client.call("tasks.start", {"container_id": cid})
    with open(paths["in"], "wb") as fifo:
        fifo.write(b"ping\n")
    for reader in readers:
        reader.join(timeout=20)
    assert received == {"out": b"out:ping\n", "err": b"err:ping\n"}
    assert client.call("tasks.wait", {"container_id": cid})["exit_status"] == 0
    with pytest.raises(NotFound):
        next(iter(client.stream("tasks.logs", {"container_id": cid})))  # log: false keeps none


def test_lifecycle_refusals(containers: Containers, client: Client) -> None:
    with pytest.raises(NotFound):
        client.call("tasks.create", {"container_id": "no-such-container"})
    cid = containers.new("life", ["sleep", "300"])
    client.call("tasks.create", {"container_id": cid})
    assert client.call("tasks.get", {"container_id": cid})["task"]["status"] == "created"
    with pytest.raises(AlreadyExists):
        client.call("tasks.create", {"container_id": cid})
    with pytest.raises(FailedPrecondition):
        client.call("tasks.exec", {"container_id": cid, "exec_id": "e", "process": {"args": ["true"], "cwd": "/"}})
    with pytest.raises(FailedPrecondition):
        client.call("tasks.pause", {"container_id": cid})
    client.call("tasks.start", {"container_id": cid})
    with pytest.raises(FailedPrecondition):
        client.call("tasks.start", {"container_id": cid})
    with pytest.raises(FailedPrecondition):
        client.call("tasks.delete", {"container_id": cid})
    with pytest.raises(FailedPrecondition):
        client.call("containers.delete", {"id": cid})
    with pytest.raises(FailedPrecondition):
        client.call("tasks.resume", {"container_id": cid})
    client.call("tasks.kill", {"container_id": cid, "signal": 15})
    with pytest.raises(FailedPrecondition):
        client.call("tasks.delete", {"container_id": cid})  # pid 1 ignores SIGTERM: still running
    client.call("tasks.kill", {"container_id": cid, "signal": 9, "all": True})
    assert client.call("tasks.wait", {"container_id": cid})["exit_status"] == 137
    with pytest.raises(NotFound):
        client.call("tasks.kill", {"container_id": cid, "signal": 9})  # already finished
    with pytest.raises(FailedPrecondition):
        client.call("tasks.exec", {"container_id": cid, "exec_id": "late", "process": {"args": ["true"], "cwd": "/"}})
    assert client.call("tasks.delete", {"container_id": cid})["exit_status"] == 137
    with pytest.raises(NotFound):
        client.call("tasks.get", {"container_id": cid})
    created = containers.new("never-started", ["true"])
    client.call("tasks.create", {"container_id": created})
    assert client.call("tasks.delete", {"container_id": created})["exit_status"] == 137  # its init is killed


def test_events_come_in_containerds_order(containers: Containers, client: Client, daemon: BerthdProcess) -> None:
    cid = containers.new("events", ["sleep", "300"])
    events_seen = TaskEvents(lambda: daemon.client(timeout=None),
                             lambda topic, event: topic == "/tasks/delete" and event.get("container_id") == cid)
    client.call("tasks.create", {"container_id": cid})
    client.call("tasks.start", {"container_id": cid})
    client.call("tasks.exec", {"container_id": cid, "exec_id": "x", "process": {
        "args": ["sh", "-c", "exit 2"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}})
    client.call("tasks.start", {"container_id": cid, "exec_id": "x"})
    assert client.call("tasks.wait", {"container_id": cid, "exec_id": "x"})["exit_status"] == 2
    client.call("tasks.pause", {"container_id": cid})
    client.call("tasks.resume", {"container_id": cid})
    client.call("tasks.kill", {"container_id": cid, "signal": 9})
    client.call("tasks.wait", {"container_id": cid})
    client.call("tasks.delete", {"container_id": cid})
    mine = events_seen.of(cid)
    order = [topic for topic, _ in mine]
    assert order == ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
                     "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete"]
    exits = [event for topic, event in mine if topic == "/tasks/exit"]
    assert [(e["id"], e["exit_status"]) for e in exits] == [("x", 2), (cid, 137)]


def test_created_and_started_at_once_the_first_attach_gets_what_was_written_before_it(
        containers: Containers, client: Client) -> None:
    cid = containers.new("held", ["sh", "-c", "echo early; echo also >&2; sleep 0.3; echo late"])
    client.call("tasks.create", {"container_id": cid, "start": True, "stdio": {"hold": True}})
    assert client.call("tasks.get", {"container_id": cid})["task"]["status"] in ("running", "stopped")
    time.sleep(0.1)  # "early" and "also" are written before anyone attaches
    output: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    for item in client.stream("tasks.attach", {"container_id": cid}):
        for name, data in item.items():
            if name != "attached":
                output[name] += data
    assert output == {"stdout": b"early\nlate\n", "stderr": b"also\n"}
    assert client.call("tasks.wait", {"container_id": cid})["exit_status"] == 0
    with pytest.raises(FailedPrecondition):
        client.call("tasks.start", {"container_id": cid})  # already started


def test_containers_new_with_a_task_and_delete_with_the_container(containers: Containers, client: Client) -> None:
    """``berth run``'s two calls: the container and its started task in one, the task and then the container
    (with its snapshot) in one."""
    cid = f"{containers.prefix}-both"[:76]
    made = client.call("containers.new", {"id": cid, "image": IMAGE,
                                          "options": {"args": ["sh", "-c", "echo hi; exit 4"]},
                                          "task": {"start": True, "stdio": {"hold": True}}})
    containers.made.append(cid)
    assert made["container"]["id"] == cid
    assert made["task"]["pid"] > 0
    output = b"".join(item.get("stdout", b"") for item in client.stream("tasks.attach", {"container_id": cid}))
    assert output == b"hi\n"
    assert client.call("tasks.wait", {"container_id": cid})["exit_status"] == 4
    with pytest.raises(InvalidArgument):
        client.call("tasks.delete", {"container_id": cid, "exec_id": "x", "remove_container": True})
    assert client.call("tasks.delete", {"container_id": cid, "remove_container": True})["exit_status"] == 4
    for method, args in (("tasks.get", {"container_id": cid}), ("containers.get", {"id": cid}),
                         ("snapshots.stat", {"key": cid})):
        with pytest.raises(NotFound):
            client.call(method, args)
    assert "task" not in client.call("containers.new", {"id": cid, "image": IMAGE, "options": {"args": ["true"]}})


def test_a_task_that_cannot_be_created_in_containers_new_leaves_no_container(
        containers: Containers, client: Client) -> None:
    cid = f"{containers.prefix}-missing"[:76]
    with pytest.raises(BerthError) as raised:
        client.call("containers.new", {"id": cid, "image": IMAGE, "options": {"args": ["/no/such/binary"]},
                                       "task": {"start": True}})
    assert "/no/such/binary" in str(raised.value)
    for method, args in (("tasks.get", {"container_id": cid}), ("containers.get", {"id": cid}),
                         ("snapshots.stat", {"key": cid})):
        with pytest.raises(NotFound):
            client.call(method, args)


def test_users_resolve_from_an_images_kept_files(containers: Containers, client: Client,
                                                 daemon: BerthdProcess) -> None:
    """The first container of an image reads its /etc/passwd and /etc/group from a mounted rootfs and
    keeps a copy; the next ones resolve the same users from the copy."""
    users = []
    for i in range(3):
        cid = containers.new(f"user{i}", ["true"], user="nobody")
        users.append(client.call("containers.get", {"id": cid})["container"]["spec"]["process"]["user"])
    assert users == [{"uid": 65534, "gid": 65534, "additionalGids": [65534]}] * 3
    kept = list((daemon.state / "io.berth.service.v1.tasks-service" / ".users").glob("*/etc/passwd"))
    assert kept  # one per image and snapshotter
    assert all(b"nobody:x:65534" in path.read_bytes() for path in kept)
    with pytest.raises(NotFound):
        containers.new("nouser", ["true"], user="no-such-user")


def test_a_poststop_hook_still_finds_the_rootfs_mounted(containers: Containers, client: Client,
                                                       daemon: BerthdProcess, tmp_path: Path) -> None:
    """Deleting a stopped task unmounts its rootfs while the runtime deletes it, unless the spec has
    poststop hooks (the runtime runs them at delete; they may read the rootfs)."""
    cid = containers.new("hooked", ["true"])
    spec = client.call("containers.get", {"id": cid})["container"]["spec"]
    seen = tmp_path / "seen"
    rootfs = daemon.state / "io.berth.service.v1.tasks-service" / "default" / cid / "rootfs"
    script = f"ls {rootfs}/bin/busybox > {seen} 2>&1"
    spec["hooks"] = {"poststop": [{"path": "/bin/sh", "args": ["sh", "-c", script]}]}
    client.call("containers.update", {"container": {"id": cid, "spec": spec}, "update_mask": ["spec"]})
    client.call("tasks.create", {"container_id": cid, "start": True})
    assert client.call("tasks.wait", {"container_id": cid})["exit_status"] == 0
    client.call("tasks.delete", {"container_id": cid})
    assert seen.read_text().strip().endswith("rootfs/bin/busybox")


def test_a_snapshot_in_the_way_leaves_no_container(containers: Containers, client: Client,
                                                   daemon: BerthdProcess) -> None:
    """With the image's user files kept, the container is recorded before its snapshot is prepared: if
    that fails (a snapshot of that name exists), the container goes again."""
    containers.new("first", ["true"])  # the image's user files are kept from here on
    cid = f"{containers.prefix}-blocked"[:76]
    client.call("snapshots.prepare", {"key": cid, "labels": {"berth.io/gc.root": "1"}})  # not the collector's
    try:
        with pytest.raises(AlreadyExists):
            client.call("containers.new", {"id": cid, "image": IMAGE, "options": {"args": ["true"]}})
        with pytest.raises(NotFound):
            client.call("containers.get", {"id": cid})
        assert not (daemon.root / "io.berth.service.v1.tasks-service" / "default" / cid).exists()  # its /etc files
    finally:
        client.call("snapshots.remove", {"key": cid})
