"""The shim outlives berthd: tasks keep running across a daemon SIGKILL or stop (same pid, still attachable,
exec works; the issue's five-running-two-exit scenario), an exit while no daemon runs keeps its status, a
SIGKILLed shim's tasks are reported stopped and their processes, bundles and rootfs mounts removed (whether
the daemon saw the shim die or found it dead at start-up), and a shim with nothing left to supervise exits
after ``shim_idle_timeout``.

Each test has its own daemon configuration (root and state) that it starts again after killing it;
the factory kills any shim or container left at the end.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import IMAGE, BerthdFactory, BerthdProcess
from imagebuild import busybox_image, write_oci_archive
from polling import alive, wait_for
from taskcleanup import TASKS_STATE, shim_pids

from berth.client.sync import Client
from berth.core.errdefs import NotFound

IDLE = {"plugins": {"io.berth.service.v1.tasks-service": {"shim_idle_timeout": 1.0}}}
ROOT_PROCESS = {"cwd": "/", "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "user": {"uid": 0, "gid": 0}}

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="real containers need root"),
]




def mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_oci_archive(tmp_path_factory.mktemp("image") / "busybox.tar", {IMAGE: busybox_image()})


class Node:
    """One daemon configuration that can be killed and started again on the same root and state."""

    def __init__(self, factory: BerthdFactory, archive: Path, config: dict[str, Any] | None = None) -> None:
        self.factory = factory
        self.config = config or IDLE
        self.name = f"restart-{time.monotonic_ns()}"
        self.daemon = factory.start(self.config, name=self.name)
        imported = self.daemon.cli("images", "import", str(archive))
        assert imported.returncode == 0, imported.stderr

    def restart(self) -> BerthdProcess:
        self.daemon = self.factory.start(self.config, name=self.name)
        return self.daemon

    def client(self) -> Client:
        return self.daemon.client(timeout=30)

    def import_image(self, archive: Path, namespace: str) -> None:
        imported = self.daemon.cli("--namespace", namespace, "images", "import", str(archive))
        assert imported.returncode == 0, imported.stderr

    def run(self, container_id: str, args: list[str], namespace: str = "default") -> int:
        with self.daemon.client(timeout=30, namespace=namespace) as client:
            client.call("containers.new", {"id": container_id, "image": IMAGE, "options": {"args": args}})
            client.call("tasks.create", {"container_id": container_id})
            return int(client.call("tasks.start", {"container_id": container_id})["pid"])

    def run_detached(self, container_id: str, *command: str) -> int:
        """``berth run -d`` (stdio to the log, held for the first attach); return the init's pid."""
        result = self.daemon.cli("run", "-d", IMAGE, container_id, *command)
        assert result.returncode == 0, result.stderr
        with self.client() as client:
            return int(client.call("tasks.get", {"container_id": container_id})["task"]["pid"])

    def bundle(self, container_id: str, namespace: str = "default") -> Path:
        return self.daemon.state / TASKS_STATE / namespace / container_id

    def shim_pid(self, group: str = "default") -> int:
        path = self.daemon.state / TASKS_STATE / "shims" / group / "shim.pid"
        pid = int(path.read_text())
        assert pid in shim_pids(self.daemon.state)
        return pid

    def remove(self, client: Client, container_id: str) -> dict[str, Any]:
        deleted: dict[str, Any] = client.call("tasks.delete", {"container_id": container_id})
        client.call("containers.delete", {"id": container_id, "snapshot_cleanup": True})
        return deleted


@pytest.fixture
def node(berthd_factory: BerthdFactory, archive: Path) -> Node:
    return Node(berthd_factory, archive)


def test_a_running_task_survives_a_daemon_sigkill(node: Node) -> None:
    pid = node.run("survivor", ["sh", "-c", "sleep 300 & wait"])
    shim = node.shim_pid()
    node.daemon.stop(signal.SIGKILL)
    assert alive(pid)
    assert alive(shim)
    node.restart()
    assert node.shim_pid() == shim  # reconnected, not replaced
    with node.client() as client:
        task = client.call("tasks.get", {"container_id": "survivor"})["task"]
        assert (task["status"], task["pid"]) == ("running", pid)
        assert [t["id"] for t in client.call("tasks.list", {})["tasks"]] == ["survivor"]
        assert len(client.call("tasks.pids", {"container_id": "survivor"})["processes"]) == 2
        # exec and its output still work through the reconnected shim
        client.call("tasks.exec", {"container_id": "survivor", "exec_id": "after", "process": {
            **ROOT_PROCESS, "args": ["sh", "-c", "echo still here; exit 5"]}})
        stream = client.stream("tasks.attach", {"container_id": "survivor", "exec_id": "after"})
        assert next(stream) == {"attached": True}
        with node.client() as side:
            side.call("tasks.start", {"container_id": "survivor", "exec_id": "after"})
        assert b"".join(item.get("stdout", b"") for item in stream) == b"still here\n"
        assert client.call("tasks.wait", {"container_id": "survivor", "exec_id": "after"})["exit_status"] == 5
        client.call("tasks.kill", {"container_id": "survivor", "signal": 9})
        assert client.call("tasks.wait", {"container_id": "survivor"})["exit_status"] == 137
        rootfs = node.bundle("survivor") / "rootfs"
        assert mounted(rootfs)
        assert node.remove(client, "survivor")["exit_status"] == 137
        assert not mounted(rootfs)
        assert not node.bundle("survivor").exists()
        assert not alive(pid)


def test_an_exit_while_the_daemon_is_down_keeps_its_status(node: Node) -> None:
    pid = node.run("quitter", ["sh", "-c", "while [ ! -e /proc/1/root/tmp/go ]; do sleep 0.05; done; exit 7"])
    node.run("stayer", ["sleep", "300"])
    node.daemon.stop(signal.SIGKILL)
    Path(f"/proc/{pid}/root/tmp/go").touch()  # let it exit now that no daemon runs
    wait_for(lambda: not alive(pid), what="the task's exit")
    node.restart()
    with node.client() as client:
        tasks = {t["id"]: t for t in client.call("tasks.list", {})["tasks"]}
        assert (tasks["quitter"]["status"], tasks["quitter"]["exit_status"], tasks["quitter"]["pid"]) == (
            "stopped", 7, pid)
        assert tasks["stayer"]["status"] == "running"
        got = client.call("tasks.get", {"container_id": "quitter"})["task"]
        assert (got["status"], got["exit_status"]) == ("stopped", 7)
        assert client.call("tasks.wait", {"container_id": "quitter"})["exit_status"] == 7
        assert node.remove(client, "quitter")["exit_status"] == 7
        client.call("tasks.kill", {"container_id": "stayer", "signal": 9})
        assert client.call("tasks.wait", {"container_id": "stayer"})["exit_status"] == 137
        node.remove(client, "stayer")


def test_a_killed_shims_tasks_are_stopped_and_cleaned_up(node: Node) -> None:
    pid = node.run("orphan", ["sh", "-c", "sleep 300 & wait"])
    exited = node.run("done", ["sh", "-c", "exit 3"])
    with node.client() as client:
        assert client.call("tasks.wait", {"container_id": "done"})["exit_status"] == 3
        children = [p["pid"] for p in client.call("tasks.pids", {"container_id": "orphan"})["processes"]]
        assert pid in children
        assert len(children) == 2
        waiter = node.client()
        socket = Path((node.daemon.state / TASKS_STATE / "shims" / "default" / "address").read_text().strip())
        assert socket.is_socket()
        os.kill(node.shim_pid(), signal.SIGKILL)
        # a wait in progress when the shim dies gets the answer the daemon settles on
        assert waiter.call("tasks.wait", {"container_id": "orphan"})["exit_status"] == 255
        waiter.close()
        task = client.call("tasks.get", {"container_id": "orphan"})["task"]
        assert (task["status"], task["exit_status"]) == ("stopped", 255)  # the shim recorded nothing
        for child in children:
            wait_for(lambda child=child: not alive(child), what=f"process {child} to be killed")
        assert not socket.exists()  # the daemon removed the dead shim's socket
        with pytest.raises(NotFound):
            client.call("tasks.get", {"container_id": "orphan", "exec_id": "never-made"})
        done = client.call("tasks.get", {"container_id": "done"})["task"]
        assert (done["status"], done["exit_status"], done["pid"]) == ("stopped", 3, exited)  # recorded
        with pytest.raises(NotFound):
            client.call("tasks.kill", {"container_id": "orphan", "signal": 9})
        for container_id, status in (("orphan", 255), ("done", 3)):
            rootfs = node.bundle(container_id) / "rootfs"
            assert node.remove(client, container_id)["exit_status"] == status
            assert not mounted(rootfs)
            assert not node.bundle(container_id).exists()
            with pytest.raises(NotFound):
                client.call("tasks.get", {"container_id": container_id})
        # the group gets a new shim
        assert node.run("next", ["true"]) > 0
        assert client.call("tasks.wait", {"container_id": "next"})["exit_status"] == 0
        node.remove(client, "next")


def test_a_shim_killed_while_the_daemon_is_down(node: Node) -> None:
    pid = node.run("lonely", ["sleep", "300"])
    node.run("finished", ["sh", "-c", "exit 9"])
    with node.client() as client:
        client.call("tasks.wait", {"container_id": "finished"})
    node.daemon.stop(signal.SIGKILL)
    shim = node.shim_pid()
    os.kill(shim, signal.SIGKILL)
    wait_for(lambda: not alive(shim), what="the shim to die")
    node.restart()
    with node.client() as client:
        tasks = {t["id"]: (t["status"], t["exit_status"]) for t in client.call("tasks.list", {})["tasks"]}
        assert tasks == {"lonely": ("stopped", 255), "finished": ("stopped", 9)}
        wait_for(lambda: not alive(pid), what="the orphaned container to be killed")
        for container_id, status in (("lonely", 255), ("finished", 9)):
            rootfs = node.bundle(container_id) / "rootfs"
            assert client.call("tasks.wait", {"container_id": container_id})["exit_status"] == status
            assert node.remove(client, container_id)["exit_status"] == status
            assert not mounted(rootfs)
            assert not node.bundle(container_id).exists()


def test_each_namespaces_shim_is_reconnected(node: Node, archive: Path) -> None:
    for ns in ("alpha", "beta"):
        node.import_image(archive, ns)
    pids = {ns: node.run(f"in-{ns}", ["sleep", "300"], namespace=ns) for ns in ("alpha", "beta")}
    shims = {ns: node.shim_pid(ns) for ns in pids}
    assert shims["alpha"] != shims["beta"]
    assert node.daemon.stop(signal.SIGTERM) == 0  # a graceful stop leaves the tasks running too
    node.restart()
    for ns, pid in pids.items():
        assert node.shim_pid(ns) == shims[ns]
        with node.daemon.client(timeout=30, namespace=ns) as client:
            assert [t["id"] for t in client.call("tasks.list", {})["tasks"]] == [f"in-{ns}"]
            task = client.call("tasks.get", {"container_id": f"in-{ns}"})["task"]
            assert (task["status"], task["pid"]) == ("running", pid)
            client.call("tasks.kill", {"container_id": f"in-{ns}", "signal": 9})
            assert client.call("tasks.wait", {"container_id": f"in-{ns}"})["exit_status"] == 137
            node.remove(client, f"in-{ns}")


def test_the_shim_exits_once_idle_and_a_busy_one_stays(node: Node) -> None:
    node.run("busy", ["sleep", "300"])
    node.run("brief", ["true"])
    shim = node.shim_pid()
    with node.client() as client:
        client.call("tasks.wait", {"container_id": "brief"})
        node.remove(client, "brief")
        time.sleep(1.5)  # past shim_idle_timeout: the shim still has "busy"
        assert alive(shim)
        client.call("tasks.kill", {"container_id": "busy", "signal": 9})
        client.call("tasks.wait", {"container_id": "busy"})
        node.remove(client, "busy")  # the last task: the shim may go now
        wait_for(lambda: not alive(shim), timeout=10, what="the idle shim to exit")
        assert shim_pids(node.daemon.state) == []
        assert node.run("later", ["true"]) > 0  # a new shim
        assert node.shim_pid() != shim
        client.call("tasks.wait", {"container_id": "later"})
        node.remove(client, "later")


def test_creates_racing_the_idle_shutdown(berthd_factory: BerthdFactory, archive: Path) -> None:
    """A create that comes just as an idle shim is told to exit gets a working shim (it used to get
    the exiting one and fail with Unavailable)."""
    node = Node(berthd_factory, archive, {"plugins": {"io.berth.service.v1.tasks-service": {
        "shim_idle_timeout": 0.2}}})
    rng = random.Random(7)
    with node.client() as client:
        for i in range(8):
            node.run(f"race{i}", ["true"])
            assert client.call("tasks.wait", {"container_id": f"race{i}"})["exit_status"] == 0
            node.remove(client, f"race{i}")
            time.sleep(0.2 + rng.uniform(-0.01, 0.03))


def test_five_running_two_exit_while_the_daemon_is_down(node: Node) -> None:
    """The issue's scenario: 5 running, SIGKILL berthd, 2 exit meanwhile, restart: all 5 listed, the 2
    exits with their real codes, the other 3 still running and attachable."""
    gate = "while [ ! -e /proc/1/root/tmp/go ]; do sleep 0.05; done"
    pids = {f"five{i}": node.run_detached(f"five{i}", "sh", "-c", f"{gate}; exit {10 + i}" if i < 2 else "sleep 300")
            for i in range(5)}
    node.daemon.stop(signal.SIGKILL)
    for i in (0, 1):  # they exit (10 and 11) while no daemon runs
        Path(f"/proc/{pids[f'five{i}']}/root/tmp/go").touch()
        wait_for(lambda i=i: not alive(pids[f"five{i}"]), what=f"five{i} to exit")
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
                **ROOT_PROCESS, "args": ["sh", "-c", "echo hello > /proc/1/fd/1"]}})
            side.call("tasks.start", {"container_id": "five2", "exec_id": "hello"})
        assert next(stream) == {"stdout": b"hello\n"}  # the init's stdout, as held by the shim since before
        stream.close()
