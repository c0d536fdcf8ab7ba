"""Shims outlive berthd: a task keeps running across a daemon crash or stop, its exit status is never
lost, a dead shim's tasks are reported stopped and cleaned up, and an idle shim goes away."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import BerthdFactory, BerthdProcess
from imagebuild import busybox_image, write_oci_archive
from polling import alive, wait_for
from taskcleanup import shim_pids

from berth.client.sync import Client
from berth.core.errdefs import NotFound

IMAGE = "localhost/busybox:latest"
CONFIG = {"plugins": {"io.berth.service.v1.tasks-service": {"shim_idle_timeout": 1.0}}}




class Node:
    """One berthd configuration (root and state) that can be started again after a crash."""

    def __init__(self, factory: BerthdFactory, tmp_path: Path) -> None:
        self.factory = factory
        self.name = f"node-{os.getpid()}-{time.monotonic_ns()}"
        self.daemon = factory.start(CONFIG, name=self.name)
        archive = write_oci_archive(tmp_path / "busybox.tar", {IMAGE: busybox_image()})
        assert self.daemon.cli("images", "import", str(archive)).returncode == 0

    def restart(self) -> BerthdProcess:
        """Start berthd again on the same root and state (a fresh socket)."""
        self.daemon = self.factory.start(CONFIG, name=self.name)
        return self.daemon

    def client(self) -> Client:
        return self.daemon.client(timeout=30)

    def run_detached(self, container_id: str, *command: str) -> int:
        result = self.daemon.cli("run", "-d", IMAGE, container_id, *command)
        assert result.returncode == 0, result.stderr
        with self.client() as client:
            return int(client.call("tasks.get", {"container_id": container_id})["task"]["pid"])

    def shim_pid(self) -> int:
        pids = shim_pids(self.daemon.state)
        assert len(pids) == 1, pids
        return pids[0]


@pytest.fixture
def node(berthd_factory: BerthdFactory, tmp_path: Path) -> Node:
    return Node(berthd_factory, tmp_path)


def test_a_task_survives_a_daemon_crash(node: Node) -> None:
    pid = node.run_detached("survivor", "sleep", "300")
    node.daemon.stop(signal.SIGKILL)
    node.restart()
    with node.client() as client:
        task = client.call("tasks.get", {"container_id": "survivor"})["task"]
        assert (task["status"], task["pid"]) == ("running", pid)
        assert alive(pid)
        client.call("tasks.kill", {"container_id": "survivor", "signal": 9})
        assert client.call("tasks.wait", {"container_id": "survivor"})["exit_status"] == 137
        assert client.call("tasks.delete", {"container_id": "survivor"})["exit_status"] == 137
        client.call("containers.delete", {"id": "survivor", "snapshot_cleanup": True})


def test_an_exit_while_the_daemon_is_down_is_kept(node: Node) -> None:
    node.run_detached("quitter", "sh", "-c", "sleep 0.5; exit 7")
    node.daemon.stop(signal.SIGKILL)
    time.sleep(1.5)  # it exits while no daemon runs
    node.restart()
    with node.client() as client:
        assert client.call("tasks.get", {"container_id": "quitter"})["task"]["status"] == "stopped"
        assert client.call("tasks.wait", {"container_id": "quitter"})["exit_status"] == 7
        assert client.call("tasks.delete", {"container_id": "quitter"})["exit_status"] == 7


def test_a_gracefully_stopped_daemon_leaves_its_tasks_running(node: Node) -> None:
    pid = node.run_detached("steady", "sleep", "300")
    assert node.daemon.stop(signal.SIGTERM) == 0
    assert alive(pid)
    node.restart()
    with node.client() as client:
        assert client.call("tasks.get", {"container_id": "steady"})["task"]["status"] == "running"
        client.call("tasks.kill", {"container_id": "steady", "signal": 9})
        client.call("tasks.wait", {"container_id": "steady"})
        client.call("tasks.delete", {"container_id": "steady"})


def test_a_dead_shims_tasks_are_reported_stopped_and_cleaned_up(node: Node) -> None:
    pid = node.run_detached("orphan", "sleep", "300")
    exited = node.run_detached("finished", "sh", "-c", "exit 3")
    with node.client() as client:
        assert client.call("tasks.wait", {"container_id": "finished"})["exit_status"] == 3
    os.kill(node.shim_pid(), signal.SIGKILL)
    with node.client() as client:
        def stopped() -> dict[str, Any] | None:
            task = client.call("tasks.get", {"container_id": "orphan"})["task"]
            return task if task["status"] == "stopped" else None

        task = wait_for(stopped, what="the orphaned task to be reported stopped")
        assert task["exit_status"] == 255  # the shim recorded no status for it
        wait_for(lambda: not alive(pid), what="the orphaned container's process to be killed")
        finished = client.call("tasks.get", {"container_id": "finished"})["task"]
        assert (finished["status"], finished["exit_status"], finished["pid"]) == ("stopped", 3, exited)
        assert client.call("tasks.wait", {"container_id": "orphan"})["exit_status"] == 255
        for container_id, status in (("orphan", 255), ("finished", 3)):
            assert client.call("tasks.delete", {"container_id": container_id})["exit_status"] == status
            bundle = node.daemon.state / "io.berth.service.v1.tasks-service" / "default" / container_id
            assert not bundle.exists()
            assert str(bundle) not in Path("/proc/self/mountinfo").read_text()
            with pytest.raises(NotFound):
                client.call("tasks.get", {"container_id": container_id})
    again = node.daemon.cli("run", "--rm", IMAGE, "after", "echo", "a new shim")
    assert again.stdout == "a new shim\n"


def test_an_idle_shim_exits(node: Node) -> None:
    assert node.daemon.cli("run", "--rm", IMAGE, "brief", "true").returncode == 0
    pid = node.shim_pid()
    wait_for(lambda: not alive(pid), timeout=15, what="the idle shim to exit")
    assert node.daemon.cli("run", "--rm", IMAGE, "brief2", "echo", "fresh").stdout == "fresh\n"


def test_five_running_two_exit_while_the_daemon_is_down(node: Node) -> None:
    """The issue's scenario: 5 running, SIGKILL berthd, 2 exit meanwhile, restart: all 5 listed, the 2
    exits with their real codes, the other 3 still running and attachable."""
    pids = {f"five{i}": node.run_detached(f"five{i}", "sh", "-c", f"sleep {2 if i < 2 else 300}; exit {10 + i}")
            for i in range(5)}
    node.daemon.stop(signal.SIGKILL)
    time.sleep(3)  # five0 and five1 exit (10 and 11) while no daemon runs
    node.restart()
    with node.client() as client:
        tasks = {t["id"]: t for t in client.call("tasks.list", {})["tasks"]}
        assert set(tasks) == set(pids)
        for i in (0, 1):
            task = tasks[f"five{i}"]
            assert (task["status"], task["exit_status"], task["pid"]) == ("stopped", 10 + i, pids[f"five{i}"])
            assert client.call("tasks.wait", {"container_id": f"five{i}"})["exit_status"] == 10 + i
        for i in (2, 3, 4):
            assert tasks[f"five{i}"]["status"] == "running"
            assert alive(pids[f"five{i}"])
        stream = client.stream("tasks.attach", {"container_id": "five2"})
        assert next(stream) == {"attached": True}  # attachable after the restart
        with node.client() as side:
            side.call("tasks.exec", {"container_id": "five2", "exec_id": "hello", "process": {
                "args": ["sh", "-c", "echo hello > /proc/1/fd/1"], "cwd": "/", "env": ["PATH=/bin"],
                "user": {"uid": 0, "gid": 0}}})
            side.call("tasks.start", {"container_id": "five2", "exec_id": "hello"})
        assert next(stream) == {"stdout": b"hello\n"}  # the init's stdout, as held by the shim since before
        stream.close()
        for i in range(5):
            cid = f"five{i}"
            if i >= 2:
                client.call("tasks.kill", {"container_id": cid, "signal": 9})
                assert client.call("tasks.wait", {"container_id": cid})["exit_status"] == 137
            client.call("tasks.delete", {"container_id": cid})
