"""Bridged networks: a Linux bridge per network, a veth pair per container (one end in the container's
network namespace as ``eth0``), addresses from the network's range, published ports through nftables.

Netlink work is done with pyroute2 in worker threads; a container's side is configured through a netlink
socket opened inside its namespace (:mod:`.netns`). Everything a plugin instance makes on the host is
marked with its *instance tag* (a hash of its netns directory), so that several daemons on one host (tests
start many) never reconcile away each other's veths or rules:

- a host veth end is named ``vb<hash>`` and carries the alias ``berth <instance> <namespace>/<id>``;
- an nftables rule for a published port carries the same text as its comment;
- a bridge's isolation rule is commented ``berth-bridge <bridge>``, its NAT rule ``berth-nat <bridge>``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import structlog
import trio

from berth.core.errdefs import AlreadyExists, BerthError, Internal, InvalidArgument, NotFound
from berth.core.identifiers import validate_identifier
from berth.core.network import Attachment, Interface, Network, NetworkInfo, NetworkRequest, PortMapping
from berth.plugins.network import netns, nft
from berth.plugins.network.store import (
    AttachmentRecord,
    NetworkRecord,
    NetworkStore,
    check_ports,
    mac_for,
    parse_subnet,
)

log = structlog.get_logger("berth.network")

VETH_PREFIX = "vb"
LOOPBACK = Interface(name="lo", mtu=65536, addresses=("127.0.0.1/8",))


def _links() -> Any:
    """:mod:`.links`, imported on first use (in a worker thread: pyroute2's import takes 100 ms)."""
    return importlib.import_module("berth.plugins.network.links")


def _netlink(name: str, *args: Any) -> Callable[[], Any]:
    """A call of ``links.<name>(*args)`` for ``trio.to_thread.run_sync``."""
    return lambda: getattr(_links(), name)(*args)


def _tagged_veths(prefix: str) -> dict[str, str]:
    """Host veth ends whose alias starts with ``prefix``: name -> alias (read from sysfs: no netlink)."""
    found = {}
    for link in Path("/sys/class/net").iterdir():
        if link.name.startswith(VETH_PREFIX):
            with contextlib.suppress(OSError):
                alias = (link / "ifalias").read_text().strip()
                if alias.startswith(prefix):
                    found[link.name] = alias
    return found


def _mounted_under(directory: Path) -> list[Path]:
    """Namespace files (mounted or not) at ``<directory>/<namespace>/<id>``."""
    return sorted(p for p in directory.glob("*/*") if not p.is_dir()) if directory.is_dir() else []


def _check_free_on_host(ports: Sequence[PortMapping]) -> None:
    """Refuse a host port that a process of this host has bound already (the DNAT would take its
    connections away). A bind, never a packet.

    Raises: AlreadyExists naming the port.
    """
    for port in ports:
        kind = socket.SOCK_STREAM if port.protocol == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind((port.host_ip, port.host_port))
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise AlreadyExists(f"port {port.host_ip}:{port.host_port}/{port.protocol} is in use on this "
                                        "host") from None
                if err.errno != errno.EADDRNOTAVAIL:  # a host IP not (yet) on this host: DNAT still applies
                    raise InvalidArgument(f"port {port.host_ip}:{port.host_port}/{port.protocol}: {err}") from None


def _netlink_error(container_id: str, network: str, err: BaseException) -> BerthError:
    code = getattr(err, "code", None) or getattr(err, "errno", None)
    if code == errno.EEXIST:
        return AlreadyExists(f"cannot attach {container_id} to network {network}: something of it exists "
                             f"already ({err})")
    return Internal(f"cannot attach {container_id} to network {network}: {err}")


class BridgeNetworks:
    """``io.berth.network.v1.bridge`` (see :class:`berth.core.network.Network`)."""

    def __init__(self, store: NetworkStore, *, netns_dir: Path, default: NetworkRecord) -> None:
        self.store = store
        self.netns_dir = netns_dir
        self.default = default
        #: Marks this instance's host objects (see the module's docstring).
        self.instance = hashlib.sha256(str(netns_dir.absolute()).encode()).hexdigest()[:8]
        self._ready: set[str] = set()
        self._ready_lock = trio.Lock()

    def veth_name(self, namespace: str, container_id: str) -> str:
        """The host end's name (15 characters at most, as Linux wants)."""
        digest = hashlib.sha256(f"{self.instance}/{namespace}/{container_id}".encode()).hexdigest()
        return VETH_PREFIX + digest[:11]

    def owner(self, namespace: str, container_id: str) -> str:
        """The alias of the container's host veth and the comment of its nftables rules."""
        return f"berth {self.instance} {namespace}/{container_id}"

    async def start(self) -> None:
        """Record the default network (nothing on the host is made before a container needs it); a
        changed configuration replaces the recorded one unless containers use it."""
        try:
            recorded = await self.store.get(self.default.name)
        except NotFound:
            await self.store.create(self.default)
            return
        if recorded == self.default:
            return
        if await self.store.attachments(self.default.name):
            log.warning("network_config_not_applied", name=self.default.name, reason="containers use it",
                        subnet=recorded.subnet, bridge=recorded.bridge)
            self.default = recorded
            return
        await self.store.delete(self.default.name)
        await self.store.create(self.default)

    def netns_path(self, namespace: str, container_id: str) -> str:
        return str(self.netns_dir / namespace / container_id)

    async def _prepare(self, network: NetworkRecord) -> None:
        """berth's nftables table, and this network's isolation (and NAT) rules, once per process."""
        async with self._ready_lock:
            if network.bridge in self._ready:
                return
            await nft.ensure_table()
            await nft.isolate(network.bridge, network.subnet, network.nat)
            if network.nat:  # outbound NAT means routing the network's traffic out of this host
                await trio.Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
                log.info("ip_forwarding_enabled", network=network.name)
            self._ready.add(network.bridge)

    async def create(self, name: str, *, subnet: str = "", gateway: str = "", mtu: int = 0, nat: bool = False,
                     labels: dict[str, str] | None = None) -> NetworkInfo:
        validate_identifier(name, "network name")
        if name in ("none", "host", "default") or name.startswith("container"):
            raise InvalidArgument(f"network name {name!r} is reserved")
        if not subnet:
            raise InvalidArgument("a network needs a subnet (e.g. --subnet 10.89.0.0/24)")
        network = parse_subnet(subnet)
        try:
            gateway_ip = ipaddress.IPv4Address(gateway) if gateway else next(network.hosts())
        except ValueError:
            raise InvalidArgument(f"gateway {gateway!r} is not an IPv4 address") from None
        if gateway_ip not in network or gateway_ip in (network.network_address, network.broadcast_address):
            raise InvalidArgument(f"gateway {gateway_ip} is not a host address of {network}")
        if not 0 <= mtu <= 65535 or 0 < mtu < 576:
            raise InvalidArgument(f"mtu {mtu} is out of range (576 to 65535)")
        bridge = "bn" + hashlib.sha256(f"{self.instance}/{name}".encode()).hexdigest()[:11]
        record = NetworkRecord(name=name, driver="bridge", subnet=str(network), gateway=str(gateway_ip),
                               bridge=bridge, mtu=mtu or self.default.mtu, nat=nat, labels=dict(labels or {}))
        await self.store.create(record)
        log.info("network_created", name=name, subnet=record.subnet, bridge=bridge)
        return await self.inspect(name)

    async def remove(self, name: str) -> None:
        if name == self.default.name:
            raise InvalidArgument(f"network {name} is the default network")
        network = await self.store.get(name)
        await self.store.delete(name)
        self._ready.discard(network.bridge)
        await nft.forget_bridge(network.bridge)
        await trio.to_thread.run_sync(_netlink("delete_link", network.bridge))
        log.info("network_removed", name=name, bridge=network.bridge)

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
        """Raises: NotFound (no such network); AlreadyExists (attached already, or a published port is
        taken); ResourceExhausted (no address left); InvalidArgument (bad ports, or a mode this plugin does
        not attach); Internal (netlink or nft refused)."""
        path = Path(self.netns_path(namespace, container_id))
        if request.mode == "host":
            return Attachment(network="host", netns="")
        if request.mode.startswith("container:"):
            raise InvalidArgument(f"--net {request.mode} joins that container's namespace: there is nothing "
                                  "to attach")
        if request.mode == "none":
            if request.ports:
                raise InvalidArgument("published ports need a named network, not --net none")
            try:
                await trio.to_thread.run_sync(_netlink("loopback_only", path))
            except FileExistsError:
                raise AlreadyExists(f"container {container_id} has a network namespace already") from None
            except OSError as err:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(netns.remove, path)
                raise _netlink_error(container_id, "none", err) from None
            log.info("network_attached", container_id=container_id, namespace=namespace, network="none")
            return Attachment(network="none", netns=str(path), interfaces=(LOOPBACK,))
        check_ports(request.ports)
        _check_free_on_host(request.ports)
        network = await self.store.get(request.mode)
        await self._prepare(network)
        veth = self.veth_name(namespace, container_id)
        record = await self.store.attach(namespace, container_id, network, {
            "veth": veth, "netns": str(path), "ports": [p.to_wire() for p in request.ports]})
        try:
            interface = await trio.to_thread.run_sync(_netlink(
                "plumb", network, path, veth, self.owner(namespace, container_id), record.address))
            if request.ports:
                await nft.publish(self.owner(namespace, container_id), record.address, list(request.ports))
        except BaseException as err:
            with trio.CancelScope(shield=True):
                await self._teardown(record, rules=True)
            if isinstance(err, OSError):
                raise _netlink_error(container_id, network.name, err) from None
            raise
        log.info("network_attached", container_id=container_id, namespace=namespace, network=network.name,
                 address=record.address, veth=veth)
        return Attachment(network=network.name, netns=str(path), interfaces=(interface, LOOPBACK),
                          routes=(("0.0.0.0/0", network.gateway),), ports=request.ports)

    async def _teardown(self, record: AttachmentRecord, *, rules: bool = False) -> None:
        """Remove the record's rules (when it published ports, or ``rules``), veth and namespace, then the
        record (its address returns to the pool last)."""
        if rules or record.details.get("ports"):
            await nft.remove({self.owner(record.namespace, record.container_id)})
        veth, path = str(record.details["veth"]), Path(record.details["netns"])
        await trio.to_thread.run_sync(_netlink("unplumb", veth, path))
        await self.store.detach(record.namespace, record.container_id)

    async def detach(self, namespace: str, container_id: str) -> None:
        record = await self.store.attachment(namespace, container_id)
        if record is None:  # --net none, or never attached
            await trio.to_thread.run_sync(netns.remove, Path(self.netns_path(namespace, container_id)))
            return
        await self._teardown(record)
        log.info("network_detached", container_id=container_id, namespace=namespace, network=record.network,
                 address=record.address)

    async def attachment(self, namespace: str, container_id: str) -> Attachment | None:
        record = await self.store.attachment(namespace, container_id)
        if record is None:
            path = Path(self.netns_path(namespace, container_id))
            if await trio.to_thread.run_sync(netns.is_mounted, path):
                return Attachment(network="none", netns=str(path), interfaces=(LOOPBACK,))
            return None
        network = await self.store.get(record.network)
        return Attachment(network=record.network, netns=str(record.details["netns"]),
                          interfaces=(Interface(name="eth0", mac=mac_for(record.address), mtu=network.mtu,
                                                addresses=(f"{record.address}/{network.prefixlen}",)), LOOPBACK),
                          routes=(("0.0.0.0/0", network.gateway),),
                          ports=tuple(PortMapping.from_wire(p) for p in record.details.get("ports") or ()))

    async def reconcile(self, keep: Iterable[tuple[str, str]]) -> Sequence[str]:
        """Detach every recorded attachment not in ``keep``, then delete this instance's veths, nftables
        rules and namespace files that belong to no attachment (left by a crash mid-attach)."""
        kept = set(keep)
        removed: list[str] = []
        for record in await self.store.attachments():
            if (record.namespace, record.container_id) not in kept:
                try:
                    await self._teardown(record, rules=True)
                    removed.append(f"{record.namespace}/{record.container_id}")
                except BerthError as err:
                    log.warning("network_reconcile_failed", container_id=record.container_id, error=str(err))
        live = await self.store.attachments()
        wanted_veths = {str(r.details["veth"]) for r in live}
        tag = f"berth {self.instance} "
        for name in await trio.to_thread.run_sync(_tagged_veths, tag):
            if name not in wanted_veths:
                await trio.to_thread.run_sync(_netlink("delete_link", name))
                removed.append(f"veth {name}")
        owners = {self.owner(r.namespace, r.container_id) for r in live}
        stray = {str(rule["comment"]) for rule in await nft.rules()
                 if str(rule.get("comment", "")).startswith(tag) and rule["comment"] not in owners}
        if stray:
            await nft.remove(stray)
            removed += sorted(stray)
        wanted_paths = {str(r.details["netns"]) for r in live} | {self.netns_path(ns, cid) for ns, cid in kept}
        for path in await trio.to_thread.run_sync(_mounted_under, self.netns_dir):
            if str(path) not in wanted_paths:
                await trio.to_thread.run_sync(netns.remove, path)
                removed.append(f"netns {path}")
        if removed:
            log.info("network_reconciled", removed=removed)
        return removed


def _conforms(networks: BridgeNetworks) -> Network:
    """mypy checks here that the plugin implements the interface."""
    return networks
