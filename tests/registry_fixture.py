"""A real OCI registry for tests: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1.

Fixtures (registered in ``tests/conftest.py``):

- ``registry``: an anonymous registry shared by a test module (use repository names unique to the test);
- ``auth_registry``: the same with htpasswd Basic auth (``auth_registry.username``/``.password``);
- ``token_registry``: the same with bearer-token auth, served by a :class:`TokenServer` in a thread
  (``token_registry.token_server.requests`` lists the token requests it answered);
- ``tls_registry``: an anonymous registry serving HTTPS with a certificate from a test CA
  (``tls_registry.ca_path``; point a ``hosts.toml`` ``ca`` at it);
- ``registry_factory``: ``registry_factory.start(auth="none"|"htpasswd"|"token", users=..., tls=...)`` for a fresh
  registry of one's own (stopped at the end of the test);
- ``registry_images``: :data:`STANDARD_IMAGES` (busybox, generated multi-layer images with gzip, zstd and
  plain layers, Docker media types, multi-platform indexes), built by ``tests/imagebuild.py`` and pushed
  with skopeo into ``registry`` under ``<name>:v1``; ``registry_images.ref(name)`` and ``.images[name]``;
- ``faulty_proxy_factory``: ``faulty_proxy_factory.start(upstream_host)`` puts a :class:`FaultyProxy` in
  front of a registry (fail the next N requests with 5xx, reset connections, cut or corrupt blob bodies,
  ignore ``Range``).

Each :class:`RegistryServer` gives ``host`` (``127.0.0.1:PORT``), ``ref(repository, tag)``,
``registry_hosts()`` (a :class:`~berth.plugins.images.hosts.RegistryHosts` with its credentials) and
``skopeo_creds()`` (arguments for skopeo). Storage is a temporary directory; processes are stopped by PID
in finalizers, threads are shut down.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import http.server
import ipaddress
import json
import secrets
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from imagebuild import (
    Image,
    ImageIndex,
    busybox_image,
    generated_image,
    multi_platform_index,
    skopeo_copy,
    skopeo_push,
    write_oci_layout,
)

from berth.plugins.images.hosts import Credentials, RegistryHosts

REGISTRY_BINARY = "docker-registry"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
DEFAULT_USERS = {"alice": "wonderland"}
TOKEN_SERVICE = "berth-test-registry"
TOKEN_ISSUER = "berth-test-token-issuer"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _QuietServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP server that drops its clients' connection errors silently (faults are the point)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def make_tls_files(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for ``hosts`` (IP addresses or DNS names) signed by it, written
    as PEM files under ``directory``: ``(ca.pem, server.pem, server.key)``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "berth test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return paths


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ------------------------------------------------------------------------------------------------
# Bearer tokens


@dataclass
class TokenRequest:
    """One request the token server answered."""

    method: str
    account: str
    service: str
    scopes: list[str]
    granted: list[dict[str, Any]]
    status: int


class TokenServer:
    """A distribution token server (``auth.token``) in a thread: RS256 JWTs signed by a self-signed
    certificate the registry trusts (``rootcertbundle``), sent with the certificate in ``x5c``.

    ``users`` maps user name to password (GET with Basic auth); ``refresh_tokens`` maps an OAuth2 refresh
    token (Docker's ``identitytoken``) to a user (POST ``grant_type=refresh_token``). ``policy(account,
    type, name, actions)`` returns the actions granted; the default grants everything asked to a known
    user and ``pull`` to anonymous callers. Wrong credentials get 401.
    """

    def __init__(self, directory: Path, *, users: Mapping[str, str],
                 refresh_tokens: Mapping[str, str] | None = None,
                 policy: Callable[[str, str, str, list[str]], list[str]] | None = None,
                 expires_in: int = 300) -> None:
        self.users = dict(users)
        self.refresh_tokens = dict(refresh_tokens or {})
        self.policy = policy or self.default_policy
        self.expires_in = expires_in
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "berth test token issuer")])
        self.certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256()))
        self.cert_path = directory / "token-root.pem"
        self.cert_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.port = int(self._server.server_address[1])
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="token-server",
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def default_policy(account: str, type_: str, name: str, actions: list[str]) -> list[str]:
        if type_ != "repository":
            return []
        return list(actions) if account else [a for a in actions if a == "pull"]

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(STOP_TIMEOUT)
        self._server.server_close()

    def issue(self, account: str, scopes: Sequence[str]) -> tuple[str, list[dict[str, Any]]]:
        """A signed token for ``account`` granting what the policy allows of ``scopes``."""
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            type_, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            granted = self.policy(account, type_, name, actions)
            if granted:
                access.append({"type": type_, "name": name, "actions": granted})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self.certificate.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": TOKEN_ISSUER, "sub": account, "aud": TOKEN_SERVICE, "exp": now + self.expires_in,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}", access

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
                pass

            def _answer(self, method: str, account: str | None, service: str, scopes: list[str]) -> None:
                granted: list[dict[str, Any]] = []
                if account is None:
                    status, body = 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
                else:
                    token, granted = server.issue(account, scopes)
                    status, body = 200, {"token": token, "access_token": token, "expires_in": server.expires_in,
                                         "issued_at": datetime.datetime.now(datetime.UTC).isoformat()}
                with server._lock:
                    server.requests.append(TokenRequest(method, account or "", service, scopes, granted, status))
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
                account: str | None = ""
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    account = user if server.users.get(user) == password else None
                self._answer("GET", account, query.get("service", [""])[0], scopes)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                scopes = [s for value in form.get("scope", []) for s in value.split(" ") if s]
                account: str | None = None
                if form.get("grant_type") == ["refresh_token"]:
                    account = server.refresh_tokens.get(form.get("refresh_token", [""])[0])
                elif form.get("grant_type") == ["password"]:
                    user = form.get("username", [""])[0]
                    account = user if server.users.get(user) == form.get("password", [""])[0] else None
                self._answer("POST", account, form.get("service", [""])[0], scopes)

        return Handler


# ------------------------------------------------------------------------------------------------
# The registry


@dataclass
class RegistryServer:
    """One running ``docker-registry``."""

    host: str
    root: Path
    process: subprocess.Popen[bytes]
    auth: str = "none"
    users: dict[str, str] = field(default_factory=dict)
    token_server: TokenServer | None = None
    #: The CA of the registry's certificate when it serves HTTPS (``tls=True``), else ``None``.
    ca_path: Path | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_path else 'http'}://{self.host}"

    @property
    def username(self) -> str:
        return next(iter(self.users), "")

    @property
    def password(self) -> str:
        return self.users.get(self.username, "")

    def ref(self, repository: str, tag: str = "latest") -> str:
        """``127.0.0.1:PORT/<repository>:<tag>`` (``tag`` may be ``@sha256:...`` style: pass it with ``@``)."""
        return f"{self.host}/{repository}{tag if tag.startswith('@') else ':' + tag}"

    def registry_hosts(self, *, username: str | None = None, password: str | None = None,
                       identity_token: str = "") -> RegistryHosts:
        """Hosts with this registry's credentials (its first user unless given; none for ``auth="none"``)."""
        if self.auth == "none" and username is None and not identity_token:
            return RegistryHosts()
        creds = Credentials(username=self.username if username is None else username,
                            password=self.password if password is None else password, identity_token=identity_token)
        return RegistryHosts(credentials={self.host: creds})

    def skopeo_creds(self, prefix: str = "dest") -> list[str]:
        """``--dest-creds user:pass`` (or ``--src-creds``/``--creds`` with ``prefix`` ``src``/``""``) when
        the registry needs them."""
        if self.auth == "none":
            return []
        option = f"--{prefix}-creds" if prefix else "--creds"
        return [option, f"{self.username}:{self.password}"]

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "registry.log").read_text(errors="replace")[-4000:]
        return ""

    def stop(self) -> None:
        """Stop the registry (SIGTERM, then SIGKILL) and its token server; idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        if self.token_server is not None:
            self.token_server.close()


def start_registry(directory: Path, *, auth: str = "none", users: Mapping[str, str] | None = None,
                   refresh_tokens: Mapping[str, str] | None = None,
                   policy: Callable[[str, str, str, list[str]], list[str]] | None = None,
                   tls: bool = False) -> RegistryServer:
    """Start ``docker-registry serve`` on 127.0.0.1 at a free port with storage under ``directory``;
    return once ``/v2/`` answers. ``auth``: ``none``, ``htpasswd`` (Basic, ``users``) or ``token``
    (a :class:`TokenServer` with ``users``, ``refresh_tokens`` and ``policy``). ``tls``: serve HTTPS
    with a certificate for 127.0.0.1 and localhost from a fresh test CA (``server.ca_path``)."""
    if auth not in ("none", "htpasswd", "token"):
        raise ValueError(f"auth must be none, htpasswd or token, not {auth!r}")
    users = dict(DEFAULT_USERS if users is None else users) if auth != "none" else {}
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(directory / "storage")}, "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }
    token_server = None
    ca_path = None
    if tls:
        ca_path, cert_path, key_path = make_tls_files(directory)
        config["http"]["tls"] = {"certificate": str(cert_path), "key": str(key_path)}
    if auth == "htpasswd":
        lines = [subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True,
                                text=True).stdout.strip() for user, password in users.items()]
        (directory / "htpasswd").write_text("\n".join(lines) + "\n")
        config["auth"] = {"htpasswd": {"realm": "berth-test", "path": str(directory / "htpasswd")}}
    elif auth == "token":
        token_server = TokenServer(directory, users=users, refresh_tokens=refresh_tokens, policy=policy)
        config["auth"] = {"token": {"realm": token_server.realm, "service": TOKEN_SERVICE, "issuer": TOKEN_ISSUER,
                                    "rootcertbundle": str(token_server.cert_path)}}
    # JSON is YAML: no YAML library needed.
    (directory / "config.yml").write_text(json.dumps(config, indent=2))
    with open(directory / "registry.log", "wb") as log_file:
        process = subprocess.Popen([REGISTRY_BINARY, "serve", str(directory / "config.yml")],
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    server = RegistryServer(host=f"127.0.0.1:{port}", root=directory, process=process, auth=auth, users=users,
                            token_server=token_server, ca_path=ca_path)
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: RegistryServer) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    context = ssl.create_default_context(cafile=str(server.ca_path)) if server.ca_path else None
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {server.process.returncode}:\n{server.log_text()}")
        try:
            with urllib.request.urlopen(f"{server.url}/v2/", timeout=2, context=context):
                return
        except urllib.error.HTTPError as err:
            if err.code == 401:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"docker-registry not ready after {READY_TIMEOUT}s:\n{server.log_text()}")
        time.sleep(0.05)


class RegistryFactory:
    """Starts registries under one directory and stops every one of them at :meth:`close`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[RegistryServer] = []

    def start(self, **kwargs: Any) -> RegistryServer:
        """See :func:`start_registry` for the arguments."""
        server = start_registry(self.directory / f"registry-{len(self.servers)}", **kwargs)
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()


# ------------------------------------------------------------------------------------------------
# A faulty proxy


class FaultyProxy:
    """An HTTP/1.1 proxy in a thread, in front of ``upstream`` (``host:port``), that misbehaves on request.

    Set the fault attributes (thread-safe enough: plain assignments read per request):
    ``fail_next`` answer the next N requests with ``fail_status`` (503), only those whose method is in
    ``fail_methods`` when it is not empty; ``reset_next`` close the
    connection without an answer for the next N requests; ``cut_blobs`` cut the next N blob bodies (GET
    ``/blobs/``) after ``cut_after`` bytes (the headers promise the full length, then the connection
    closes); ``corrupt_blobs`` / ``corrupt_manifests`` flip one byte in every blob / manifest body (GET);
    ``override_headers`` replace response headers (``{"content-type": ...}``); ``ignore_range`` serve blobs whole,
    ignoring ``Range``; ``drop_headers`` leave these (lower-case) response headers out (e.g.
    ``docker-content-digest``); ``stall_blob`` (a digest): send ``stall_after`` bytes of that blob, then hold
    the connection until ``release`` is set (a download caught mid-way, for kill-and-resume tests).
    ``requests`` logs ``(method, path, range)`` of everything received.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fail_next = 0
        self.fail_status = 503
        self.fail_methods: set[str] = set()
        self.reset_next = 0
        self.cut_blobs = 0
        self.cut_after = 0
        self.corrupt_blobs = False
        self.corrupt_manifests = False
        self.override_headers: dict[str, str] = {}
        self.ignore_range = False
        self.drop_headers: set[str] = set()
        self.stall_blob = ""
        self.stall_after = 0
        self.release = threading.Event()
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="faulty-proxy",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.release.set()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(STOP_TIMEOUT)
        self._server.server_close()

    def _take(self, name: str) -> bool:
        with self._lock:
            value = getattr(self, name)
            if value > 0:
                setattr(self, name, value - 1)
                return True
            return False

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
                pass

            def _handle(self) -> None:
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, self.headers.get("Range", "")))
                length = int(self.headers.get("Content-Length", "0") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy._take("reset_next"):
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if (not proxy.fail_methods or self.command in proxy.fail_methods) and proxy._take("fail_next"):
                    payload = b'{"errors":[{"code":"UNAVAILABLE","message":"injected failure"}]}'
                    self.send_response(proxy.fail_status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                is_blob = self.command == "GET" and "/blobs/" in self.path and "/uploads/" not in self.path
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "proxy-connection")}
                if is_blob and proxy.ignore_range:
                    headers.pop("Range", None)
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                    response_headers = response.getheaders()
                    status = response.status
                finally:
                    upstream.close()
                is_manifest = self.command == "GET" and "/manifests/" in self.path
                if status in (200, 206) and payload and (
                        (is_blob and proxy.corrupt_blobs) or (is_manifest and proxy.corrupt_manifests)):
                    payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])
                cut = is_blob and status in (200, 206) and len(payload) > proxy.cut_after and proxy._take("cut_blobs")
                self.send_response(status)
                for key, value in response_headers:
                    if key.lower() in ("connection", "transfer-encoding", *proxy.drop_headers, *proxy.override_headers):
                        continue
                    if key.lower() != "content-length" or self.command == "HEAD":
                        self.send_header(key, value)
                for key, value in proxy.override_headers.items():
                    self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if is_blob and proxy.stall_blob and self.path.endswith(proxy.stall_blob) and status in (200, 206):
                    self.wfile.write(payload[: proxy.stall_after])
                    self.wfile.flush()
                    proxy.release.wait(STOP_TIMEOUT * 6)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if cut:
                    self.wfile.write(payload[: proxy.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(payload)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

        return Handler


class FaultyProxyFactory:
    """Starts :class:`FaultyProxy` instances and closes them all at :meth:`close`."""

    def __init__(self) -> None:
        self.proxies: list[FaultyProxy] = []

    def start(self, upstream: str) -> FaultyProxy:
        proxy = FaultyProxy(upstream)
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()


# ------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[RegistryFactory]:
    factory = RegistryFactory(tmp_path / "registries")
    try:
        yield factory
    finally:
        factory.close()


def _module_registry(tmp_path_factory: pytest.TempPathFactory, **kwargs: Any) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path_factory.mktemp("registry"), **kwargs)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    yield from _module_registry(tmp_path_factory)


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    yield from _module_registry(tmp_path_factory, auth="htpasswd")


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    yield from _module_registry(tmp_path_factory, auth="token", refresh_tokens={"refresh-alice": "alice"})


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    yield from _module_registry(tmp_path_factory, tls=True)


def standard_images() -> dict[str, Image | ImageIndex]:
    """The images ``registry_images`` pushes, by repository name (reproducible: same digests every run)."""
    return {
        "busybox": busybox_image(),
        "busybox-zstd": busybox_image("zstd"),
        "generated": generated_image(seed=10, layers=4),
        "zstd": generated_image(seed=11, layers=3, compression="zstd"),
        "plain": generated_image(seed=12, layers=2, compression=""),
        "docker": generated_image(seed=13, layers=2, docker=True),
        "multi": multi_platform_index(seed=14),
        "multi-docker": multi_platform_index(seed=15, docker=True),
    }


@dataclass
class PushedImages:
    """Images pushed into ``registry`` as ``<name>:v1``."""

    registry: RegistryServer
    images: dict[str, Image | ImageIndex]

    def ref(self, name: str, tag: str = "v1") -> str:
        return self.registry.ref(name, tag)


def push_images(registry: RegistryServer, images: Mapping[str, Image | ImageIndex], workdir: Path) -> PushedImages:
    """Push ``images`` into ``registry`` as ``<name>:v1`` with skopeo (OCI media types from an OCI layout,
    Docker ones through skopeo's ``dir:`` format), digests preserved."""
    oci = {name: image for name, image in images.items() if not image.descriptor.media_type.startswith(
        "application/vnd.docker")}
    layout = write_oci_layout(workdir / "oci", oci)
    for name, image in images.items():
        if name in oci:
            skopeo_copy(layout, name, registry.ref(name, "v1"), creds=registry.skopeo_creds())
        else:
            skopeo_push(image, registry.ref(name, "v1"), workdir, creds=registry.skopeo_creds())
    return PushedImages(registry, dict(images))


@pytest.fixture(scope="module")
def registry_images(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> PushedImages:
    return push_images(registry, standard_images(), tmp_path_factory.mktemp("images"))


@pytest.fixture
def faulty_proxy_factory() -> Iterator[FaultyProxyFactory]:
    factory = FaultyProxyFactory()
    try:
        yield factory
    finally:
        factory.close()

