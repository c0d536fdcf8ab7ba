"""Per-registry settings (containerd's ``hosts.toml``) and credentials (Docker's ``config.json``).

**hosts.toml.** ``<config_path>/<host[:port]>/hosts.toml`` (else ``<config_path>/_default/hosts.toml``)
says where and how to reach a registry; ``docker.io``'s directory is ``docker.io``::

    server = "https://registry.example.com"      # the upstream; default https://<host>
    capabilities = ["pull", "resolve", "push"]   # of the server (default: all three)
    skip_verify = false                          # TLS certificate checks
    ca = "ca.pem"                                # extra CA bundle(s), relative to this file's directory
    client = [["client.pem", "client.key"]]      # client certificate(s) and keys

    [host."http://mirror.local:5000"]            # mirrors, tried first, in order
    capabilities = ["pull", "resolve"]
    override_path = false                        # true: the URL's path is the API root (no /v2 added)
    [host."http://mirror.local:5000".header]
    x-mirror = "berth"

Plain HTTP is used only for an ``http://`` URL written in such a file, or for a loopback registry
(``localhost``, ``127.0.0.1``, ``::1``) when the caller passes ``plain_http=True``; ``plain_http`` for any
other host is refused. Unknown keys and mistyped values are errors naming the file and the key.

**config.json.** Docker's credential file: ``auths.<host>`` with ``auth`` (base64 ``user:password``) or
``username``/``password``, or ``identitytoken`` (an OAuth2 refresh token) or ``registrytoken`` (a bearer
token used as is). Keys may carry a scheme and path (``https://index.docker.io/v1/`` is docker.io).
Credential helpers (``credsStore``, ``credHelpers``) are not run.
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from berth.core.errdefs import InvalidArgument
from berth.plugins.images.reference import DOCKER_DOMAIN, DOCKER_REGISTRY_HOST, host_is_loopback

__all__ = [
    "CAPABILITIES",
    "Credentials",
    "RegistryHost",
    "RegistryHosts",
    "load_docker_config",
    "load_hosts_file",
]

#: What a host may be used for: ``resolve`` (tag -> digest), ``pull`` (fetch by digest), ``push``.
CAPABILITIES = frozenset({"pull", "resolve", "push"})
_HOST_KEYS = frozenset({"capabilities", "skip_verify", "ca", "client", "header", "override_path"})
_FILE_KEYS = _HOST_KEYS | {"server", "host"}
_DOCKER_ALIASES = frozenset({DOCKER_DOMAIN, "index.docker.io", DOCKER_REGISTRY_HOST})


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryHost:
    """One endpoint a registry can be reached at (a mirror or the server itself).

    ``url`` is the API root (``https://host[:port]/v2``); requests go to ``url + "/<repo>/manifests/..."``.
    """

    scheme: str
    host: str
    path: str = "/v2"
    capabilities: frozenset[str] = CAPABILITIES
    skip_verify: bool = False
    ca: tuple[Path, ...] = ()
    client_certs: tuple[tuple[Path, Path | None], ...] = ()
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"

    def ssl_context(self) -> ssl.SSLContext | bool:
        """What ``httpx`` takes as ``verify``: ``False`` for ``skip_verify``, else a context with the
        system CAs plus ``ca`` and the client certificates. Blocking (reads files): call it in a thread.

        Raises:
            InvalidArgument: a CA or client certificate file cannot be loaded.
        """
        if self.skip_verify:
            return False
        context = ssl.create_default_context()
        try:
            for ca in self.ca:
                context.load_verify_locations(cafile=str(ca))
            for cert, key in self.client_certs:
                context.load_cert_chain(str(cert), str(key) if key else None)
        except (OSError, ssl.SSLError) as err:
            raise InvalidArgument(f"registry host {self.host}: cannot load TLS files: {err}") from None
        return context


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """Credentials for one registry. ``identity_token`` is an OAuth2 refresh token; ``registry_token`` a
    bearer token sent as is."""

    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, ...)"


class RegistryHosts:
    """Where each registry is and what credentials it takes.

    ``config_path`` is the ``hosts.toml`` directory (``None`` or missing: defaults for every host);
    ``credentials`` maps a registry host (``host[:port]``, ``docker.io`` for Docker Hub) to its credentials.
    """

    def __init__(self, config_path: Path | None = None,
                 credentials: Mapping[str, Credentials] | None = None) -> None:
        self.config_path = config_path
        self._credentials = {_normalize_auth_key(key): value for key, value in (credentials or {}).items()}

    @classmethod
    def load(cls, config_path: Path | str | None, docker_config: Path | str | None = None) -> RegistryHosts:
        """Hosts from ``config_path`` (read at each :meth:`hosts` call) and credentials read now from
        ``docker_config`` (a missing file means none). Blocking (reads a file).

        Raises:
            InvalidArgument: ``docker_config`` is not a valid Docker config file (naming it).
        """
        credentials = load_docker_config(Path(docker_config)) if docker_config else {}
        return cls(Path(config_path) if config_path else None, credentials)

    def hosts(self, domain: str, *, plain_http: bool = False) -> list[RegistryHost]:
        """The endpoints for registry ``domain`` (a reference's domain, e.g. ``docker.io`` or
        ``127.0.0.1:5000``), mirrors first, the server last. Blocking (reads ``hosts.toml``): call it in
        a thread from async code.

        Raises:
            InvalidArgument: ``plain_http`` for a host that is not loopback, or a malformed ``hosts.toml``
                (naming the file and key).
        """
        if plain_http and not host_is_loopback(domain):
            raise InvalidArgument(f"plain HTTP is only allowed for a loopback registry, not {domain}: configure "
                                  f'server = "http://{domain}" in its hosts.toml instead')
        default_host = DOCKER_REGISTRY_HOST if domain == DOCKER_DOMAIN else domain
        default_server = RegistryHost(scheme="http" if plain_http else "https", host=default_host)
        if self.config_path is None:
            return [default_server]
        for directory in (domain, "_default"):
            path = self.config_path / directory / "hosts.toml"
            if path.is_file():
                return load_hosts_file(path, default_server)
        return [default_server]

    def credentials(self, host: str) -> Credentials | None:
        """The credentials for registry ``host`` (an endpoint host or a reference's domain), if any."""
        key = _normalize_auth_key(host)
        found = self._credentials.get(key)
        if found is None and key in _DOCKER_ALIASES:
            found = next((self._credentials[alias] for alias in _DOCKER_ALIASES if alias in self._credentials), None)
        return found


def load_hosts_file(path: Path, default_server: RegistryHost) -> list[RegistryHost]:
    """Parse one ``hosts.toml``: its mirrors in file order, then the server (``default_server`` unless the
    file names one). Blocking.

    Raises:
        InvalidArgument: unreadable or malformed TOML, an unknown key, a wrong type, a bad URL or
            capability, naming the file and the key.
    """
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise InvalidArgument(f"{path}: cannot read hosts file: {err}") from None
    _check_keys(document, _FILE_KEYS, path, "")
    hosts_table = document.get("host", {})
    if not isinstance(hosts_table, dict):
        raise InvalidArgument(f"{path}: 'host' must be a table of [host.\"<url>\"] tables")
    result = []
    for url, table in hosts_table.items():
        if not isinstance(table, dict):
            raise InvalidArgument(f"{path}: host.{url!r} must be a table")
        _check_keys(table, _HOST_KEYS, path, f"host.{url!r}.")
        result.append(_host_from(url, table, path, f"host.{url!r}.", default_server))
    server = document.get("server")
    if server is None:
        server_host = _with_settings(default_server, document, path, "")
    else:
        if not isinstance(server, str):
            raise InvalidArgument(f"{path}: 'server' must be a URL string")
        server_host = _host_from(server, document, path, "", default_server)
    result.append(server_host)
    return result


def _check_keys(table: Mapping[str, Any], allowed: frozenset[str], path: Path, prefix: str) -> None:
    for key in table:
        if key not in allowed:
            raise InvalidArgument(f"{path}: unknown key {prefix}{key!r} (known: {', '.join(sorted(allowed))})")


def _host_from(url: str, table: Mapping[str, Any], path: Path, prefix: str,
               default_server: RegistryHost) -> RegistryHost:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise InvalidArgument(f"{path}: {prefix or 'server '}{url!r} is not an http(s)://host[:port][/path] URL")
    override_path = table.get("override_path", False)
    if not isinstance(override_path, bool):
        raise InvalidArgument(f"{path}: {prefix}override_path must be a boolean")
    api_path = parts.path.rstrip("/")
    if not override_path and not api_path.endswith("/v2"):
        api_path += "/v2"
    base = RegistryHost(scheme=parts.scheme, host=parts.netloc, path=api_path,
                        capabilities=default_server.capabilities)
    return _with_settings(base, table, path, prefix)


def _with_settings(base: RegistryHost, table: Mapping[str, Any], path: Path, prefix: str) -> RegistryHost:
    capabilities = table.get("capabilities", sorted(CAPABILITIES))
    if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
        raise InvalidArgument(f"{path}: {prefix}capabilities must be a list of strings")
    unknown = set(capabilities) - CAPABILITIES
    if unknown:
        raise InvalidArgument(f"{path}: {prefix}capabilities: unknown {sorted(unknown)} "
                              f"(known: {', '.join(sorted(CAPABILITIES))})")
    skip_verify = table.get("skip_verify", False)
    if not isinstance(skip_verify, bool):
        raise InvalidArgument(f"{path}: {prefix}skip_verify must be a boolean")
    ca = table.get("ca", [])
    ca_list = [ca] if isinstance(ca, str) else ca
    if not isinstance(ca_list, list) or not all(isinstance(c, str) for c in ca_list):
        raise InvalidArgument(f"{path}: {prefix}ca must be a path or a list of paths")
    return RegistryHost(scheme=base.scheme, host=base.host, path=base.path, capabilities=frozenset(capabilities),
                        skip_verify=skip_verify, ca=tuple(path.parent / c for c in ca_list),
                        client_certs=_client_certs(table.get("client", []), path, prefix),
                        headers=_headers(table.get("header", {}), path, prefix))


def _client_certs(value: Any, path: Path, prefix: str) -> tuple[tuple[Path, Path | None], ...]:
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list):
        raise InvalidArgument(f"{path}: {prefix}client must be a path, or a list of paths or [cert, key] pairs")
    certs: list[tuple[Path, Path | None]] = []
    for entry in entries:
        if isinstance(entry, str):
            certs.append((path.parent / entry, None))
        elif isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry):
            certs.append((path.parent / entry[0], path.parent / entry[1]))
        else:
            raise InvalidArgument(f"{path}: {prefix}client entry {entry!r} must be a path or [cert, key]")
    return tuple(certs)


def _headers(value: Any, path: Path, prefix: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{path}: {prefix}header must be a table")
    headers: dict[str, tuple[str, ...]] = {}
    for name, item in value.items():
        items = [item] if isinstance(item, str) else item
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise InvalidArgument(f"{path}: {prefix}header.{name} must be a string or a list of strings")
        headers[name] = tuple(items)
    return headers


def load_docker_config(path: Path) -> dict[str, Credentials]:
    """The ``auths`` of a Docker ``config.json``, keyed by registry host; ``{}`` when the file is missing.
    Blocking.

    Raises:
        InvalidArgument: unreadable JSON or a malformed ``auths`` entry, naming the file and the host.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"{path}: cannot read Docker config: {err}") from None
    try:
        document = json.loads(text)
    except ValueError as err:
        raise InvalidArgument(f"{path}: not valid JSON: {err}") from None
    if not isinstance(document, dict):
        raise InvalidArgument(f"{path}: a Docker config must be a JSON object")
    auths = document.get("auths", {})
    if auths is None:
        auths = {}
    if not isinstance(auths, dict):
        raise InvalidArgument(f"{path}: 'auths' must be an object")
    credentials: dict[str, Credentials] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
            raise InvalidArgument(f"{path}: auths.{key} must be an object of strings")
        username, password = entry.get("username", ""), entry.get("password", "")
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidArgument(f"{path}: auths.{key}.auth is not base64 of user:password") from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise InvalidArgument(f"{path}: auths.{key}.auth must decode to user:password")
        credentials[_normalize_auth_key(key)] = Credentials(
            username=username, password=password, identity_token=entry.get("identitytoken", ""),
            registry_token=entry.get("registrytoken", ""))
    return credentials


def _normalize_auth_key(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``; ``Host:5000`` -> ``host:5000``."""
    if "://" in key:
        key = urlsplit(key).netloc
    return key.split("/", 1)[0].lower()
