"""The plugin types berth knows, and the well-known property keys.

A type is a versioned reverse-DNS string; a plugin's URI is ``<type>.<id>``. Third-party plugins may
define types of their own (any string shaped like these).
"""

from __future__ import annotations

import enum
import re

__all__ = ["PluginType", "valid_type"]


class PluginType(enum.StrEnum):
    CONTENT = "io.berth.content.v1"
    SNAPSHOTTER = "io.berth.snapshotter.v1"
    RUNTIME = "io.berth.runtime.v1"
    METADATA = "io.berth.metadata.v1"
    GC = "io.berth.gc.v1"
    LEASE = "io.berth.lease.v1"
    EVENT = "io.berth.event.v1"
    DIFFER = "io.berth.differ.v1"
    TRANSFER = "io.berth.transfer.v1"
    NETWORK = "io.berth.network.v1"
    # In-process services (containerd's service.v1): the API that RPC wrappers and other plugins use.
    SERVICE = "io.berth.service.v1"
    # RPC services (containerd's grpc.v1): an instance is an RPCService whose methods the server serves.
    RPC = "io.berth.rpc.v1"
    INTERNAL = "io.berth.internal.v1"


_TYPE = re.compile(r"[a-z0-9]+(?:[.-][a-z0-9]+)*\.v[0-9]+\Z")


def valid_type(value: str) -> bool:
    """Whether ``value`` is shaped like a plugin type (``io.example.thing.v1``)."""
    return bool(_TYPE.match(value))
