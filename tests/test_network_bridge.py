"""io.berth.network.v1.bridge against the real kernel, without the tasks service: "containers" here are
network namespaces the plugin attaches, entered with ``nsenter --net=PATH /bin/busybox ...``.

Shown: two containers on a bridge reach each other (ping, nc); the host reaches a published port on
127.0.0.1; two networks are isolated; ``none`` has only ``lo``; 50 concurrent attach/detach cycles leave
no veth, address, route, nftables rule or namespace mount; addresses are never handed out twice (a
hypothesis property on the allocator, and concurrent allocations on the database); a process killed while
attaching is reconciled away while kept attachments keep working; a second plugin instance on the same host
is left alone by another's reconcile; errors are errdefs classes naming the culprit.

Traffic stays on this machine: only between namespaces these tests make and their bridges' own addresses.
Each test bridge is ``bt<pid>``-style, each subnet 10.123.x.0/24, and the fixture removes its bridges,
veths, rules and mounts whatever happens.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.core.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from berth.core.metadata.db import MetadataDB
from berth.core.network import NetworkRequest, PortMapping
from berth.plugins.network import netns, nft
from berth.plugins.network.bridge import BridgeNetworks
from berth.plugins.network.store import NetworkRecord, NetworkStore, allocate

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, netlink, nftables)")

BUSYBOX = "/bin/busybox"
TAG = os.getpid() % 100000
#: A host port per test run, away from the usual ones.
PORT_BASE = 20000 + (TAG % 400) * 100


def links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def delete_link(name: str) -> None:
    subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def in_netns(path: str, *command: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net={path}", BUSYBOX, *command], capture_output=True, text=True,
                          timeout=timeout, check=False)


def ping(path: str, address: str, wait: int = 2) -> subprocess.CompletedProcess[str]:
    return in_netns(path, "ping", "-c", "1", "-W", str(wait), address)


def address_of(attachment_interfaces: tuple[object, ...]) -> str:
    eth0 = next(i for i in attachment_interfaces if getattr(i, "name", "") == "eth0")
    return str(eth0.addresses[0]).split("/")[0]  # type: ignore[attr-defined]


@contextlib.contextmanager
def serving(path: str, port: int, reply: str) -> Iterator[None]:
    """``busybox nc -l`` in the namespace at ``path``, answering ``reply`` to its first connection; killed
    (by its own process group) on the way out."""
    server = subprocess.Popen(["nsenter", f"--net={path}", BUSYBOX, "nc", "-l", "-p", str(port), "-e", BUSYBOX,
                               "echo", reply], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not any(f":{port:04X} " in Path(f"/proc/{server.pid}/net/{table}").read_text()
                      for table in ("tcp", "tcp6")):
            assert time.monotonic() < deadline, "the server never listened"
            time.sleep(0.01)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def host_state(subnet_prefix: str, tag: str = "berth ") -> dict[str, object]:
    """What the host has of ours: veths whose alias starts with ``tag``, addresses and routes in
    ``subnet_prefix`` (never other engineers' links or rules: tests elsewhere may run meanwhile). A route's
    ``linkdown`` flag is left out: a bridge loses its carrier a moment after its last port goes."""
    addresses = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    veths = set()
    for link in Path("/sys/class/net").iterdir():
        with contextlib.suppress(OSError):
            if (link / "ifalias").read_text().startswith(tag):
                veths.add(link.name)
    return {"veths": veths, "addresses": sorted(line.split()[3] for line in addresses.splitlines()
                                                 if subnet_prefix in line),
            "routes": sorted(line.replace(" linkdown", "") for line in routes.splitlines() if subnet_prefix in line)}


# ---------------------------------------------------------------------------------------------- IPAM


@given(prefix=st.integers(min_value=22, max_value=30), taken=st.sets(st.integers(min_value=0, max_value=1100)),
       gateway_at=st.integers(min_value=0, max_value=1100))
@settings(max_examples=300, deadline=None)
def test_the_allocator_never_hands_out_a_taken_address(prefix: int, taken: set[int], gateway_at: int) -> None:
    subnet = ipaddress.IPv4Network(f"10.123.0.0/{prefix}")
    hosts = list(subnet.hosts())
    gateway = hosts[gateway_at % len(hosts)]
    used = {hosts[i % len(hosts)] for i in taken}
    try:
        address = allocate(subnet, gateway, used)
    except ResourceExhausted:
        assert used | {gateway} >= set(hosts)
        return
    assert address in hosts  # never the network or broadcast address
    assert address not in used
    assert address != gateway
    assert all(h in used or h == gateway for h in hosts if h < address)  # the lowest free one


@given(ops=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=15)), max_size=60))
@settings(max_examples=40, deadline=None)
def test_recorded_addresses_stay_distinct_through_attaches_and_detaches(tmp_path_factory: pytest.TempPathFactory,
                                                                        ops: list[tuple[bool, int]]) -> None:
    """Any sequence of attaches and detaches on the database: no two live attachments share an address,
    none is the gateway, and a full /28 says ResourceExhausted."""
    path = tmp_path_factory.mktemp("ipam") / "meta.db"

    async def main() -> None:
        db = await MetadataDB.open(path, no_sync=True)
        try:
            store = NetworkStore(db)
            network = await store.create(NetworkRecord(name="n", driver="bridge", subnet="10.123.9.0/28",
                                                       gateway="10.123.9.1", bridge="btipam", mtu=1500, nat=False))
            for attach, which in ops:
                if attach:
                    try:
                        await store.attach("ns", f"c{which}", network, {})
                    except AlreadyExists:
                        assert await store.attachment("ns", f"c{which}") is not None
                    except ResourceExhausted:
                        assert len(await store.attachments("n")) == 13
                else:
                    await store.detach("ns", f"c{which}")
                live = [a.address for a in await store.attachments("n")]
                assert len(live) == len(set(live))
                assert "10.123.9.1" not in live
        finally:
            await db.aclose()

    trio.run(main)


async def test_concurrent_allocations_get_distinct_addresses_and_survive_a_reopen(tmp_path: Path) -> None:
    db = await MetadataDB.open(tmp_path / "meta.db")
    try:
        store = NetworkStore(db)
        network = await store.create(NetworkRecord(name="n", driver="bridge", subnet="10.123.10.0/26",
                                                   gateway="10.123.10.1", bridge="btipam", mtu=1500, nat=False))
        got: list[str] = []
        exhausted = 0

        async def attach(i: int) -> None:
            nonlocal exhausted
            try:
                got.append((await store.attach("ns", f"c{i}", network, {})).address)
            except ResourceExhausted:
                exhausted += 1

        async with trio.open_nursery() as nursery:
            for i in range(70):  # more than the 61 addresses the range has for containers
                nursery.start_soon(attach, i)
        assert (len(got), len(set(got)), exhausted) == (61, 61, 9)
    finally:
        await db.aclose()
    db = await MetadataDB.open(tmp_path / "meta.db")  # a restart: the allocations are still there
    try:
        store = NetworkStore(db)
        network = await store.get("n")
        with pytest.raises(ResourceExhausted, match=r"10\.123\.10\.0/26"):
            await store.attach("ns", "late", network, {})
        holder = next(a for a in await store.attachments("n") if a.address == "10.123.10.2")
        await store.detach("ns", holder.container_id)
        assert (await store.attach("ns", "late", network, {})).address == "10.123.10.2"
        with pytest.raises(FailedPrecondition, match="in use"):
            await store.delete("n")
    finally:
        await db.aclose()


# ---------------------------------------------------------------------------------------------- the plugin


async def make_plugin(tmp_path: Path, name: str, third_octet: int) -> BridgeNetworks:
    db = await MetadataDB.open(tmp_path / name / "meta.db", no_sync=True)
    plugin = BridgeNetworks(NetworkStore(db), netns_dir=tmp_path / name / "netns",
                            default=NetworkRecord(name="bridge", driver="bridge", subnet=f"10.123.{third_octet}.0/24",
                                                  gateway=f"10.123.{third_octet}.1", bridge=f"bt{name}{TAG}"[:15],
                                                  mtu=1500, nat=False))
    await plugin.start()
    return plugin


async def scrub(plugin: BridgeNetworks) -> None:
    """Remove whatever the plugin made (the fixture's finalizer: runs even when a test failed)."""
    with contextlib.suppress(Exception):
        await plugin.reconcile([])
    for network in await plugin.store.list_all():
        with contextlib.suppress(Exception):
            await nft.forget_bridge(network.bridge)
        delete_link(network.bridge)
    for path in sorted(plugin.netns_dir.glob("*/*")):
        netns.remove(path)
    await plugin.store.db.aclose()
    await nft.remove_table_if_unused()  # when no daemon on this host uses it either


@pytest.fixture
async def networks(tmp_path: Path) -> AsyncIterator[BridgeNetworks]:
    plugin = await make_plugin(tmp_path, "a", 1)
    try:
        yield plugin
    finally:
        await scrub(plugin)


async def test_two_containers_reach_each_other_and_the_host_reaches_a_published_port(
        networks: BridgeNetworks) -> None:
    port = PORT_BASE + 1
    first = await networks.attach("ns", "a", NetworkRequest(mode="bridge", ports=(
        PortMapping(host_port=port, container_port=8080),)), hostname="a")
    second = await networks.attach("ns", "b", NetworkRequest(mode="bridge"), hostname="b")
    a, b = address_of(first.interfaces), address_of(second.interfaces)
    assert (a, b) == ("10.123.1.2", "10.123.1.3")
    assert first.routes == (("0.0.0.0/0", "10.123.1.1"),)
    assert first.netns == networks.netns_path("ns", "a")
    assert netns.is_mounted(Path(first.netns))
    assert await networks.attachment("ns", "a") is not None

    result = await trio.to_thread.run_sync(ping, second.netns, a)
    assert result.returncode == 0, result.stdout + result.stderr
    inside = in_netns(first.netns, "ip", "-o", "-4", "addr").stdout
    assert "lo    inet 127.0.0.1/8" in inside
    assert "eth0    inet 10.123.1.2/24" in inside
    assert "default via 10.123.1.1 dev eth0" in in_netns(first.netns, "ip", "route").stdout
    assert "link/ether 02:42:0a:7b:01:02" in in_netns(first.netns, "ip", "link", "show", "eth0").stdout
    recorded = await networks.attachment("ns", "a")
    assert recorded is not None
    assert recorded.interfaces[0] == first.interfaces[0]

    with serving(first.netns, 8080, "from-a"):  # container to container
        client = await trio.to_thread.run_sync(lambda: in_netns(second.netns, "nc", a, "8080"))
        assert client.stdout == "from-a\n", client.stderr
    with serving(first.netns, 8080, "published"):  # the host, on 127.0.0.1:port
        def fetch() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                return conn.recv(100)
        assert await trio.to_thread.run_sync(fetch) == b"published\n"

    with pytest.raises(AlreadyExists, match=f"127.0.0.1:{port}/tcp is published already"):
        await networks.attach("ns", "c", NetworkRequest(mode="bridge", ports=(
            PortMapping(host_port=port, container_port=80),)))
    with socket.socket() as held:  # a port a host process has bound is not taken away from it
        held.bind(("127.0.0.1", 0))
        with pytest.raises(AlreadyExists, match="in use on this host"):
            await networks.attach("ns", "c", NetworkRequest(mode="bridge", ports=(
                PortMapping(host_port=held.getsockname()[1], container_port=80),)))
    with pytest.raises(AlreadyExists, match="attached"):
        await networks.attach("ns", "a", NetworkRequest(mode="bridge"))
    assert await networks.attachment("ns", "c") is None

    await networks.detach("ns", "a")
    await networks.detach("ns", "b")
    await networks.detach("ns", "b")  # twice is not an error
    assert networks.veth_name("ns", "a") not in links()
    assert not netns.is_mounted(Path(first.netns))
    assert not await trio.Path(first.netns).exists()
    assert not [r for r in await nft.rules() if r.get("comment") == networks.owner("ns", "a")]
    with pytest.raises(ConnectionRefusedError):  # the published port is gone with the container
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_a_published_udp_port(networks: BridgeNetworks) -> None:
    port = PORT_BASE + 7
    attachment = await networks.attach("ns", "u", NetworkRequest(mode="bridge", ports=(
        PortMapping(host_port=port, container_port=9090, protocol="udp"),)))
    server = subprocess.Popen(  # noqa: ASYNC220 - killed below
        ["nsenter", f"--net={attachment.netns}", sys.executable, "-c",  # busybox's nc has no UDP
         "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 9090)); "
         "sys.stdout.buffer.write(s.recv(100)); sys.stdout.flush()"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(500):
            with contextlib.suppress(FileNotFoundError):
                if ":2382 " in await trio.Path(f"/proc/{server.pid}/net/udp").read_text():
                    break
            await trio.sleep(0.01)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"datagram\n", ("127.0.0.1", port))
        assert server.stdout is not None
        line = await trio.to_thread.run_sync(server.stdout.readline)
        assert line == b"datagram\n"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    await networks.detach("ns", "u")


async def test_networks_are_isolated_from_each_other(networks: BridgeNetworks) -> None:
    other = await networks.create(f"iso{TAG}", subnet="10.123.2.0/24", mtu=1400)
    assert (other.gateway, other.mtu) == ("10.123.2.1", 1400)
    assert [n.name for n in await networks.list_networks()] == ["bridge", other.name]
    here = await networks.attach("ns", "here", NetworkRequest(mode="bridge"))
    there = await networks.attach("ns", "there", NetworkRequest(mode=other.name))
    assert address_of(there.interfaces) == "10.123.2.2"
    assert "mtu 1400" in in_netns(there.netns, "ip", "link", "show", "eth0").stdout
    assert (await networks.inspect(other.name)).containers == ("ns/there",)
    for bridge in (networks.default.bridge, other.bridge):
        # the host routes between these two bridges (IPv4 forwarding is per input interface, so the
        # host's own ip_forward is left alone): only berth's rules keep the networks apart
        await trio.Path(f"/proc/sys/net/ipv4/conf/{bridge}/forwarding").write_text("1")
    across = await trio.to_thread.run_sync(ping, here.netns, address_of(there.interfaces), 1)
    back = await trio.to_thread.run_sync(ping, there.netns, address_of(here.interfaces), 1)
    assert across.returncode != 0
    assert back.returncode != 0
    await nft.forget_bridge(networks.default.bridge)  # the control: without the rules they do reach each other
    await nft.forget_bridge(other.bridge)
    networks._ready.clear()
    control = await trio.to_thread.run_sync(ping, here.netns, address_of(there.interfaces))
    assert control.returncode == 0, control.stdout + control.stderr
    own = await trio.to_thread.run_sync(ping, there.netns, "10.123.2.1")
    assert own.returncode == 0, own.stdout
    with pytest.raises(FailedPrecondition, match="ns/there"):
        await networks.remove(other.name)
    await networks.detach("ns", "there")
    await networks.remove(other.name)
    assert other.bridge not in links()
    assert not [r for r in await nft.rules() if other.bridge in str(r.get("comment", ""))]
    with pytest.raises(NotFound):
        await networks.inspect(other.name)
    await networks.detach("ns", "here")


async def test_none_has_only_lo(networks: BridgeNetworks) -> None:
    attachment = await networks.attach("ns", "alone", NetworkRequest(mode="none"))
    assert [i.name for i in attachment.interfaces] == ["lo"]
    inside = in_netns(attachment.netns, "ip", "-o", "link").stdout
    assert [line.split(":")[1].strip() for line in inside.splitlines()] == ["lo"]
    assert "UP" in inside
    assert in_netns(attachment.netns, "ping", "-c", "1", "-W", "1", "127.0.0.1").returncode == 0
    found = await networks.attachment("ns", "alone")
    assert found is not None
    assert found.network == "none"
    with pytest.raises(AlreadyExists):
        await networks.attach("ns", "alone", NetworkRequest(mode="none"))
    with pytest.raises(InvalidArgument, match="published ports"):
        await networks.attach("ns", "x", NetworkRequest(mode="none", ports=(
            PortMapping(host_port=PORT_BASE + 2, container_port=80),)))
    assert (await networks.attach("ns", "h", NetworkRequest(mode="host"))).netns == ""
    await networks.detach("ns", "alone")
    assert not await trio.Path(attachment.netns).exists()
    assert await networks.attachment("ns", "alone") is None


async def test_errors_name_what_is_wrong(networks: BridgeNetworks) -> None:
    with pytest.raises(InvalidArgument, match=r"10\.999\.0\.0/24"):
        await networks.create("bad", subnet="10.999.0.0/24")
    with pytest.raises(InvalidArgument, match=r"10\.123\.3\.1/24"):
        await networks.create("bad", subnet="10.123.3.1/24")  # host bits set
    with pytest.raises(InvalidArgument, match="overlaps network bridge"):
        await networks.create("overlap", subnet="10.123.1.128/25")
    with pytest.raises(InvalidArgument, match=r"gateway 10\.123\.4\.1 is not"):
        await networks.create("gw", subnet="10.123.3.0/24", gateway="10.123.4.1")
    with pytest.raises(InvalidArgument, match="subnet"):
        await networks.create("nosubnet")
    with pytest.raises(InvalidArgument, match="reserved"):
        await networks.create("none", subnet="10.123.3.0/24")
    with pytest.raises(AlreadyExists):
        await networks.create("bridge", subnet="10.123.3.0/24")
    with pytest.raises(InvalidArgument, match="default network"):
        await networks.remove("bridge")
    with pytest.raises(NotFound, match="network nowhere"):
        await networks.attach("ns", "c", NetworkRequest(mode="nowhere"))
    for bad, text in ((PortMapping(host_port=0, container_port=80), "1 to 65535"),
                      (PortMapping(host_port=80, container_port=80, protocol="sctp"), "tcp or udp"),
                      (PortMapping(host_port=80, container_port=80, host_ip="localhost"), "not an IPv4")):
        with pytest.raises(InvalidArgument, match=text):
            await networks.attach("ns", "c", NetworkRequest(mode="bridge", ports=(bad,)))
    small = await networks.create(f"small{TAG}", subnet="10.123.3.0/30")  # a gateway and one container
    await networks.attach("ns", "one", NetworkRequest(mode=small.name))
    with pytest.raises(ResourceExhausted, match=r"no address left in 10\.123\.3\.0/30"):
        await networks.attach("ns", "two", NetworkRequest(mode=small.name))
    assert not await trio.Path(networks.netns_path("ns", "two")).exists()  # a refused attach leaves nothing
    await networks.detach("ns", "one")
    assert await networks.store.attachments() == []


async def test_a_half_made_bridge_is_completed(networks: BridgeNetworks) -> None:
    half = await networks.create(f"half{TAG}", subnet="10.123.7.0/24")
    await trio.run_process(["ip", "link", "add", half.bridge, "type", "bridge"])  # left by a crash: no address, down
    attachment = await networks.attach("ns", "c", NetworkRequest(mode=half.name))
    assert (await trio.to_thread.run_sync(ping, attachment.netns, "10.123.7.1")).returncode == 0
    await networks.detach("ns", "c")
    await networks.remove(half.name)
    assert half.bridge not in links()


async def test_fifty_concurrent_attaches_and_detaches_leave_nothing_behind(networks: BridgeNetworks) -> None:
    await networks.attach("warm", "up", NetworkRequest(mode="bridge"))  # the bridge exists from here on
    await networks.detach("warm", "up")
    tag = f"berth {networks.instance} "
    before = host_state("10.123.1.", tag)
    assert before["veths"] == set()

    async def ours() -> list[str]:
        return sorted(str(r.get("comment")) for r in await nft.rules()
                      if str(r.get("comment", "")).startswith(tag)
                      or r.get("comment") == f"berth-bridge {networks.default.bridge}")

    rules_before = await ours()
    seen: set[str] = set()

    async def cycle(i: int) -> None:
        attachment = await networks.attach("leak", f"c{i}", NetworkRequest(mode="bridge", ports=(
            PortMapping(host_port=PORT_BASE + 10 + i, container_port=80),)))
        seen.add(address_of(attachment.interfaces))
        await trio.sleep(0.01 * (i % 5))
        await networks.detach("leak", f"c{i}")

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(cycle, i)
    assert host_state("10.123.1.", tag) == before  # no veth, no address, no route
    assert await ours() == rules_before == [f"berth-bridge {networks.default.bridge}"]
    assert not list((networks.netns_dir / "leak").glob("*"))
    mounts = await trio.Path("/proc/self/mountinfo").read_text()
    assert str(networks.netns_dir) not in mounts
    assert await networks.store.attachments() == []
    assert len(seen) > 1


async def test_another_instances_reconcile_leaves_this_ones_alone(networks: BridgeNetworks,
                                                                    tmp_path: Path) -> None:
    mine = await networks.attach("ns", "mine", NetworkRequest(mode="bridge", ports=(
        PortMapping(host_port=PORT_BASE + 3, container_port=80),)))
    other = await make_plugin(tmp_path, "b", 5)
    try:
        theirs = await other.attach("ns", "theirs", NetworkRequest(mode="bridge"))
        assert await other.reconcile([]) == ["ns/theirs"]
        assert not netns.is_mounted(Path(theirs.netns))
    finally:
        await scrub(other)
    assert networks.veth_name("ns", "mine") in links()
    assert [r for r in await nft.rules() if r.get("comment") == networks.owner("ns", "mine")]
    assert (await trio.to_thread.run_sync(ping, mine.netns, "10.123.1.1")).returncode == 0
    await networks.detach("ns", "mine")


async def test_reconcile_removes_half_made_attachments_and_keeps_running_ones(networks: BridgeNetworks) -> None:
    kept = await networks.attach("ns", "kept", NetworkRequest(mode="bridge", ports=(
        PortMapping(host_port=PORT_BASE + 4, container_port=8080),)))
    lost = await networks.attach("ns", "lost", NetworkRequest(mode="bridge", ports=(
        PortMapping(host_port=PORT_BASE + 5, container_port=80),)))
    half = await networks.attach("ns", "half", NetworkRequest(mode="bridge", ports=(
        PortMapping(host_port=PORT_BASE + 6, container_port=80),)))
    await networks.store.detach("ns", "half")  # its record is gone: its veth, rules and mount are strays
    none = await networks.attach("ns", "nothing", NetworkRequest(mode="none"))
    record = await networks.store.attach("ns", "unplumbed", await networks.store.get("bridge"), {
        "veth": networks.veth_name("ns", "unplumbed"), "netns": networks.netns_path("ns", "unplumbed"),
        "ports": []})  # recorded, then the crash: nothing made on the host yet

    removed = await networks.reconcile([("ns", "kept")])
    assert {"ns/lost", "ns/unplumbed", f"veth {networks.veth_name('ns', 'half')}",
            networks.owner("ns", "half"), f"netns {none.netns}"} <= set(removed)
    for gone in (lost, half, none):
        assert not netns.is_mounted(Path(gone.netns))
    for name in ("lost", "half"):
        assert networks.veth_name("ns", name) not in links()
    assert {str(r.get("comment")) for r in await nft.rules()} & {
        networks.owner("ns", "lost"), networks.owner("ns", "half")} == set()
    assert [a.container_id for a in await networks.store.attachments()] == ["kept"]
    assert record.address not in host_state("10.123.1.")["addresses"]
    # the kept one still works: its address, its route, its published port
    assert (await trio.to_thread.run_sync(ping, kept.netns, "10.123.1.1")).returncode == 0
    with serving(kept.netns, 8080, "still-here"):
        def fetch() -> bytes:
            with socket.create_connection(("127.0.0.1", PORT_BASE + 4), timeout=10) as conn:
                return conn.recv(100)
        assert await trio.to_thread.run_sync(fetch) == b"still-here\n"
    assert await networks.reconcile([("ns", "kept")]) == []  # nothing more to do
    await networks.detach("ns", "kept")


CRASHING_ATTACHER = """
import sys, trio
from pathlib import Path
from berth.core.metadata.db import MetadataDB
from berth.core.network import NetworkRequest, PortMapping
from berth.plugins.network.bridge import BridgeNetworks
from berth.plugins.network.store import NetworkRecord, NetworkStore

async def main():
    db = await MetadataDB.open(Path(sys.argv[1]))
    plugin = BridgeNetworks(NetworkStore(db), netns_dir=Path(sys.argv[2]), default=NetworkRecord(
        name="bridge", driver="bridge", subnet="10.123.6.0/24", gateway="10.123.6.1", bridge=sys.argv[3],
        mtu=1500, nat=False))
    await plugin.start()
    await plugin.attach("ns", "first", NetworkRequest(mode="bridge"))
    print("first", flush=True)
    port = int(sys.argv[4])
    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(plugin.attach, "ns", f"c{i}", NetworkRequest(mode="bridge", ports=(
                PortMapping(host_port=port + i, container_port=80),)))
    print("all", flush=True)

trio.run(main)
"""


async def test_a_process_killed_while_attaching_is_reconciled(tmp_path: Path) -> None:
    bridge = f"btk{TAG}"
    database, netns_dir = tmp_path / "k" / "meta.db", tmp_path / "k" / "netns"
    database.parent.mkdir()
    attacher = subprocess.Popen(  # noqa: ASYNC220 - read line by line below, then killed
        [sys.executable, "-c", CRASHING_ATTACHER, str(database), str(netns_dir), bridge, str(PORT_BASE + 50)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    db = None
    try:
        assert attacher.stdout is not None
        for line in attacher.stdout:  # structlog's lines come first
            if line == "first\n":
                break
        else:
            pytest.fail(f"the attacher failed: {attacher.stderr.read() if attacher.stderr else ''}")
        await trio.sleep(0.15)  # some of the 200 are made, some half made, some not begun
        os.killpg(attacher.pid, signal.SIGKILL)  # the daemon and its nft children, as a crash takes them
        attacher.wait()
        db = await MetadataDB.open(database)
        plugin = BridgeNetworks(NetworkStore(db), netns_dir=netns_dir, default=await NetworkStore(db).get("bridge"))
        recorded = len(await plugin.store.attachments())
        assert recorded > 1
        removed = await plugin.reconcile([("ns", "first")])
        assert len(removed) >= recorded - 1
        assert [a.container_id for a in await plugin.store.attachments()] == ["first"]
        assert [p.name for p in netns_dir.glob("*/*")] == ["first"]
        ours = [name for name in links() if name.startswith("vb")]
        assert plugin.veth_name("ns", "first") in ours
        assert all(plugin.veth_name("ns", f"c{i}") not in ours for i in range(200))
        assert not [r for r in await nft.rules() if str(r.get("comment", "")).startswith(f"berth {plugin.instance}")]
        first = plugin.netns_path("ns", "first")
        assert (await trio.to_thread.run_sync(ping, first, "10.123.6.1")).returncode == 0
        await plugin.detach("ns", "first")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(attacher.pid, signal.SIGKILL)
        attacher.wait()
        if db is not None:
            plugin = BridgeNetworks(NetworkStore(db), netns_dir=netns_dir, default=await NetworkStore(db).get("bridge"))
            with contextlib.suppress(Exception):
                await plugin.reconcile([])
            await db.aclose()
        await nft.forget_bridge(bridge)
        delete_link(bridge)
        for path in netns_dir.glob("*/*"):
            netns.remove(path)
        await nft.remove_table_if_unused()
