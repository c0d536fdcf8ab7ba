"""Networks and attachments in the metadata database, and address allocation (IPAM).

An attachment row holds the container's address; ``UNIQUE (network, address)`` and the database's single
writer make an allocation atomic, so no address is handed out twice, across restarts or concurrent
attaches. An address returns to the pool when its attachment row is deleted.
"""

from __future__ import annotations

import ipaddress
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from berth.core.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from berth.core.metadata.db import MetadataDB, dump_labels, load_labels
from berth.core.network import PortMapping

IPv4 = ipaddress.IPv4Address


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """An IPv4 subnet in CIDR form, at most /30 (room for a gateway and a container).

    Raises: InvalidArgument naming the subnet.
    """
    try:
        subnet = ipaddress.IPv4Network(text, strict=True)
    except ValueError as err:
        raise InvalidArgument(f"subnet {text!r} is not an IPv4 network in CIDR form: {err}") from None
    if subnet.prefixlen > 30:
        raise InvalidArgument(f"subnet {text} is too small: at most /30")
    return subnet


def allocate(subnet: ipaddress.IPv4Network, gateway: IPv4, taken: Iterable[IPv4]) -> IPv4:
    """The lowest host address of ``subnet`` that is neither the gateway nor taken.

    Raises: ResourceExhausted when none is left.
    """
    used = set(taken) | {gateway}
    for address in subnet.hosts():
        if address not in used:
            return address
    raise ResourceExhausted(f"no address left in {subnet}")


def mac_for(address: str) -> str:
    """The container's MAC address, made from its IPv4 address as Docker does (locally administered)."""
    return "02:42:" + ":".join(f"{octet:02x}" for octet in ipaddress.IPv4Address(address).packed)


def check_ports(ports: Iterable[PortMapping]) -> None:
    """Ports in range, a known protocol, an IPv4 host address, no host port twice.

    Raises: InvalidArgument naming the port.
    """
    seen: set[tuple[str, int, str]] = set()
    for port in ports:
        text = f"{port.host_ip}:{port.host_port}:{port.container_port}/{port.protocol}"
        if not (0 < port.host_port < 65536 and 0 < port.container_port < 65536):
            raise InvalidArgument(f"published port {text}: ports are 1 to 65535")
        if port.protocol not in ("tcp", "udp"):
            raise InvalidArgument(f"published port {text}: the protocol is tcp or udp")
        try:
            ipaddress.IPv4Address(port.host_ip)
        except ValueError:
            raise InvalidArgument(f"published port {text}: {port.host_ip!r} is not an IPv4 address") from None
        for key in seen:
            if _clash(key, (port.host_ip, port.host_port, port.protocol)):
                raise InvalidArgument(f"published port {text}: host port {port.host_port} is given twice")
        seen.add((port.host_ip, port.host_port, port.protocol))


def _clash(a: tuple[str, int, str], b: tuple[str, int, str]) -> bool:
    """Whether two (host IP, host port, protocol) publications would catch the same packets."""
    return a[1:] == b[1:] and (a[0] == b[0] or "0.0.0.0" in (a[0], b[0]))


@dataclass(frozen=True, kw_only=True)
class NetworkRecord:
    name: str
    driver: str
    subnet: str
    gateway: str
    bridge: str
    mtu: int
    nat: bool
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def prefixlen(self) -> int:
        return ipaddress.IPv4Network(self.subnet).prefixlen


@dataclass(frozen=True, kw_only=True)
class AttachmentRecord:
    namespace: str
    container_id: str
    network: str
    address: str
    #: ``veth`` (the host end), ``netns`` (path), ``ports`` (wire form).
    details: dict[str, Any]


class NetworkStore:
    def __init__(self, db: MetadataDB) -> None:
        self.db = db

    async def create(self, record: NetworkRecord) -> NetworkRecord:
        """Raises: AlreadyExists; InvalidArgument when the subnet overlaps another network's."""
        new = ipaddress.IPv4Network(record.subnet)

        def insert(conn: sqlite3.Connection) -> None:
            for other in conn.execute("SELECT name, record FROM networks"):
                if other[0] == record.name:
                    raise AlreadyExists(f"network {record.name} already exists")
                if new.overlaps(ipaddress.IPv4Network(json.loads(other[1])["subnet"])):
                    raise InvalidArgument(f"subnet {record.subnet} overlaps network {other[0]}'s")
                if json.loads(other[1])["bridge"] == record.bridge:
                    raise AlreadyExists(f"bridge {record.bridge} is network {other[0]}'s")
            body = {"subnet": record.subnet, "gateway": record.gateway, "bridge": record.bridge,
                    "mtu": record.mtu, "nat": record.nat}
            conn.execute("INSERT INTO networks (name, driver, record, labels, created_at) VALUES (?, ?, ?, ?, ?)",
                         (record.name, record.driver, json.dumps(body), dump_labels(record.labels), time.time()))

        await self.db.write(insert)
        return record

    async def get(self, name: str) -> NetworkRecord:
        row = await self.db.read(lambda c: c.execute(
            "SELECT name, driver, record, labels FROM networks WHERE name = ?", (name,)).fetchone())
        if row is None:
            raise NotFound(f"network {name} not found")
        return _network(row)

    async def list_all(self) -> list[NetworkRecord]:
        rows = await self.db.read(lambda c: c.execute(
            "SELECT name, driver, record, labels FROM networks ORDER BY name").fetchall())
        return [_network(row) for row in rows]

    async def delete(self, name: str) -> None:
        """Raises: NotFound; FailedPrecondition while containers are attached."""
        def remove(conn: sqlite3.Connection) -> None:
            users = conn.execute("SELECT namespace || '/' || container_id FROM network_attachments "
                                 "WHERE network = ?", (name,)).fetchall()
            if users:
                raise FailedPrecondition(f"network {name} is in use by {', '.join(u[0] for u in users)}")
            if conn.execute("DELETE FROM networks WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"network {name} not found")

        await self.db.write(remove)

    async def attach(self, namespace: str, container_id: str, network: NetworkRecord,
                     details: dict[str, Any]) -> AttachmentRecord:
        """Record an attachment with a freshly allocated address.

        Raises: AlreadyExists (the container has one, or another container publishes one of its host
        ports); ResourceExhausted.
        """
        subnet = ipaddress.IPv4Network(network.subnet)
        gateway = IPv4(network.gateway)

        def insert(conn: sqlite3.Connection) -> AttachmentRecord:
            if conn.execute("SELECT 1 FROM network_attachments WHERE namespace = ? AND container_id = ?",
                            (namespace, container_id)).fetchone():
                raise AlreadyExists(f"container {container_id} is attached to a network already")
            wanted = [(str(p["host_ip"]), int(p["host_port"]), str(p["protocol"])) for p in details.get("ports", ())]
            if wanted:
                for row in conn.execute("SELECT namespace, container_id, record FROM network_attachments"):
                    for port in json.loads(row[2]).get("ports") or ():
                        held = (str(port["host_ip"]), int(port["host_port"]), str(port["protocol"]))
                        for key in wanted:
                            if _clash(held, key):
                                raise AlreadyExists(f"port {key[0]}:{key[1]}/{key[2]} is published already "
                                                    f"(by {row[0]}/{row[1]})")
            taken = [IPv4(r[0]) for r in conn.execute(
                "SELECT address FROM network_attachments WHERE network = ?", (network.name,))]
            address = allocate(subnet, gateway, taken)
            conn.execute("INSERT INTO network_attachments (namespace, container_id, network, address, record, "
                         "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                         (namespace, container_id, network.name, str(address), json.dumps(details), time.time()))
            return AttachmentRecord(namespace=namespace, container_id=container_id, network=network.name,
                                    address=str(address), details=details)

        return await self.db.write(insert)

    async def attachment(self, namespace: str, container_id: str) -> AttachmentRecord | None:
        row = await self.db.read(lambda c: c.execute(
            "SELECT namespace, container_id, network, address, record FROM network_attachments "
            "WHERE namespace = ? AND container_id = ?", (namespace, container_id)).fetchone())
        return None if row is None else _attachment(row)

    async def attachments(self, network: str | None = None) -> list[AttachmentRecord]:
        query = "SELECT namespace, container_id, network, address, record FROM network_attachments"
        args: tuple[str, ...] = ()
        if network is not None:
            query += " WHERE network = ?"
            args = (network,)
        rows = await self.db.read(lambda c: c.execute(query + " ORDER BY namespace, container_id", args).fetchall())
        return [_attachment(row) for row in rows]

    async def detach(self, namespace: str, container_id: str) -> None:
        await self.db.write(lambda c: c.execute(
            "DELETE FROM network_attachments WHERE namespace = ? AND container_id = ?", (namespace, container_id)))


def _network(row: sqlite3.Row | tuple[Any, ...]) -> NetworkRecord:
    body = json.loads(row[2])
    return NetworkRecord(name=row[0], driver=row[1], subnet=body["subnet"], gateway=body["gateway"],
                         bridge=body["bridge"], mtu=int(body["mtu"]), nat=bool(body["nat"]), labels=load_labels(row[3]))


def _attachment(row: sqlite3.Row | tuple[Any, ...]) -> AttachmentRecord:
    return AttachmentRecord(namespace=row[0], container_id=row[1], network=row[2], address=row[3],
                            details=json.loads(row[4]))
