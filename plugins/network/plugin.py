"""``io.berth.network.v1.bridge``: bridged networks for containers (docs/network.md)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from berth.core.errdefs import InvalidArgument
from berth.core.identifiers import validate_identifier
from berth.core.plugin import InitContext, PluginType, Registration, Registry, SkipPlugin, hookimpl
from berth.plugins.metadata.plugin import Metadata
from berth.plugins.network.store import NetworkRecord, NetworkStore, parse_subnet


@dataclass(kw_only=True)
class Config:
    #: The default network's name (``berth run --net bridge``).
    default_network: str = "bridge"
    #: Its Linux bridge.
    bridge: str = "berth0"
    #: Its address range; the first address is the gateway, on the bridge.
    subnet: str = "10.88.0.0/16"
    mtu: int = 1500
    #: Masquerade the default network's traffic out of the host (off: containers reach only this host
    #: and each other).
    nat: bool = False
    #: Where containers' network namespaces are bind-mounted (``<dir>/<namespace>/<id>``); empty: the
    #: daemon's state directory's ``netns`` (``/run/berth/netns``).
    netns_dir: str = ""


async def init(ic: InitContext) -> object:
    if importlib.util.find_spec("pyroute2") is None:  # a dependency; a broken install skips networking only
        raise SkipPlugin("pyroute2 is not installed")
    from berth.plugins.network.bridge import BridgeNetworks  # pyroute2 itself is imported on first attach

    config: Config = ic.config
    subnet = parse_subnet(config.subnet)
    if (not 0 < len(config.bridge) <= 15 or config.bridge in (".", "..")
            or any(c in "/:" or c.isspace() for c in config.bridge)):  # as the kernel's dev_valid_name
        raise InvalidArgument(f"bridge name {config.bridge!r} must be 1 to 15 characters, with no '/', ':' or "
                              f"spaces")
    if not 576 <= config.mtu <= 65535:
        raise InvalidArgument(f"mtu {config.mtu} is out of range (576 to 65535)")
    validate_identifier(config.default_network, "default_network")
    default = NetworkRecord(name=config.default_network, driver="bridge", subnet=str(subnet),
                            gateway=str(next(subnet.hosts())), bridge=config.bridge, mtu=config.mtu, nat=config.nat)
    metadata: Metadata = ic.get_single(PluginType.METADATA)
    netns_dir = Path(config.netns_dir) if config.netns_dir else ic.state.parent / "netns"
    networks = BridgeNetworks(NetworkStore(metadata.db), netns_dir=netns_dir, default=default)
    await networks.start()
    ic.meta.exports.update({"default_network": config.default_network, "bridge": config.bridge,
                            "subnet": str(subnet), "netns_dir": str(netns_dir),
                            "instance": networks.instance})
    return networks


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.NETWORK, id="bridge", config=Config, init=init,
                                   requires=(PluginType.METADATA,)))
