"""Bridged networks: a Linux bridge per network, a veth pair per container (one end in the container's
network namespace as ``eth0``), addresses from the network's range, published ports through nftables.

Netlink work is done with pyroute2 in worker threads; a container's side is configured from inside its
namespace (:mod:`.netns`). Host ends are named ``vb<hash>`` after the container, so a reconcile pass can
tell berth's veths from others.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import structlog
import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from berth.core.errdefs import BerthError, InvalidArgument, NotFound
from berth.core.identifiers import validate_identifier
from berth.core.network import Attachment, Interface, NetworkInfo, NetworkRequest, PortMapping
from berth.plugins.network import netns, nft
from berth.plugins.network.store import AttachmentRecord, NetworkRecord, NetworkStore, parse_subnet

log = structlog.get_logger("berth.network")

VETH_PREFIX = "vb"


def veth_name(namespace: str, container_id: str) -> str:
    """The host end's name (15 characters at most, as Linux wants)."""
    return VETH_PREFIX + hashlib.sha256(f"{namespace}/{container_id}".encode()).hexdigest()[:11]


def owner(namespace: str, container_id: str) -> str:
    return f"berth {namespace}/{container_id}"


def network_owner(name: str) -> str:
    return f"berth-network {name}"


def _ensure_bridge(network: NetworkRecord) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=network.bridge)
        if not found:
            ipr.link("add", ifname=network.bridge, kind="bridge")
            found = ipr.link_lookup(ifname=network.bridge)
            index = found[0]
            ipr.addr("add", index=index, address=network.gateway, prefixlen=network.prefixlen)
            ipr.link("set", index=index, mtu=network.mtu, state="up")
        # Published ports reach the container from 127.0.0.1: such packets may leave through the bridge.
        with open(f"/proc/sys/net/ipv4/conf/{network.bridge}/route_localnet", "w") as f:
            f.write("1")


def _delete_link(name: str) -> None:
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=name):
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=index)


def _plumb(network: NetworkRecord, path: Path, veth: str, address: str) -> Interface:
    """Make the namespace at ``path``, the veth pair, and configure both ends; return ``eth0``."""
    _ensure_bridge(network)
    netns.create(path)
    peer = veth + "c"
    with IPRoute() as ipr:
        ipr.link("add", ifname=veth, kind="veth", peer={"ifname": peer})
        host, inner = ipr.link_lookup(ifname=veth)[0], ipr.link_lookup(ifname=peer)[0]
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            ipr.link("set", index=inner, net_ns_fd=fd)
        finally:
            os.close(fd)
        bridge = ipr.link_lookup(ifname=network.bridge)[0]
        ipr.link("set", index=host, master=bridge, mtu=network.mtu, state="up")
    with netns.entered(str(path)), IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        index = ipr.link_lookup(ifname=peer)[0]
        ipr.link("set", index=index, ifname="eth0", mtu=network.mtu)
        ipr.addr("add", index=index, address=address, prefixlen=network.prefixlen)
        ipr.link("set", index=index, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=network.gateway)
        mac = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
    return Interface(name="eth0", mac=str(mac), mtu=network.mtu, addresses=(f"{address}/{network.prefixlen}",))


def _unplumb(veth: str, path: Path) -> None:
    _delete_link(veth)  # deleting one end of a veth pair deletes both
    netns.remove(path)


def _berth_veths() -> list[str]:
    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return [name for name in names if name and name.startswith(VETH_PREFIX) and len(name) == 13]


class BridgeNetworks:
    """``io.berth.network.v1.bridge`` (see :class:`berth.core.network.Network`)."""

    def __init__(self, store: NetworkStore, *, netns_dir: Path, default: NetworkRecord) -> None:
        self.store = store
        self.netns_dir = netns_dir
        self.default = default
        self._lock = trio.Lock()

    async def start(self) -> None:
        """Make sure the default network and berth's nftables table exist."""
        await nft.ensure_table()
        try:
            await self.store.get(self.default.name)
        except NotFound:
            await self.store.create(self.default)
            await nft.isolate(network_owner(self.default.name), self.default.bridge, self.default.subnet,
                              self.default.nat)

    def netns_path(self, namespace: str, container_id: str) -> str:
        return str(self.netns_dir / namespace / container_id)

    async def create(self, name: str, *, subnet: str = "", gateway: str = "", mtu: int = 0, nat: bool = False,
                     labels: dict[str, str] | None = None) -> NetworkInfo:
        validate_identifier(name, "network name")
        if name in ("none", "host") or name.startswith("container"):
            raise InvalidArgument(f"network name {name!r} is reserved")
        network = parse_subnet(subnet) if subnet else None
        if network is None:
            raise InvalidArgument("a network needs --subnet (e.g. 10.89.0.0/24)")
        gateway_ip = ipaddress.IPv4Address(gateway) if gateway else next(network.hosts())
        if gateway_ip not in network:
            raise InvalidArgument(f"gateway {gateway_ip} is not in {network}")
        bridge = "bn-" + hashlib.sha256(name.encode()).hexdigest()[:12]
        record = NetworkRecord(name=name, driver="bridge", subnet=str(network), gateway=str(gateway_ip),
                               bridge=bridge, mtu=mtu or self.default.mtu, nat=nat, labels=dict(labels or {}))
        await self.store.create(record)
        await nft.isolate(network_owner(name), bridge, record.subnet, nat)
        log.info("network_created", name=name, subnet=record.subnet, bridge=bridge)
        return await self.inspect(name)

    async def remove(self, name: str) -> None:
        network = await self.store.get(name)
        if name == self.default.name:
            raise InvalidArgument(f"network {name} is the default network")
        await self.store.delete(name)
        await nft.remove({network_owner(name)}, [network.bridge])
        await trio.to_thread.run_sync(_delete_link, network.bridge)
        log.info("network_removed", name=name)

    async def inspect(self, name: str) -> NetworkInfo:
        network = await self.store.get(name)
        users = await self.store.attachments(name)
        return NetworkInfo(name=network.name, driver=network.driver, subnet=network.subnet, gateway=network.gateway,
                           bridge=network.bridge, mtu=network.mtu, nat=network.nat, labels=network.labels,
                           containers=tuple(f"{a.namespace}/{a.container_id}" for a in users))

    async def list_networks(self) -> list[NetworkInfo]:
        return [await self.inspect(n.name) for n in await self.store.list_all()]

    async def attach(self, namespace: str, container_id: str, request: NetworkRequest, *,
                     hostname: str = "") -> Attachment:
        path = Path(self.netns_path(namespace, container_id))
        network = await self.store.get(request.mode)
        veth = veth_name(namespace, container_id)
        record = await self.store.attach(namespace, container_id, network, {
            "veth": veth, "netns": str(path), "ports": [p.to_wire() for p in request.ports]})
        try:
            interface = await trio.to_thread.run_sync(_plumb, network, path, veth, record.address)
            await nft.publish(owner(namespace, container_id), record.address, list(request.ports))
        except BaseException as err:
            with trio.CancelScope(shield=True):
                await self._teardown(record)
            if isinstance(err, (NetlinkError, OSError)):
                raise InvalidArgument(f"cannot attach {container_id} to network {network.name}: {err}") from None
            raise
        log.info("network_attached", container_id=container_id, namespace=namespace, network=network.name,
                 address=record.address, veth=veth)
        return Attachment(network=network.name, netns=str(path), interfaces=(interface,),
                          routes=(("0.0.0.0/0", network.gateway),), ports=request.ports)

    async def _teardown(self, record: AttachmentRecord) -> None:
        await nft.remove({owner(record.namespace, record.container_id)})
        await trio.to_thread.run_sync(_unplumb, str(record.details["veth"]), Path(record.details["netns"]))
        await self.store.detach(record.namespace, record.container_id)

    async def detach(self, namespace: str, container_id: str) -> None:
        record = await self.store.attachment(namespace, container_id)
        if record is None:
            await trio.to_thread.run_sync(netns.remove, Path(self.netns_path(namespace, container_id)))
            return
        await self._teardown(record)
        log.info("network_detached", container_id=container_id, namespace=namespace, network=record.network)

    async def attachment(self, namespace: str, container_id: str) -> Attachment | None:
        record = await self.store.attachment(namespace, container_id)
        if record is None:
            return None
        network = await self.store.get(record.network)
        return Attachment(network=record.network, netns=str(record.details["netns"]),
                          interfaces=(Interface(name="eth0", mtu=network.mtu,
                                                addresses=(f"{record.address}/{network.prefixlen}",)),),
                          routes=(("0.0.0.0/0", network.gateway),),
                          ports=tuple(PortMapping.from_wire(p) for p in record.details.get("ports") or ()))

    async def reconcile(self, keep: Iterable[tuple[str, str]]) -> Sequence[str]:
        """Detach every recorded attachment not in ``keep``, then delete berth veths, nftables rules and
        namespace mounts that belong to no attachment (left by a crash mid-attach)."""
        kept = set(keep)
        removed: list[str] = []
        for record in await self.store.attachments():
            if (record.namespace, record.container_id) not in kept:
                try:
                    await self._teardown(record)
                    removed.append(f"{record.namespace}/{record.container_id}")
                except BerthError as err:
                    log.warning("network_reconcile_failed", container_id=record.container_id, error=str(err))
        live = await self.store.attachments()
        wanted_veths = {str(r.details["veth"]) for r in live}
        for name in await trio.to_thread.run_sync(_berth_veths):
            if name not in wanted_veths:
                await trio.to_thread.run_sync(_delete_link, name)
                removed.append(f"veth {name}")
        owners = {owner(r.namespace, r.container_id) for r in live}
        stray = {rule.get("comment", "") for rule in await nft.rules()
                 if str(rule.get("comment", "")).startswith("berth ") and rule.get("comment") not in owners}
        if stray:
            await nft.remove(stray)
            removed += sorted(stray)
        wanted_paths = {str(r.details["netns"]) for r in live} | {self.netns_path(ns, cid) for ns, cid in kept}
        for path in await trio.to_thread.run_sync(lambda: sorted(self.netns_dir.glob("*/*"))):
            if str(path) not in wanted_paths:
                await trio.to_thread.run_sync(netns.remove, path)
                removed.append(f"netns {path}")
        return removed
