"""The bridge plugin inside a real berthd, driven by ``berth run --net bridge -p ...`` (the tasks service
attaches before the task is created and detaches on delete): a daemon SIGKILLed and restarted leaves a
running container its address, route and published port; a daemon killed while containers are being
attached is reconciled at the next start (every recorded attachment belongs to a live task, no veth or
namespace of this daemon is left without one, and the live ones still reach their gateway).

Traffic: only between the containers' namespaces, the test bridge's own address, and 127.0.0.1 on the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import BERTH, BerthdFactory, BerthdProcess, clean_env
from imagebuild import busybox_image, write_oci_archive

from berth.plugins.network import netns, nft

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (containers, netlink, nftables)")

IMAGE = "localhost/busybox:latest"
TAG = os.getpid() % 100000
PORT = 30000 + TAG % 5000


class NetDaemon:
    """A berthd with the network plugin on the test's bridge, restartable on the same root and state."""

    def __init__(self, factory: BerthdFactory, base: Path) -> None:
        self.factory = factory
        self.bridge = f"bd{TAG}"
        self.netns_dir = base / "netns"
        self.instance = hashlib.sha256(str(self.netns_dir.absolute()).encode()).hexdigest()[:8]
        self.config = {"plugins": {"io.berth.network.v1.bridge": {
            "bridge": self.bridge, "subnet": "10.123.50.0/24", "netns_dir": str(self.netns_dir)}}}
        self.name = f"net{TAG}"
        self.process = factory.start(self.config, name=self.name)

    def restart(self) -> BerthdProcess:
        self.process = self.factory.start(self.config, name=self.name)
        return self.process

    def veths(self) -> set[str]:
        """This daemon's host veth ends (by their alias)."""
        found = set()
        for link in Path("/sys/class/net").iterdir():
            with contextlib.suppress(OSError):
                if (link / "ifalias").read_text().startswith(f"berth {self.instance} "):
                    found.add(link.name)
        return found

    def scrub(self) -> None:
        """Remove the containers (while the daemon runs), then whatever of ours is left on the host."""
        bridges = {self.bridge}
        if self.process.alive():
            with contextlib.suppress(Exception):
                bridges |= {n["bridge"] for n in self.process.client().call("network.list", {})["networks"]}
            for container in self.process.cli("containers", "ls", "-q").stdout.split():
                if self.process.cli("tasks", "rm", container).returncode != 0:
                    self.process.cli("tasks", "rm", "-f", container)
                self.process.cli("containers", "rm", container)
        self.process.stop()
        # A daemon killed in containers.new leaves its scratch mount under <state>/.spec (the tasks
        # service's, not the network's): take it away too.
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if line.split()[4].startswith(f"{self.process.state}/"):
                subprocess.run(["umount", "-l", line.split()[4]], capture_output=True, check=False)
        for name in self.veths():
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
        for path in self.netns_dir.glob("*/*"):
            netns.remove(path)

        async def rules() -> None:
            await nft.remove({str(r["comment"]) for r in await nft.rules()
                              if str(r.get("comment", "")).startswith(f"berth {self.instance} ")})
            for bridge in bridges:
                await nft.forget_bridge(bridge)
            await nft.remove_table_if_unused()

        trio.run(rules)
        for bridge in bridges:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


@pytest.fixture
def net(berthd_factory: BerthdFactory, tmp_path: Path) -> Iterator[NetDaemon]:
    daemon = NetDaemon(berthd_factory, tmp_path)
    archive = write_oci_archive(tmp_path / "busybox.tar", {IMAGE: busybox_image()})
    assert daemon.process.cli("images", "import", str(archive)).returncode == 0
    try:
        yield daemon
    finally:
        daemon.scrub()


def fetch(port: int) -> bytes:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                return conn.recv(100)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_running_containers_network_survives_a_daemon_kill(net: NetDaemon) -> None:
    first = net.process
    started = first.cli("run", "-d", "--net", "bridge", "-p", f"{PORT}:8080", IMAGE, "srv", "sh", "-c",
                        "while true; do echo from-srv | nc -l -p 8080; done")
    assert started.returncode == 0, started.stderr
    assert fetch(PORT) == b"from-srv\n"
    first.stop(signal.SIGKILL)
    second = net.restart()  # reconcile runs at start: srv's task lives, so its network stays
    attachment = second.client().call("network.attachment", {"container_id": "srv"})["attachment"]
    assert attachment["interfaces"][0]["addresses"] == ["10.123.50.2/24"]
    assert len(net.veths()) == 1
    assert fetch(PORT) == b"from-srv\n"
    seen = second.cli("run", "--rm", "--net", "bridge", IMAGE, "cli", "sh", "-c",
                      "ip -o -4 addr show eth0; nc 10.123.50.2 8080 </dev/null")
    assert seen.returncode == 0, seen.stderr
    assert "10.123.50.3/24" in seen.stdout  # .2 is still srv's: the allocation survived the kill
    assert seen.stdout.endswith("from-srv\n")
    assert second.cli("tasks", "rm", "-f", "srv").returncode == 0
    assert second.cli("containers", "rm", "srv").returncode == 0
    assert second.client().call("network.attachment", {"container_id": "srv"})["attachment"] is None
    assert net.veths() == set()
    assert list(net.netns_dir.glob("*/*")) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", PORT), timeout=2).close()


def test_a_daemon_killed_while_attaching_is_reconciled_at_restart(net: NetDaemon) -> None:
    first = net.process
    runs = [subprocess.Popen([*BERTH, "--address", str(first.address), "run", "-d", "--net", "bridge", IMAGE,
                              f"c{i}", "sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=clean_env()) for i in range(8)]
    try:
        with first.client() as client:
            deadline = time.monotonic() + 30  # polled tightly: the daemon must die mid-way through the eight
            while not client.call("network.inspect", {"name": "bridge"})["network"]["containers"]:
                assert time.monotonic() < deadline, "no container was ever attached"
                time.sleep(0.005)
        first.stop(signal.SIGKILL)  # the first one is attached: the others are on their way
        for run in runs:
            run.wait(timeout=30)
    finally:
        for run in runs:  # by PID, should the test fail before they ended
            if run.poll() is None:
                run.kill()
                run.wait()
    second = net.restart()
    with second.client() as client:
        tasks = {t["id"]: t["status"] for t in client.call("tasks.list", {})["tasks"]}
        attached = set(client.call("network.inspect", {"name": "bridge"})["network"]["containers"])
    # The tasks service keeps the network of every task it still has (running, or stopped until deleted):
    # whatever was recorded for a container that got no task is gone, and nothing is left on the host
    # without a record. (A task lost with the daemon may have been recorded before its plumbing was done.)
    running = [c for c, status in tasks.items() if status == "running"]
    assert {f"default/{c}" for c in running} <= attached <= {f"default/{c}" for c in tasks}
    assert len(running) <= len(net.veths()) <= len(tasks)
    assert set(running) <= {p.name for p in net.netns_dir.glob("*/*")} <= set(tasks)
    for container in running:
        executed = second.cli("tasks", "exec", "--exec-id", "p", container, "ping", "-c", "1", "-W", "2",
                              "10.123.50.1")
        assert executed.returncode == 0, executed.stdout + executed.stderr
    for container in second.cli("containers", "ls", "-q").stdout.split():
        if second.cli("tasks", "rm", container).returncode != 0:  # a running one needs -f
            second.cli("tasks", "rm", "-f", container)
        assert second.cli("containers", "rm", container).returncode == 0
    assert second.client().call("network.inspect", {"name": "bridge"})["network"]["containers"] == []
    assert net.veths() == set()
    assert list(net.netns_dir.glob("*/*")) == []


def test_fifty_containers_run_at_once_leave_nothing_behind(net: NetDaemon) -> None:
    runs = [subprocess.Popen([*BERTH, "--address", str(net.process.address), "run", "--rm", "--net", "bridge",
                              "-p", f"{PORT + 1 + i}:80", IMAGE, f"m{i}", "sh", "-c", "ip -o -4 addr show eth0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
             for i in range(50)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0] * 50, [err for _, err in outputs if err][:3]
    addresses = {out.split()[3] for out, _ in outputs}
    assert all(a.startswith("10.123.50.") for a in addresses)
    with net.process.client() as client:
        assert client.call("network.inspect", {"name": "bridge"})["network"]["containers"] == []
    assert net.veths() == set()
    assert list(net.netns_dir.glob("*/*")) == []
    assert str(net.netns_dir) not in Path("/proc/self/mountinfo").read_text()
    assert not [r for r in trio.run(nft.rules) if str(r.get("comment", "")).startswith(f"berth {net.instance} ")]
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    assert [line.split()[:3] for line in routes.splitlines() if "10.123.50." in line or "vb" in line] == [
        ["10.123.50.0/24", "dev", net.bridge]]  # the bridge's own route, nothing through a veth
    addresses_left = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    assert [line.split()[1] for line in addresses_left.splitlines() if "10.123.50." in line] == [net.bridge]


def test_run_on_a_named_network(net: NetDaemon) -> None:
    made = net.process.cli("network", "create", "--subnet", "10.123.51.0/24", "--mtu", "1400", "back")
    assert made.returncode == 0, made.stderr
    seen = net.process.cli("run", "--rm", "--net", "back", IMAGE, "c", "sh", "-c",
                           "ip -o -4 addr show eth0; ip route; cat /sys/class/net/eth0/mtu; ping -c 1 -W 2 10.123.51.1")
    assert seen.returncode == 0, seen.stdout + seen.stderr
    assert "10.123.51.2/24" in seen.stdout
    assert "default via 10.123.51.1 dev eth0" in seen.stdout
    assert "\n1400\n" in seen.stdout
    assert net.process.cli("network", "rm", "back").returncode == 0
    refused = net.process.cli("run", "--rm", "--net", "back", IMAGE, "d", "true")
    assert refused.returncode != 0
    assert "network back not found" in refused.stderr
