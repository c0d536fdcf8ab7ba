"""The network plugin interface (``io.berth.network.v1``): named networks, and containers attached to them.

containerd hands a container's network to CNI; berth asks a network plugin. The tasks service calls it
around a task's life, in this order:

1. ``containers.new`` records the container's network choice (a :class:`NetworkRequest`) and puts
   :meth:`Network.netns_path` in the spec as the container's network namespace (for ``host`` the spec
   has no network namespace; for ``container:ID`` it joins that container's).
2. ``tasks.create`` calls :meth:`Network.attach` **before** the runtime creates the task: the plugin
   makes the network namespace at ``netns_path`` (a bind-mounted ``/proc/<pid>/ns/net``), brings up
   ``lo``, and for a bridged network adds the interface, address, routes and published ports. It
   returns what the container got (:class:`Attachment`).
3. ``tasks.delete`` (and a failed create) calls :meth:`Network.detach`: everything ``attach`` made is
   removed, the address released. Detaching something never attached is not an error.
4. After a daemon restart, :meth:`Network.reconcile` gets the containers whose tasks still exist and
   removes whatever belongs to no container (a crash mid-attach, a task lost with its shim).

Every method is a coroutine (netlink and nftables work runs in worker threads). Errors are
:mod:`berth.core.errdefs` classes: NotFound (no such network), AlreadyExists, InvalidArgument (a bad
subnet or port), ResourceExhausted (no address left in the range), FailedPrecondition (removing a
network that containers use).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Attachment", "Interface", "Network", "NetworkInfo", "NetworkRequest", "PortMapping"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PortMapping:
    """``-p [HOST_IP:]HOST_PORT:CONTAINER_PORT[/PROTOCOL]``; ``host_ip`` defaults to 127.0.0.1."""

    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = "127.0.0.1"

    def to_wire(self) -> dict[str, Any]:
        return {"host_port": self.host_port, "container_port": self.container_port, "protocol": self.protocol,
                "host_ip": self.host_ip}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> PortMapping:
        return cls(host_port=int(raw["host_port"]), container_port=int(raw["container_port"]),
                   protocol=str(raw.get("protocol", "tcp")), host_ip=str(raw.get("host_ip", "127.0.0.1")))


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkRequest:
    """What a container asked for: ``mode`` is ``none``, ``host``, ``container:<id>`` or the name of a
    network (``bridge`` is the default one)."""

    mode: str
    ports: tuple[PortMapping, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"mode": self.mode, "ports": [p.to_wire() for p in self.ports]}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> NetworkRequest:
        return cls(mode=str(raw["mode"]), ports=tuple(PortMapping.from_wire(p) for p in raw.get("ports") or ()))


@dataclass(frozen=True, slots=True, kw_only=True)
class Interface:
    """An interface in the container's network namespace: ``addresses`` as ``address/prefix``."""

    name: str
    mac: str = ""
    mtu: int = 0
    addresses: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "mac": self.mac, "mtu": self.mtu, "addresses": list(self.addresses)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Attachment:
    """What a container got from :meth:`Network.attach`."""

    network: str
    netns: str
    interfaces: tuple[Interface, ...] = ()
    #: ``(destination, gateway)``: ``("0.0.0.0/0", "10.88.0.1")`` for the default route.
    routes: tuple[tuple[str, str], ...] = ()
    ports: tuple[PortMapping, ...] = ()
    #: Name servers for the container's ``/etc/resolv.conf`` (empty: the host's).
    dns: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"network": self.network, "netns": self.netns, "interfaces": [i.to_wire() for i in self.interfaces],
                "routes": [list(r) for r in self.routes], "ports": [p.to_wire() for p in self.ports],
                "dns": list(self.dns)}


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkInfo:
    """A named network: its subnet (CIDR), gateway, bridge, and the containers attached to it."""

    name: str
    driver: str
    subnet: str = ""
    gateway: str = ""
    bridge: str = ""
    mtu: int = 0
    nat: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    #: ``namespace/container_id`` of each attached container.
    containers: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "driver": self.driver, "subnet": self.subnet, "gateway": self.gateway,
                "bridge": self.bridge, "mtu": self.mtu, "nat": self.nat, "labels": dict(self.labels),
                "containers": list(self.containers)}


class Network(Protocol):
    """An ``io.berth.network.v1`` plugin instance."""

    def netns_path(self, namespace: str, container_id: str) -> str:
        """Where the container's network namespace is (or will be) bind-mounted."""
        ...

    async def create(self, name: str, *, subnet: str = "", gateway: str = "", mtu: int = 0, nat: bool = False,
                     labels: dict[str, str] | None = None) -> NetworkInfo: ...

    async def remove(self, name: str) -> None: ...

    async def inspect(self, name: str) -> NetworkInfo: ...

    async def list_networks(self) -> list[NetworkInfo]: ...

    async def attach(self, namespace: str, container_id: str, request: NetworkRequest, *,
                     hostname: str = "") -> Attachment: ...

    async def detach(self, namespace: str, container_id: str) -> None: ...

    async def attachment(self, namespace: str, container_id: str) -> Attachment | None:
        """What the container has now (``None`` when it is not attached)."""
        ...

    async def reconcile(self, keep: Iterable[tuple[str, str]]) -> Sequence[str]:
        """Remove every attachment of a container not in ``keep``; return what was removed (for the log)."""
        ...
