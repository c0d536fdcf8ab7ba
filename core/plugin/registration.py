"""Registrations, the registry that collects them, and the context a plugin's ``init`` receives."""

from __future__ import annotations

import builtins
import dataclasses
import enum
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from berth.core.errdefs import BerthError, FailedPrecondition, InvalidArgument, NotFound
from berth.core.plugin.types import valid_type

if TYPE_CHECKING:
    import pluggy
    import trio
    from structlog.typing import FilteringBoundLogger

__all__ = [
    "PLUGIN_REF",
    "InitContext",
    "LoadedPlugin",
    "Meta",
    "PluginSet",
    "PluginStatus",
    "Registration",
    "Registry",
    "ServerInfo",
    "SkipPlugin",
    "plugin_ref",
]

InitFn = Callable[["InitContext"], Awaitable[object]]

#: Field metadata key marking a config field that names a plugin (by id) of the given type.
PLUGIN_REF = "berth.plugin_ref"

_ID = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*\Z")


def plugin_ref(plugin_type: str, default: str = "", *, doc: str = "") -> Any:
    """A config field naming the plugin of ``plugin_type`` this plugin uses, by id.

    The daemon checks at startup that a non-empty value names a plugin of that type that loaded;
    naming one that is missing, disabled, skipped or failed stops the daemon with the file, table
    and key. The plugin must list ``plugin_type`` in its ``requires``.
    """
    return dataclasses.field(default=default, metadata={PLUGIN_REF: plugin_type, "doc": doc})


class SkipPlugin(Exception):
    """Raised by ``init`` when the plugin does not apply here (not a failure: status ``skip``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """What a plugin declares about itself.

    Args:
        type: the plugin type, for example ``io.berth.snapshotter.v1``.
        id: unique within the type; the URI is ``<type>.<id>``.
        init: ``async def init(ic: InitContext) -> instance``; may raise :class:`SkipPlugin`.
        requires: types this plugin needs initialised first; ``("*",)`` means every other plugin.
        config: a dataclass whose defaults are the plugin's defaults; its table in the config file is
            decoded into it and handed over as ``ic.config``.
    """

    type: str
    id: str
    init: InitFn
    requires: tuple[str, ...] = ()
    config: builtins.type[Any] | None = None

    @property
    def uri(self) -> str:
        return f"{self.type}.{self.id}"

    def plugin_refs(self) -> list[tuple[str, str]]:
        """The ``(field name, plugin type)`` pairs of config fields made with :func:`plugin_ref`."""
        if self.config is None:
            return []
        return [(f.name, f.metadata[PLUGIN_REF]) for f in dataclasses.fields(self.config)
                if PLUGIN_REF in f.metadata]


class Registry:
    """Collects registrations from every plugin module, in order, refusing malformed ones."""

    def __init__(self) -> None:
        self._registrations: list[Registration] = []
        self._uris: set[str] = set()
        self.source: dict[str, str] = {}
        self._current_source = ""

    def register(self, registration: Registration) -> None:
        """Add a registration.

        Raises:
            InvalidArgument: an empty or malformed type or id, a duplicate URI, ``"*"`` mixed with
                other requirements, a plugin requiring its own type, a config that is not a
                dataclass, or a ``plugin_ref`` field whose type is not required.
        """
        reg = registration
        if not reg.type or not valid_type(reg.type):
            raise InvalidArgument(f"plugin type {reg.type!r} is not a type like io.example.thing.v1")
        if not reg.id or not _ID.match(reg.id):
            raise InvalidArgument(f"plugin id {reg.id!r} of type {reg.type} is invalid")
        if reg.uri in self._uris:
            where = self.source.get(reg.uri, "?")
            raise InvalidArgument(f"plugin {reg.uri} is registered twice (first by {where})")
        if "*" in reg.requires and len(reg.requires) > 1:
            raise InvalidArgument(f"plugin {reg.uri}: \"*\" must be its only requirement")
        if reg.type in reg.requires:
            raise InvalidArgument(f"plugin {reg.uri} requires its own type")
        if reg.config is not None and not (isinstance(reg.config, type) and dataclasses.is_dataclass(reg.config)):
            raise InvalidArgument(f"plugin {reg.uri}: config must be a dataclass (the class, not an instance)")
        for name, ref_type in reg.plugin_refs():
            if ref_type not in reg.requires and "*" not in reg.requires:
                raise InvalidArgument(f"plugin {reg.uri}: config key {name} names a {ref_type} plugin "
                                      f"but {ref_type} is not in requires")
        self._registrations.append(reg)
        self._uris.add(reg.uri)
        self.source[reg.uri] = self._current_source

    def __iter__(self) -> Iterator[Registration]:
        return iter(self._registrations)

    def __len__(self) -> int:
        return len(self._registrations)

    def get(self, uri: str) -> Registration | None:
        return next((r for r in self._registrations if r.uri == uri), None)


class PluginStatus(enum.StrEnum):
    OK = "ok"
    SKIP = "skip"
    ERROR = "error"


@dataclass(slots=True, kw_only=True)
class Meta:
    """What a plugin tells the world about itself during ``init`` (shown by introspection)."""

    exports: dict[str, str] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)
    platforms: list[str] = field(default_factory=list)


@dataclass(eq=False, slots=True, kw_only=True)
class LoadedPlugin:
    """One plugin after its ``init``: its instance, or why it has none."""

    registration: Registration
    status: PluginStatus
    meta: Meta
    instance: object = None
    error: BaseException | None = None

    @property
    def uri(self) -> str:
        return self.registration.uri

    @property
    def error_message(self) -> str:
        return "" if self.error is None else str(self.error) or type(self.error).__name__


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The daemon instance: a fresh ``uuid`` each start, its ``pid`` and start time (UNIX seconds)."""

    uuid: str
    pid: int
    started_at: float
    version: str
    revision: str


class PluginSet:
    """The plugins initialised so far, in init order, failed and skipped ones included."""

    def __init__(self) -> None:
        self._plugins: list[LoadedPlugin] = []
        self._by_uri: dict[str, LoadedPlugin] = {}
        #: ``(module, error)`` for plugin modules that could not be loaded at all.
        self.load_errors: list[tuple[str, str]] = []

    def add(self, plugin: LoadedPlugin) -> None:
        self._plugins.append(plugin)
        self._by_uri[plugin.uri] = plugin

    def all(self) -> list[LoadedPlugin]:
        """Every plugin in init order."""
        return list(self._plugins)

    def get(self, uri: str) -> LoadedPlugin | None:
        return self._by_uri.get(uri)

    def get_by_id(self, plugin_type: str, plugin_id: str) -> object:
        """The instance of ``<plugin_type>.<plugin_id>``.

        Raises:
            NotFound: no such plugin loaded, or it was skipped (the message says why).
            FailedPrecondition: it failed to initialise (the message carries its error).
        """
        uri = f"{plugin_type}.{plugin_id}"
        plugin = self._by_uri.get(uri)
        if plugin is None:
            raise NotFound(f"plugin {uri} is not loaded")
        return _instance_of(plugin)

    def get_single(self, plugin_type: str) -> object:
        """The one loaded instance of ``plugin_type``.

        Raises:
            NotFound: none loaded (a failed one's error is in the message).
            FailedPrecondition: more than one loaded, or the only one failed.
        """
        of_type = [p for p in self._plugins if p.registration.type == plugin_type]
        ok = [p for p in of_type if p.status is PluginStatus.OK]
        if len(ok) > 1:
            ids = ", ".join(p.registration.id for p in ok)
            raise FailedPrecondition(f"more than one {plugin_type} plugin loaded ({ids}): name one by id")
        if ok:
            return ok[0].instance
        failed = [p for p in of_type if p.status is PluginStatus.ERROR]
        if len(failed) == 1:
            return _instance_of(failed[0])
        raise NotFound(f"no {plugin_type} plugin loaded")

    def get_by_type(self, plugin_type: str) -> dict[str, object]:
        """Every instance of ``plugin_type`` that loaded, by id (skipped and failed ones left out)."""
        return {p.registration.id: p.instance for p in self._plugins
                if p.registration.type == plugin_type and p.status is PluginStatus.OK}


def _instance_of(plugin: LoadedPlugin) -> object:
    if plugin.status is PluginStatus.OK:
        return plugin.instance
    if plugin.status is PluginStatus.SKIP:
        raise NotFound(f"plugin {plugin.uri} was skipped: {plugin.error_message}")
    error = FailedPrecondition(f"plugin {plugin.uri} failed to load: {plugin.error_message}")
    error.__cause__ = plugin.error
    raise error


@dataclass(eq=False, kw_only=True)
class InitContext:
    """Everything a plugin's ``init`` gets from the daemon.

    Attributes:
        registration: the plugin's own registration.
        config: its decoded config (an instance of ``registration.config``), or ``None``.
        root: its persistent directory ``<root>/<uri>`` (created for it).
        state: its volatile directory ``<state>/<uri>`` (created for it).
        meta: fill ``exports``/``capabilities`` here; introspection shows them.
        nursery: a nursery that lives as long as the plugin: start background tasks here. It is
            cancelled after the instance's ``aclose()`` at shutdown.
        log: a structlog logger bound with the plugin's ``type`` and ``id``.
        plugins: the plugins initialised before this one (lookups below).
        server: the daemon's identity (uuid, pid, start time, version).
        config_files: the config files the daemon read, main file first.
        hooks: the pluggy manager of the loaded plugin modules (to call hooks such as
            ``berth_adjust_spec``); ``None`` outside a daemon.
    """

    registration: Registration
    config: Any
    root: Path
    state: Path
    meta: Meta
    nursery: trio.Nursery
    log: FilteringBoundLogger
    plugins: PluginSet
    server: ServerInfo
    config_files: Sequence[Path] = ()
    hooks: pluggy.PluginManager | None = None

    def get_single(self, plugin_type: str) -> Any:
        """See :meth:`PluginSet.get_single`."""
        return self.plugins.get_single(plugin_type)

    def get_by_id(self, plugin_type: str, plugin_id: str) -> Any:
        """See :meth:`PluginSet.get_by_id`."""
        return self.plugins.get_by_id(plugin_type, plugin_id)

    def get_by_type(self, plugin_type: str) -> dict[str, Any]:
        """See :meth:`PluginSet.get_by_type`."""
        return self.plugins.get_by_type(plugin_type)

    def get_ref(self, name: str) -> Any:
        """The instance named by this plugin's :func:`plugin_ref` config key ``name``.

        Raises:
            InvalidArgument: ``name`` is not a plugin_ref key of this plugin's config.
            NotFound, FailedPrecondition: as :meth:`PluginSet.get_by_id`.
        """
        refs = dict(self.registration.plugin_refs())
        if name not in refs:
            raise InvalidArgument(f"{name} is not a plugin reference of {self.registration.uri}")
        return self.plugins.get_by_id(refs[name], getattr(self.config, name))


def describe_error(exc: BaseException) -> str:
    """A one-line description of an init error for logs and introspection."""
    if isinstance(exc, BerthError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
