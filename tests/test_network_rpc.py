"""The network service over RPC and the ``berth network`` commands, on a real berthd: create, list,
inspect and remove named networks, errors as errdefs codes, and the plugin's row in ``berth plugins ls``.
Nothing is sent over any network; the daemon's bridge and subnets are the test's own."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import BerthdFactory, BerthdProcess

from berth.core.errdefs import AlreadyExists, InvalidArgument, NotFound, Unimplemented
from berth.plugins.network import nft

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netlink, nftables)")

TAG = os.getpid() % 100000
BRIDGE = f"br{TAG}"


@pytest.fixture
def daemon(berthd_factory: BerthdFactory, tmp_path: Path) -> Iterator[BerthdProcess]:
    process = berthd_factory.start({"plugins": {"io.berth.network.v1.bridge": {
        "bridge": BRIDGE, "subnet": "10.123.30.0/24", "netns_dir": str(tmp_path / "netns")}}})
    bridges = [BRIDGE]
    try:
        yield process
    finally:
        with contextlib.suppress(Exception):
            bridges += [n["bridge"] for n in process.client().call("network.list", {})["networks"]]
        process.stop()
        for bridge in bridges:
            with contextlib.suppress(Exception):
                trio.run(nft.forget_bridge, bridge)
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
        trio.run(nft.remove_table_if_unused)


def test_networks_over_rpc(daemon: BerthdProcess) -> None:
    with daemon.client() as client:
        listed = client.call("network.list", {})["networks"]
        assert [(n["name"], n["subnet"], n["gateway"], n["bridge"]) for n in listed] == [
            ("bridge", "10.123.30.0/24", "10.123.30.1", BRIDGE)]
        made = client.call("network.create", {"name": "backend", "subnet": "10.123.31.0/24", "mtu": 1400,
                                               "labels": {"team": "a"}})["network"]
        assert (made["gateway"], made["mtu"], made["labels"], made["containers"]) == ("10.123.31.1", 1400,
                                                                                      {"team": "a"}, [])
        assert client.call("network.inspect", {"name": "backend"})["network"] == made
        assert client.call("network.attachment", {"container_id": "nobody"})["attachment"] is None
        with pytest.raises(InvalidArgument, match=r"10\.123\.300\.0/24"):
            client.call("network.create", {"name": "bad", "subnet": "10.123.300.0/24"})
        with pytest.raises(InvalidArgument, match="overlaps network backend"):
            client.call("network.create", {"name": "other", "subnet": "10.123.31.0/25"})
        with pytest.raises(AlreadyExists):
            client.call("network.create", {"name": "backend", "subnet": "10.123.32.0/24"})
        with pytest.raises(InvalidArgument, match="default network"):
            client.call("network.remove", {"name": "bridge"})
        client.call("network.remove", {"name": "backend"})
        with pytest.raises(NotFound, match="network backend"):
            client.call("network.inspect", {"name": "backend"})
    plugins = daemon.cli("plugins", "ls").stdout
    assert any("io.berth.network.v1" in line and "bridge" in line and "ok" in line for line in plugins.splitlines())


def test_berth_network_commands(daemon: BerthdProcess) -> None:
    made = daemon.cli("network", "create", "--subnet", "10.123.33.0/24", "--gateway", "10.123.33.254", "front")
    assert made.returncode == 0, made.stderr
    assert made.stdout == "front\n"
    table = daemon.cli("network", "ls").stdout.splitlines()
    assert table[0].split() == ["NETWORK", "DRIVER", "SUBNET", "GATEWAY", "BRIDGE", "CONTAINERS"]
    assert any(line.split()[:4] == ["front", "bridge", "10.123.33.0/24", "10.123.33.254"] for line in table)
    assert daemon.cli("network", "ls", "-q").stdout.split() == ["bridge", "front"]
    inspected = json.loads(daemon.cli("network", "inspect", "front").stdout)
    assert inspected["gateway"] == "10.123.33.254"
    bad = daemon.cli("network", "create", "--subnet", "nonsense", "x")
    assert bad.returncode != 0
    assert "nonsense" in bad.stderr
    assert daemon.cli("network", "rm", "front").returncode == 0
    missing = daemon.cli("network", "rm", "front")
    assert missing.returncode != 0
    assert "not found" in missing.stderr
    assert daemon.cli("network", "ls", "-q").stdout.split() == ["bridge"]


@pytest.mark.parametrize(("key", "value", "named"), [("subnet", "10.999.0.0/16", "10.999.0.0/16"),
                                                     ("mtu", 70000, "mtu 70000"),
                                                     ("bridge", "a-much-too-long-bridge", "a-much-too-long-bridge"),
                                                     ("bridge", "br 0", "'br 0'"), ("bridge", "a:b", "'a:b'")])
def test_a_bad_network_config_fails_the_plugin_by_name(berthd_factory: BerthdFactory, tmp_path: Path, key: str,
                                                       value: object, named: str) -> None:
    daemon = berthd_factory.start({"plugins": {"io.berth.network.v1.bridge": {
        key: value, "netns_dir": str(tmp_path / "netns")}}})
    row = next(line for line in daemon.cli("plugins", "ls").stdout.splitlines() if "io.berth.network.v1" in line)
    assert row.split()[-1] == "error"
    assert named in daemon.cli("plugins", "ls", "--detailed").stdout
    with daemon.client() as client, pytest.raises(Unimplemented, match=r"'network\.list'"):
        client.call("network.list", {})  # the service that needs the plugin is not loaded either
