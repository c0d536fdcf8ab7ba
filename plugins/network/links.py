"""The netlink side of bridged networks, with pyroute2: bridges, veth pairs, addresses, routes.

Every function blocks (call them through ``trio.to_thread.run_sync``) and raises netlink's refusals as
:class:`OSError` with the kernel's errno. This module is imported on first use, not when the daemon starts
(pyroute2 takes about 100 ms to import).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from berth.core.network import Interface
from berth.plugins.network import netns
from berth.plugins.network.store import NetworkRecord, mac_for

P = ParamSpec("P")
T = TypeVar("T")


def _oserror(function: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return function(*args, **kwargs)
        except NetlinkError as err:
            raise OSError(err.code, f"netlink: {os.strerror(err.code) if err.code else err}") from None
    return wrapper


#: ``lo``'s index in every network namespace (the kernel's LOOPBACK_IFINDEX).
LOOPBACK_INDEX = 1
#: Bridges are made by one thread at a time (a second attach finds the first one's bridge).
_bridge_lock = threading.Lock()
_bridges_checked: set[str] = set()


def _ignore_exists(err: NetlinkError) -> None:
    if err.code != errno.EEXIST:
        raise err


def _ensure_bridge(ipr: IPRoute, network: NetworkRecord) -> int:
    """The bridge's index. The first time in this process (or when it is missing) the bridge is made or
    completed: present, the gateway address on it, up, ``route_localnet`` on; a half-made one (a crash
    between two of these steps) is finished, not refused."""
    with _bridge_lock:
        found = ipr.link_lookup(ifname=network.bridge)
        if found and network.bridge in _bridges_checked:
            return int(found[0])
        if not found:
            try:
                ipr.link("add", ifname=network.bridge, kind="bridge")
            except NetlinkError as err:  # another daemon made it meanwhile
                _ignore_exists(err)
            found = ipr.link_lookup(ifname=network.bridge)
        index = int(found[0])
        try:
            ipr.addr("add", index=index, address=network.gateway, prefixlen=network.prefixlen)
        except NetlinkError as err:
            _ignore_exists(err)
        ipr.link("set", index=index, mtu=network.mtu, state="up")
        # Published ports reach the container from 127.0.0.1: such packets may leave through the bridge.
        with open(f"/proc/sys/net/ipv4/conf/{network.bridge}/route_localnet", "w") as f:
            f.write("1")
        _bridges_checked.add(network.bridge)
        return index


@_oserror
def delete_link(name: str) -> bool:
    """Delete link ``name``; whether there was one."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        for index in found:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=index)
        return bool(found)


def _lo_up(ipr: IPRoute) -> None:
    ipr.link("set", index=LOOPBACK_INDEX, state="up")


@_oserror
def plumb(network: NetworkRecord, path: Path, veth: str, alias: str, address: str) -> Interface:
    """Make the namespace at ``path`` and a veth pair whose inner end is born in it as ``eth0``; put the
    host end on the bridge, address and route the inner end; return ``eth0``."""
    netns.create(path)
    with netns.entered(str(path)):
        inner = IPRoute()  # a netlink socket stays in the namespace it was opened in
    try:
        with IPRoute() as ipr:
            bridge = _ensure_bridge(ipr, network)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:  # one request: the pair, the host end on the bridge and up, the inner end born in the namespace
                ipr.link("add", ifname=veth, kind="veth", master=bridge, mtu=network.mtu, state="up",
                         peer={"ifname": "eth0", "net_ns_fd": fd, "mtu": network.mtu, "address": mac_for(address)})
            finally:
                os.close(fd)
            ipr.link("set", index=ipr.link_lookup(ifname=veth)[0], ifalias=alias)  # not taken at creation
        _lo_up(inner)
        index = inner.link_lookup(ifname="eth0")[0]
        inner.addr("add", index=index, address=address, prefixlen=network.prefixlen)
        inner.link("set", index=index, state="up")
        inner.route("add", dst="0.0.0.0/0", gateway=network.gateway)
    finally:
        inner.close()
    return Interface(name="eth0", mac=mac_for(address), mtu=network.mtu,
                     addresses=(f"{address}/{network.prefixlen}",))


@_oserror
def loopback_only(path: Path) -> None:
    """A namespace at ``path`` with only ``lo``, up."""
    netns.create(path)
    with netns.entered(str(path)), IPRoute() as ipr:
        _lo_up(ipr)


@_oserror
def unplumb(veth: str, path: Path) -> None:
    delete_link(veth)  # deleting one end of a veth pair deletes both
    netns.remove(path)
