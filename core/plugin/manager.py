"""Build the pluggy manager: built-in modules first, then third-party entry points.

No manager exists at import time; :func:`load_plugins` builds one each call and returns it with the
registrations it collected, so tests and tools can build as many as they like.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType

import pluggy

from berth.core.plugin.hookspecs import PROJECT, BerthHookSpecs
from berth.core.plugin.registration import Registry, describe_error

__all__ = ["ENTRY_POINT_GROUP", "LoadError", "LoadedModules", "load_plugins"]

ENTRY_POINT_GROUP = "berth.plugins"


@dataclass(frozen=True, slots=True)
class LoadError:
    """A plugin module that could not be imported or whose ``berth_register`` raised."""

    name: str
    error: str


@dataclass(slots=True)
class LoadedModules:
    manager: pluggy.PluginManager
    registry: Registry
    errors: list[LoadError] = field(default_factory=list)


def load_plugins(
    builtins: Sequence[str | ModuleType] = (),
    *,
    entry_points: bool = True,
    extra: Iterable[object] = (),
    blocked: Iterable[str] = (),
) -> LoadedModules:
    """Import the plugin modules and collect their registrations, in order.

    Args:
        builtins: module names (or modules) registered first, in this order.
        entry_points: also load the ``berth.plugins`` entry points of installed distributions.
        extra: further plugin objects (modules or instances), registered last (tests use this).
        blocked: plugin module names never registered (entry-point names or module names).

    A module that fails to import, or whose hook raises, does not stop the others: it is reported in
    ``errors`` (the daemon prints it and introspection lists it), and its registrations are dropped.
    """
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(BerthHookSpecs)
    errors: list[LoadError] = []
    for name in blocked:
        manager.set_blocked(name)

    for item in builtins:
        module = importlib.import_module(item) if isinstance(item, str) else item
        manager.register(module, name=module.__name__)
    if entry_points:
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if manager.is_blocked(ep.name) or manager.has_plugin(ep.name):
                continue
            try:
                manager.register(ep.load(), name=ep.name)
            except Exception as exc:
                errors.append(LoadError(ep.name, f"cannot load entry point {ep.value}: {describe_error(exc)}"))
    for plugin in extra:
        manager.register(plugin)
    manager.check_pending()

    registry = Registry()
    # pluggy calls hooks newest-first; registration order must follow load order, as containerd's
    # builtins do, so call each implementation ourselves, oldest first.
    for impl in manager.hook.berth_register.get_hookimpls():
        registry._current_source = impl.plugin_name
        before = len(registry)
        try:
            impl.function(registry=registry)
        except Exception as exc:
            for dropped in registry._registrations[before:]:  # forget them wholly: another module may reuse the URI
                registry._uris.discard(dropped.uri)
                registry.source.pop(dropped.uri, None)
            del registry._registrations[before:]
            errors.append(LoadError(impl.plugin_name, f"berth_register failed: {describe_error(exc)}"))
    return LoadedModules(manager, registry, errors)
