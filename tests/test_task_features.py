"""Task features beyond test_tasks.py's, checked inside real containers (runc, a locally built busybox
image): an exec with a TTY and its resize, FIFO stdio without a log, a task created and started in one
runtime call, containers.new with its task and tasks.delete with its container, users resolved from an
image's kept files, poststop hooks, and failures that leave no container behind."""

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


def test_fifo_stdio_without_a_log(containers: Containers, client: Client, tmp_path: Path) -> None:
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


def test_users_resolve_from_an_images_kept_files(containers: Containers, client: Client) -> None:
    """The first container of an image reads its /etc/passwd and /etc/group from a mounted rootfs and
    the daemon keeps them; the next ones resolve the same users from them, with no rootfs mounted (that
    path's ordering is test_a_snapshot_in_the_way_leaves_no_container's)."""
    users = []
    for i in range(3):
        cid = containers.new(f"user{i}", ["true"], user="nobody")
        users.append(client.call("containers.get", {"id": cid})["container"]["spec"]["process"]["user"])
    assert users == [{"uid": 65534, "gid": 65534, "additionalGids": [65534]}] * 3
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
