"""Namespaces: ``io.berth.service.v1.namespaces-service`` (in memory until the metadata store lands)
and its RPC wrapper ``io.berth.rpc.v1.namespaces``."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.core.errdefs import AlreadyExists, InvalidArgument, NotFound
from berth.core.events import Exchange
from berth.core.filters import parse_filters
from berth.core.identifiers import validate_identifier, validate_labels
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.core.rpc.args import typed_args
from berth.core.rpc.server import Call, Handler, inline


@dataclass(kw_only=True)
class Namespace:
    name: str
    labels: dict[str, str]
    created_at: float
    updated_at: float

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "labels": dict(self.labels),
                "created_at": self.created_at, "updated_at": self.updated_at}


class NamespaceStore:
    """Namespaces and their labels, publishing ``/namespaces/{create,update,delete}``."""

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self._namespaces: dict[str, Namespace] = {}

    def create(self, name: str, labels: Mapping[str, str]) -> Namespace:
        """Raises: InvalidArgument (bad name or labels), AlreadyExists."""
        validate_identifier(name, "namespace")
        labels = validate_labels(labels)
        if name in self._namespaces:
            raise AlreadyExists(f"namespace {name} already exists")
        now = time.time()
        namespace = self._namespaces[name] = Namespace(name=name, labels=labels, created_at=now, updated_at=now)
        self._exchange.publish(name, "/namespaces/create", {"name": name, "labels": labels})
        return namespace

    def get(self, name: str) -> Namespace:
        """Raises: NotFound."""
        try:
            return self._namespaces[name]
        except KeyError:
            raise NotFound(f"namespace {name} not found") from None

    def list_all(self) -> list[Namespace]:
        return sorted(self._namespaces.values(), key=lambda n: n.name)

    def update(self, name: str, labels: Mapping[str, str], fieldpaths: list[str]) -> Namespace:
        """Replace the labels (no fieldpaths, or ``labels``) or only ``labels.<key>`` entries;
        an empty value removes a label.

        Raises: NotFound, InvalidArgument (an unknown field path or bad labels).
        """
        namespace = self.get(name)
        labels = validate_labels(labels)
        if not fieldpaths or "labels" in fieldpaths:
            new = dict(labels)
        else:
            new = dict(namespace.labels)
            for path in fieldpaths:
                if not path.startswith("labels."):
                    raise InvalidArgument(f"cannot update field {path!r} of a namespace (only labels)")
                key = path.removeprefix("labels.")
                if labels.get(key):
                    new[key] = labels[key]
                else:
                    new.pop(key, None)
        namespace.labels = {k: v for k, v in new.items() if v}
        namespace.updated_at = time.time()
        self._exchange.publish(name, "/namespaces/update", {"name": name, "labels": namespace.labels})
        return namespace

    def delete(self, name: str) -> None:
        """Raises: NotFound."""
        self.get(name)
        del self._namespaces[name]
        self._exchange.publish(name, "/namespaces/delete", {"name": name})


@dataclass(kw_only=True)
class CreateArgs:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class NameArgs:
    name: str


@dataclass(kw_only=True)
class ListArgs:
    filters: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class UpdateArgs:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    #: ``labels`` replaces all labels; ``labels.<key>`` sets (or, with an empty value, removes) one.
    update_mask: list[str] = field(default_factory=list)


class NamespacesRPC:
    def __init__(self, store: NamespaceStore) -> None:
        self.store = store

    @inline
    @typed_args(CreateArgs)
    async def create(self, call: Call, args: CreateArgs) -> dict[str, Any]:
        return {"namespace": self.store.create(args.name, args.labels).to_wire()}

    @inline
    @typed_args(NameArgs)
    async def get(self, call: Call, args: NameArgs) -> dict[str, Any]:
        return {"namespace": self.store.get(args.name).to_wire()}

    @inline
    @typed_args(ListArgs)
    async def list_namespaces(self, call: Call, args: ListArgs) -> dict[str, Any]:
        matcher = parse_filters(args.filters)
        wire = [n.to_wire() for n in self.store.list_all()]
        return {"namespaces": [n for n in wire if matcher.match_mapping(n)]}

    @inline
    @typed_args(UpdateArgs)
    async def update(self, call: Call, args: UpdateArgs) -> dict[str, Any]:
        return {"namespace": self.store.update(args.name, args.labels, args.update_mask).to_wire()}

    @inline
    @typed_args(NameArgs)
    async def delete(self, call: Call, args: NameArgs) -> dict[str, Any]:
        self.store.delete(args.name)
        return {}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"namespaces.create": self.create, "namespaces.get": self.get,
                "namespaces.list": self.list_namespaces, "namespaces.update": self.update,
                "namespaces.delete": self.delete}


async def init_store(ic: InitContext) -> NamespaceStore:
    return NamespaceStore(ic.get_single(PluginType.EVENT))


async def init_rpc(ic: InitContext) -> NamespacesRPC:
    return NamespacesRPC(ic.get_by_id(PluginType.SERVICE, "namespaces-service"))


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.SERVICE, id="namespaces-service", init=init_store,
                                   requires=(PluginType.EVENT,)))
    registry.register(Registration(type=PluginType.RPC, id="namespaces", init=init_rpc,
                                   requires=(PluginType.SERVICE,)))
