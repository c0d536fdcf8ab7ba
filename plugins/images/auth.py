"""Registry authentication: ``WWW-Authenticate`` challenges, Basic credentials and bearer tokens.

One :class:`Authorizer` per registry endpoint remembers the challenge it last saw, so later requests carry
their ``Authorization`` up front (no 401 round trip per request, and a streamed upload body is never sent
twice). Three flows, as the distribution token spec has them:

- **anonymous**: no challenge, nothing sent;
- **Basic**: ``Authorization: Basic base64(user:password)`` from the host's :class:`Credentials`;
- **Bearer**: a token from the challenge's ``realm`` for ``service`` and the request's ``scope``\\ s
  (``repository:<name>:pull[,push]``). A GET with Basic credentials (or none: an anonymous token), or,
  with an ``identitytoken``, an OAuth2 POST with ``grant_type=refresh_token``; a ``registrytoken`` is used
  as the bearer token directly. Tokens are cached per set of scopes until shortly before they expire.

Credentials are sent to a token realm only over HTTPS, or over HTTP to a loopback realm or when the
registry itself was configured as plain HTTP.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import httpx
import structlog
import trio

from berth.core.errdefs import Unauthenticated, Unavailable
from berth.plugins.images.hosts import Credentials
from berth.plugins.images.reference import host_is_loopback

__all__ = ["Authorizer", "Challenge", "merge_scopes", "parse_challenges"]

log = structlog.get_logger("berth.images.auth")

#: A token is renewed this many seconds before it expires.
_EXPIRY_MARGIN = 5.0
#: Lifetime assumed for a token whose response states none (the token spec's default).
_DEFAULT_EXPIRES_IN = 60.0
#: Token responses larger than this are refused.
_MAX_TOKEN_RESPONSE = 1 << 20
_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s*")
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: ``scheme`` lower-cased (``basic``, ``bearer``) and its params."""

    scheme: str
    params: Mapping[str, str]


def merge_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Scopes with the actions of one resource merged and sorted: ``repository:a:pull`` and
    ``repository:a:push`` give ``repository:a:pull,push``. Malformed scopes are kept as they are."""
    actions: dict[str, set[str]] = {}
    other: set[str] = set()
    for scope in scopes:
        resource, sep, names = scope.rpartition(":")
        if not sep or ":" not in resource:
            other.add(scope)
            continue
        actions.setdefault(resource, set()).update(a for a in names.split(",") if a)
    merged = {f"{resource}:{','.join(sorted(names))}" for resource, names in actions.items()}
    return tuple(sorted(merged | other))


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value, e.g. ``Bearer realm="https://auth/token",service="reg"``.
    Malformed parts are ignored (the caller then finds no usable challenge)."""
    challenges: list[Challenge] = []
    position = 0
    while position < len(header):
        match = _SCHEME.match(header, position)
        if match is None:
            break
        scheme, position = match.group(1).lower(), match.end()
        params: dict[str, str] = {}
        while position < len(header):
            param = _PARAM.match(header, position)
            if param is None or (param.group(2) is None and param.group(3) is None):
                break
            value = param.group(2) if param.group(2) is not None else param.group(3)
            params[param.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            position = param.end()
        challenges.append(Challenge(scheme, params))
        if position < len(header) and header[position] == ",":
            position += 1
    return challenges


class Authorizer:
    """Authorization for one registry endpoint (``host``), shared by every request to it.

    ``client`` sends token requests (the host's own client, so its TLS settings apply; the realm may be on
    another host);
    ``plain_http_ok`` says the registry was configured as plain HTTP, so an ``http://`` realm is acceptable.
    """

    def __init__(self, host: str, credentials: Credentials | None, client: httpx.AsyncClient, *,
                 plain_http_ok: bool = False) -> None:
        self.host = host
        self.credentials = credentials
        self.client = client
        self.plain_http_ok = plain_http_ok
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        self._locks: dict[tuple[str, ...], trio.Lock] = {}
        #: Token requests made (for tests and logs).
        self.token_requests = 0

    async def authorization(self, scopes: Sequence[str]) -> str | None:
        """The ``Authorization`` header value for a request needing ``scopes``, or ``None`` (anonymous, or
        no challenge seen yet). May fetch a token.

        Raises:
            Unauthenticated: the token server refused the credentials.
            Unavailable: the token server could not be reached or answered garbage.
        """
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic()
        return f"Bearer {await self._token(challenge, scopes)}"

    async def on_unauthorized(self, response: httpx.Response, scopes: Sequence[str], *,
                              sent: str | None) -> list[str] | None:
        """Learn from a 401. Returns the scopes to retry the request with (``scopes`` plus any the
        challenge names, e.g. the source repository of a mount), or ``None`` when retrying cannot help.
        Callers retry a request at most once.

        ``sent`` is the ``Authorization`` value the refused request carried: a Basic challenge after Basic
        credentials were sent is final; a refused bearer token is dropped from the cache.
        """
        usable = [c for c in parse_challenges(response.headers.get("www-authenticate", ""))
                  if (c.scheme == "bearer" and c.params.get("realm")) or c.scheme == "basic"]
        if not usable:
            return None
        challenge = usable[0]
        if challenge.scheme == "basic":
            if self.credentials is None or not self.credentials.username or (sent or "").startswith("Basic "):
                return None
            self._challenge = challenge
            return list(scopes)
        # Remember where tokens come from; the scope is this request's own.
        self._challenge = Challenge("bearer", {k: v for k, v in challenge.params.items() if k == "realm"
                                               or k == "service"})
        wanted = list(merge_scopes([*scopes, *challenge.params.get("scope", "").split()]))
        if sent is not None and sent.startswith("Bearer "):
            # The token was refused (expired, or short of a scope): forget it.
            self._tokens.pop(tuple(wanted), None)
        return wanted

    def _basic(self) -> str | None:
        if self.credentials is None or not self.credentials.username:
            return None
        raw = f"{self.credentials.username}:{self.credentials.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    async def _token(self, challenge: Challenge, scopes: Sequence[str]) -> str:
        if self.credentials is not None and self.credentials.registry_token:
            return self.credentials.registry_token
        key = merge_scopes(scopes)
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and cached[1] > trio.current_time():
                return cached[0]
            token, expires_in = await self._fetch_token(challenge, key)
            self._tokens[key] = (token, trio.current_time() + max(expires_in - _EXPIRY_MARGIN, 1.0))
            return token

    async def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> tuple[str, float]:
        realm = challenge.params["realm"]
        realm_url = httpx.URL(realm)
        if realm_url.scheme not in ("http", "https"):
            raise Unauthenticated(f"registry {self.host}: token realm {realm!r} is not an http(s) URL")
        if realm_url.scheme == "http" and not self.plain_http_ok and not host_is_loopback(realm_url.netloc.decode()):
            raise Unauthenticated(f"registry {self.host}: refusing to send credentials to plain-HTTP token "
                                  f"realm {realm}")
        service = challenge.params.get("service", "")
        creds = self.credentials
        self.token_requests += 1
        log.debug("registry_token_request", host=self.host, realm=realm, scopes=list(scopes))
        try:
            if creds is not None and creds.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "service": service, "client_id": "berth", "access_type": "offline"}
                if scopes:
                    form["scope"] = " ".join(scopes)
                response = await self.client.post(realm, data=form)
            else:
                params: dict[str, str | list[str]] = {"scope": list(scopes)}
                if service:
                    params["service"] = service
                auth = (creds.username, creds.password) if creds is not None and creds.username else None
                response = await self.client.get(realm, params=params, auth=auth)
        except httpx.TransportError as err:
            raise Unavailable(f"registry {self.host}: token server {realm} unreachable: {err}") from None
        if response.status_code in (401, 403):
            raise Unauthenticated(f"registry {self.host}: token server {realm} refused the credentials "
                                  f"(HTTP {response.status_code})")
        if response.status_code != 200 or len(response.content) > _MAX_TOKEN_RESPONSE:
            raise Unavailable(f"registry {self.host}: token server {realm} answered HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            raise Unavailable(f"registry {self.host}: token server {realm} sent invalid JSON") from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise Unavailable(f"registry {self.host}: token server {realm} sent no token")
        expires_in = body.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else _DEFAULT_EXPIRES_IN
        return token, lifetime
