"""berthd's config file: TOML, ``version = 1``, with imports and a typed table per plugin.

Loading checks everything before the daemon starts: an unknown key, a wrong type, a bad value, a
version newer than this berthd, a missing import, a table for a plugin that is not registered, a
``disabled_plugins`` entry that is not a URI, a ``plugin_ref`` key naming a plugin that is missing or
disabled. Each is a :class:`ConfigError` whose message names the file, the table and the key.

Imports (``imports = ["conf.d/*.toml"]``, relative to the file that lists them, globs allowed,
imports of imports followed, each file read once) are merged as containerd merges them: a scalar
from an import replaces the earlier value unless it is empty (``""``, ``0``, ``false``); arrays are
appended without duplicates; a nested table (``[rpc]``, ``[log]``) is merged key by key; a
``[plugins."<uri>"]`` table from an import replaces the earlier table for that plugin whole.
"""

from __future__ import annotations

import glob
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from berth.core.decode import DecodeError, Duration, decode, encode
from berth.core.errdefs import InvalidArgument
from berth.core.plugin.registration import Registration
from berth.core.plugin.types import valid_type
from berth.core.rpc.protocol import DEFAULT_MAX_MESSAGE_SIZE

__all__ = [
    "CONFIG_VERSION",
    "DEFAULT_CONFIG_PATH",
    "Config",
    "ConfigError",
    "LoadedConfig",
    "LogConfig",
    "RPCConfig",
    "TimeoutsConfig",
    "default_config_document",
    "load_config",
]

CONFIG_VERSION = 1
DEFAULT_CONFIG_PATH = Path("/etc/berth/config.toml")
COMMAND_LINE = "command line"


@dataclass(kw_only=True)
class RPCConfig:
    """``[rpc]``: the msgpack-RPC unix socket."""

    address: str = "/run/berth/berth.sock"
    #: Group owning the socket (mode 0660); its members may connect besides root and berthd's own uid.
    gid: int = 0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: Requests one connection may have in flight; past it the server stops reading that connection.
    max_concurrent_requests: int = 128

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("address must not be empty")
        if not 4096 <= self.max_message_size <= 1 << 30:
            raise ValueError(f"max_message_size must be between 4096 and 1 GiB, got {self.max_message_size}")
        if self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be at least 1")
        if self.gid < 0:
            raise ValueError("gid must not be negative")


@dataclass(kw_only=True)
class LogConfig:
    """``[log]``."""

    level: Literal["debug", "info", "warn", "error"] = "info"
    format: Literal["console", "json"] = "console"


@dataclass(kw_only=True)
class TimeoutsConfig:
    """``[timeouts]``."""

    #: How long one plugin's close may take at shutdown before berthd moves on.
    plugin_close: Duration = Duration(5.0)
    #: How long a graceful shutdown waits for in-flight requests before cancelling them.
    shutdown_grace: Duration = Duration(5.0)


@dataclass(kw_only=True)
class Config:
    """The whole config file. ``plugins`` holds each plugin's raw table until it is decoded."""

    version: int = CONFIG_VERSION
    root: str = "/var/lib/berth"
    state: str = "/run/berth"
    disabled_plugins: list[str] = field(default_factory=list)
    required_plugins: list[str] = field(default_factory=list)
    #: When true, any plugin that fails to load (status ``error``) stops the daemon, not only required ones.
    strict_plugins: bool = False
    imports: list[str] = field(default_factory=list)
    rpc: RPCConfig = field(default_factory=RPCConfig)
    log: LogConfig = field(default_factory=LogConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError(f"version {self.version} is not a berth config version (use {CONFIG_VERSION})")
        if self.version > CONFIG_VERSION:
            raise ValueError(f"version {self.version} is newer than this berthd supports ({CONFIG_VERSION})")
        for key in ("root", "state"):
            if not os.path.isabs(getattr(self, key)):
                raise ValueError(f"{key} must be an absolute path, got {getattr(self, key)!r}")


class ConfigError(InvalidArgument):
    """The config is wrong; the message names the file, the table and the key."""

    def __init__(self, source: Path | str, path: Sequence[str], message: str) -> None:
        self.source = str(source)
        self.path = tuple(path)
        super().__init__(f"config {self.source}: {_where(self.path)}{message}")


def _where(path: Sequence[str]) -> str:
    """``("plugins", uri, "key")`` → ``[plugins."uri"] key: ``; ``("rpc", "gid")`` → ``[rpc] gid: ``."""
    if not path:
        return ""
    if path[0] == "plugins" and len(path) >= 2:
        table, rest = f'[plugins."{path[1]}"]', path[2:]
    elif path[0] in ("rpc", "log", "timeouts"):
        table, rest = f"[{path[0]}]", path[1:]
    else:
        table, rest = "", path
    key = ".".join(rest)
    return f"{table} {key}: ".lstrip() if key else f"{table}: "


@dataclass(kw_only=True)
class LoadedConfig:
    """The effective config: merged, overridden and decoded, plugin tables included."""

    config: Config
    plugin_configs: dict[str, Any]
    files: list[Path]
    sources: dict[tuple[str, ...], str]

    def source_of(self, *path: str) -> str:
        """The file (or "command line") that set ``path``, or the main file / "defaults"."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.sources:
                return self.sources[path[:end]]
        return str(self.files[0]) if self.files else "defaults"

    def error(self, path: Sequence[str], message: str) -> ConfigError:
        return ConfigError(self.source_of(*path), path, message)

    def effective_document(self) -> dict[str, Any]:
        """The effective config as TOML-ready data, every plugin's table filled in."""
        document: dict[str, Any] = encode(self.config)
        document["plugins"] = {uri: encode(cfg) for uri, cfg in self.plugin_configs.items()}
        return document


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, (), "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(path, (), f"cannot read: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, (), f"invalid TOML: {err}") from None


def _resolve_imports(path: Path, imports: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for pattern in imports:
        full = pattern if os.path.isabs(pattern) else str(path.parent / pattern)
        if glob.has_magic(full):
            out.extend(Path(p) for p in sorted(glob.glob(full)))
        else:
            out.append(Path(full))
    return out


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value is False or (type(value) is int and value == 0)


def _merge(into: dict[str, Any], raw: Mapping[str, Any], source: str,
           sources: dict[tuple[str, ...], str]) -> None:
    for key, value in raw.items():
        if key == "plugins":
            for uri, table in value.items():
                into.setdefault("plugins", {})[uri] = table
                sources[("plugins", uri)] = source
        elif isinstance(value, list):
            merged = list(into.get(key, []))
            merged.extend(item for item in value if item not in merged)
            into[key] = merged
            sources[(key,)] = source
        elif isinstance(value, dict):
            table = into.setdefault(key, {})
            for sub, item in value.items():
                if sub not in table or not _is_empty(item):
                    table[sub] = item
                    sources[(key, sub)] = source
        elif key not in into or not _is_empty(value):
            into[key] = value
            sources[(key,)] = source


def _check_file(path: Path, raw: dict[str, Any], registrations: Mapping[str, Registration],
                main_version: int | None) -> Config:
    try:
        parsed = decode(Config, raw)
    except DecodeError as err:
        raise ConfigError(path, err.path, err.message) from None
    if main_version is not None and parsed.version > main_version:
        raise ConfigError(path, ("version",), f"an imported file may not have a newer version "
                                              f"({parsed.version}) than the main file ({main_version})")
    for uri, table in parsed.plugins.items():
        registration = registrations.get(uri)
        if registration is None:
            known = ", ".join(sorted(u for u, r in registrations.items() if r.config is not None))
            raise ConfigError(path, ("plugins", uri), f"no such plugin is registered (plugins with "
                                                      f"config: {known or 'none'})")
        if registration.config is None:
            if table:
                raise ConfigError(path, ("plugins", uri), "this plugin takes no config")
            continue
        try:
            decode(registration.config, table, ("plugins", uri))
        except DecodeError as err:
            raise ConfigError(path, err.path, err.message) from None
    return parsed


def _is_uri(value: str) -> bool:
    kind, _, ident = value.rpartition(".")
    return bool(kind and ident) and valid_type(kind)


def load_config(
    path: Path | None,
    registrations: Sequence[Registration],
    *,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> LoadedConfig:
    """Read, merge, check and decode the config.

    Args:
        path: the main file; ``None`` reads :data:`DEFAULT_CONFIG_PATH` if it exists, else uses the
            defaults. An explicit path that does not exist is an error.
        registrations: every registered plugin (their config classes decode the plugin tables).
        overrides: values from the command line, by path, e.g. ``{("rpc", "address"): "/tmp/s"}``.

    Raises:
        ConfigError: anything wrong, with the file, table and key.
    """
    by_uri = {r.uri: r for r in registrations}
    merged: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    files: list[Path] = []
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        pending = [path]
        seen: set[Path] = set()
        main_version: int | None = None
        while pending:
            current = pending.pop(0)
            real = current.resolve()
            if real in seen:
                continue
            seen.add(real)
            raw = _read(current)
            parsed = _check_file(current, raw, by_uri, main_version)
            if main_version is None:
                main_version = parsed.version
            files.append(current)
            _merge(merged, raw, str(current), sources)
            pending.extend(_resolve_imports(current, parsed.imports))

    for key_path, value in (overrides or {}).items():
        table = merged
        for part in key_path[:-1]:
            table = table.setdefault(part, {})
        table[key_path[-1]] = value
        sources[tuple(key_path)] = COMMAND_LINE
    try:
        config = decode(Config, merged)
    except DecodeError as err:
        source = next((sources[err.path[:n]] for n in range(len(err.path), 0, -1) if err.path[:n] in sources),
                      str(files[0]) if files else "defaults")
        raise ConfigError(source, err.path, err.message) from None

    loaded = LoadedConfig(config=config, plugin_configs={}, files=files, sources=sources)
    for key in ("disabled_plugins", "required_plugins"):
        for entry in getattr(config, key):
            if not _is_uri(entry):
                raise loaded.error((key,), f"{entry!r} is not a plugin URI like io.berth.snapshotter.v1.btrfs")
    disabled = set(config.disabled_plugins)
    for registration in registrations:
        if registration.config is None:
            continue
        table = config.plugins.get(registration.uri, {})
        loaded.plugin_configs[registration.uri] = decode(registration.config, table, ("plugins", registration.uri))
    for registration in registrations:
        if registration.uri in disabled:
            continue
        for name, ref_type in registration.plugin_refs():
            value = getattr(loaded.plugin_configs[registration.uri], name)
            if not value:
                continue
            target = f"{ref_type}.{value}"
            where = ("plugins", registration.uri, name)
            if target not in by_uri:
                known = ", ".join(r.id for r in registrations if r.type == ref_type) or "none"
                raise loaded.error(where, f"names {ref_type} plugin {value!r}, which is not registered "
                                          f"(registered: {known})")
            if target in disabled:
                raise loaded.error(where, f"names {ref_type} plugin {value!r}, which is in disabled_plugins")
    return loaded


def default_config_document(registrations: Sequence[Registration]) -> dict[str, Any]:
    """The full default config as TOML-ready data, with every plugin's table."""
    document: dict[str, Any] = encode(Config())
    document["plugins"] = {r.uri: encode(r.config()) for r in registrations if r.config is not None}
    return document
