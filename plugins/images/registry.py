"""An async client for the OCI distribution API (registries), over one shared ``httpx.AsyncClient`` per host.

Use it as an async context manager; everything it opens is closed at the end::

    async with Resolver(RegistryHosts.load(config_path, docker_config), plain_http=True) as resolver:
        name, desc = await resolver.resolve("127.0.0.1:5000/app:v1")   # tag or digest -> root descriptor
        fetcher = resolver.fetcher(name)
        manifest = await fetcher.fetch_bytes(desc)                     # verified, size-limited
        async for chunk in fetcher.fetch(layer, offset=already):       # Range resume from an offset
            ...
        pusher = resolver.pusher("127.0.0.1:5000/copy:v1")
        if not await pusher.exists(layer):
            await pusher.push_blob(layer, chunks, mount_from="app")   # mount if the registry allows
        await pusher.push_manifest(desc, manifest, tag="v1")
        tags = await resolver.list_tags("127.0.0.1:5000/app")

The API:

- :meth:`Resolver.resolve(ref) <Resolver.resolve>` -> ``(name, Descriptor)``: ``HEAD`` then ``GET``
  ``/v2/<repo>/manifests/<tag|digest>`` accepting OCI and Docker indexes and manifests; the digest comes
  from ``Docker-Content-Digest`` or is computed from the body, and must equal the reference's digest when
  it has one. Manifests larger than :data:`MAX_MANIFEST_SIZE` are refused.
- :meth:`Fetcher.fetch` streams a blob (or a manifest, by digest) from ``offset`` (``Range``), resuming
  by itself after a connection reset. It does **not** verify the digest (a resumed caller holds the first
  bytes); wrap it in :func:`verify_stream` or use :meth:`Fetcher.fetch_bytes`.
- :class:`Pusher`: ``exists``, ``push_blob`` (monolithic ``PUT``, or ``PATCH`` chunks when ``chunk_size``
  is set; cross-repository mount with ``mount_from``), ``push_manifest`` (by tag or digest).

Hosts come from :class:`~berth.plugins.images.hosts.RegistryHosts`: mirrors with the needed capability
first (``resolve`` for tags, ``pull`` for blobs, ``push``), the server last; a failing mirror passes the
request to the next. Authentication is :mod:`berth.plugins.images.auth`. Idempotent requests (and uploads
of bytes in memory) are retried with exponential backoff on 5xx, 429 and connection errors, a bounded
number of times (:class:`RetryPolicy`); a streamed upload body is never sent twice. HTTP errors map to
errdefs: 404 ``NotFound`` (naming the reference or blob), 401 ``Unauthenticated``, 403 ``PermissionDenied``,
429/5xx/connection failures ``Unavailable``, 400 ``InvalidArgument``, 416 ``OutOfRange``.

Nothing here blocks the event loop: files (hosts, CAs) are read in threads, hashing is incremental. On
cancellation the request in flight is abandoned and its connection dropped; an unfinished upload session is
left for the registry to expire.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn, Self

import httpx
import structlog
import trio

from berth.core.content import new_hasher, validate_digest
from berth.core.errdefs import (
    BerthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from berth.core.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
)
from berth.plugins.images.auth import Authorizer
from berth.plugins.images.hosts import RegistryHost, RegistryHosts
from berth.plugins.images.reference import Reference, parse_reference

__all__ = [
    "MANIFEST_ACCEPT",
    "MAX_MANIFEST_SIZE",
    "Fetcher",
    "Pusher",
    "Resolver",
    "RetryPolicy",
    "verify_stream",
]

log = structlog.get_logger("berth.images.registry")

#: Largest manifest or index accepted (containerd's limit).
MAX_MANIFEST_SIZE = 4 << 20
#: What a manifest request accepts, preferred first.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, "*/*"])
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_MAX_ERROR_BODY = 64 << 10
_USER_AGENT = "berth/0.1"
_SCHEMA1_PREFIX = "application/vnd.docker.distribution.manifest.v1"
_GENERIC_TYPES = frozenset({"", "application/json", "text/plain", "application/octet-stream"})


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Bounded retries with exponential backoff: ``attempts`` tries in all; the wait before try *n*
    (counting from 1) is ``min(base_delay * 2**(n-1), max_delay)``, or the server's ``Retry-After`` when
    it asks for 429/503 within ``max_delay``."""

    attempts: int = 4
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, retry: int, retry_after: str | None = None) -> float:
        if retry_after is not None and retry_after.strip().isdigit():
            return min(float(retry_after), self.max_delay)
        return min(self.base_delay * 2.0 ** (retry - 1), self.max_delay)


def _describe(err: BaseException) -> str:
    """``Type: message`` of a transport error, with the first underlying cause that says more (under trio
    a TLS failure arrives as an empty ``ConnectError`` caused by the ``ssl`` error)."""
    text = f"{type(err).__name__}: {err}".rstrip(": ")
    cause, seen = err.__cause__ or err.__context__, 0
    while cause is not None and seen < 5:
        if str(cause):
            return f"{text} ({type(cause).__name__}: {cause})"
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return text


def _is_digest(value: str) -> bool:
    try:
        validate_digest(value)
    except InvalidArgument:
        return False
    return True


def _as_reference(ref: Reference | str) -> Reference:
    return ref if isinstance(ref, Reference) else parse_reference(ref)


def _media_type(response: httpx.Response) -> str:
    return str(response.headers.get("content-type", "")).split(";", 1)[0].strip().lower()


async def _error_detail(response: httpx.Response) -> str:
    """The registry's error codes and messages from a (possibly streamed) error response, bounded."""
    body = b""
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > _MAX_ERROR_BODY:
                break
    except httpx.HTTPError:
        pass
    finally:
        await response.aclose()
    try:
        errors = json.loads(body).get("errors")
        parts = [f"{e.get('code', '?')}: {e.get('message', '')}".strip() for e in errors if isinstance(e, dict)]
    except (ValueError, AttributeError, TypeError):
        parts = []
    return "; ".join(parts) or f"HTTP {response.status_code} {response.reason_phrase}".strip()


async def _raise_for(response: httpx.Response, what: str) -> NoReturn:
    """Raise the errdefs error for a failed response (after reading its error body)."""
    status = response.status_code
    detail = await _error_detail(response)
    error: BerthError
    if status == 404:
        error = NotFound(f"{what}: not found ({detail})")
    elif status == 401:
        error = Unauthenticated(f"{what}: authentication required or refused ({detail})")
    elif status == 403:
        error = PermissionDenied(f"{what}: access denied ({detail})")
    elif status == 400:
        error = InvalidArgument(f"{what}: the registry refused the request ({detail})")
    elif status == 405:
        error = Unimplemented(f"{what}: the registry does not allow this operation ({detail})")
    elif status == 416:
        error = OutOfRange(f"{what}: requested range not satisfiable ({detail})")
    elif status in _RETRY_STATUS:
        error = Unavailable(f"{what}: registry unavailable ({detail})")
    else:
        error = Unknown(f"{what}: unexpected registry response ({detail})")
    raise error


async def verify_stream(desc: Descriptor, chunks: AsyncIterator[bytes], *, hasher: Any = None,
                        offset: int = 0) -> AsyncIterator[bytes]:
    """Pass ``chunks`` through, checking them against ``desc``: more bytes than ``desc.size`` fail at
    once, and the end of the stream fails unless size and digest match. To verify a resumed stream,
    pass the ``hasher`` (from :func:`~berth.core.content.new_hasher`) that already holds the first
    ``offset`` bytes.

    Raises:
        FailedPrecondition: a size or digest mismatch, naming the descriptor.
    """
    hasher = hasher if hasher is not None else new_hasher(desc.digest)
    size = offset
    async for chunk in chunks:
        size += len(chunk)
        if size > desc.size:
            raise FailedPrecondition(f"blob {desc.digest}: more than the expected {desc.size} bytes")
        hasher.update(chunk)
        yield chunk
    if size != desc.size:
        raise FailedPrecondition(f"blob {desc.digest}: got {size} bytes, expected {desc.size}")
    actual = f"{desc.digest.partition(':')[0]}:{hasher.hexdigest()}"
    if actual != desc.digest:
        raise FailedPrecondition(f"blob {desc.digest}: content digest mismatch (got {actual})")


class _Endpoint:
    """One registry host with its HTTP client and authorization."""

    def __init__(self, host: RegistryHost, client: httpx.AsyncClient, authorizer: Authorizer) -> None:
        self.host = host
        self.client = client
        self.authorizer = authorizer


class Resolver:
    """The registry client: resolves references and hands out :class:`Fetcher`\\ s and :class:`Pusher`\\ s.

    ``plain_http`` allows plain HTTP to loopback registries (``127.0.0.1``, ``localhost``, ``::1``);
    ``retry`` bounds retries; ``timeout`` applies per network operation (connect, each read, each write).
    Must be closed (``async with`` or :meth:`aclose`): it owns one HTTP client per host.
    """

    def __init__(self, hosts: RegistryHosts, *, plain_http: bool = False, retry: RetryPolicy | None = None,
                 timeout: float = 60.0, max_manifest_size: int = MAX_MANIFEST_SIZE) -> None:
        self.hosts = hosts
        self.plain_http = plain_http
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.max_manifest_size = max_manifest_size
        self._endpoints: dict[tuple[str, bool], list[_Endpoint]] = {}
        self._clients: dict[tuple[str, str], httpx.AsyncClient] = {}
        self._authorizers: dict[str, Authorizer] = {}
        self._lock = trio.Lock()
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every HTTP client (idempotent). Requests still running fail."""
        self._closed = True
        clients = list(self._clients.values())
        self._clients.clear()
        self._endpoints.clear()
        with trio.CancelScope(shield=True):
            for client in clients:
                await client.aclose()

    # -- public API --------------------------------------------------------------------------------

    async def resolve(self, ref: Reference | str) -> tuple[str, Descriptor]:
        """Resolve ``ref`` (a tag or a digest) to ``(name, root descriptor)``; ``name`` is the normalised
        reference. Tags go to hosts with the ``resolve`` capability, digests to ``pull`` hosts too.

        Raises:
            InvalidArgument: a malformed reference, or plain HTTP refused for a remote host.
            NotFound: no host has the manifest (naming the reference).
            Unauthenticated, PermissionDenied: credentials missing, wrong, or without access.
            ResourceExhausted: a manifest over the size limit.
            FailedPrecondition: the manifest's digest is not the reference's.
            Unimplemented: a schema 1 manifest.
            Unavailable: the registry kept failing or could not be reached.
        """
        ref = _as_reference(ref)
        capability = "pull" if ref.digest else "resolve"
        errors: list[BerthError] = []
        for endpoint in await self._endpoints_for(ref.domain, capability):
            try:
                return ref.name(), await self._resolve_at(endpoint, ref)
            except (NotFound, Unavailable, Unauthenticated, PermissionDenied) as err:
                log.debug("registry_host_failed", host=endpoint.host.host, ref=ref.name(), error=str(err))
                errors.append(err)
        raise _pick_error(errors, f"{ref.name()}: no registry host with the {capability} capability")

    def fetcher(self, ref: Reference | str) -> Fetcher:
        """A :class:`Fetcher` for ``ref``'s repository.

        Raises:
            InvalidArgument: a malformed reference.
        """
        return Fetcher(self, _as_reference(ref))

    def pusher(self, ref: Reference | str, *, chunk_size: int = 0) -> Pusher:
        """A :class:`Pusher` to ``ref``'s repository: monolithic uploads, or ``PATCH`` chunks of
        ``chunk_size`` bytes when it is positive.

        Raises:
            InvalidArgument: a malformed reference, or a negative ``chunk_size``.
        """
        if chunk_size < 0:
            raise InvalidArgument(f"chunk_size must not be negative, got {chunk_size}")
        return Pusher(self, _as_reference(ref), chunk_size=chunk_size)

    async def list_tags(self, ref: Reference | str) -> list[str]:
        """The tags of ``ref``'s repository, following ``Link`` pagination.

        Raises:
            NotFound: no such repository; the other errors as :meth:`resolve`.
        """
        ref = _as_reference(ref)
        endpoint = (await self._endpoints_for(ref.domain, "resolve"))[0]
        what = f"tags of {ref.locator}"
        tags: list[str] = []
        url: str | None = f"{endpoint.host.url}/{ref.repository}/tags/list"
        while url is not None:
            response = await self._send(endpoint, "GET", url, scopes=[_scope(ref.repository, "pull")], what=what)
            if response.status_code != 200:
                await _raise_for(response, what)
            try:
                page = response.json().get("tags") or []
            except (ValueError, AttributeError):
                raise Unavailable(f"{what}: the registry sent invalid JSON") from None
            tags.extend(str(tag) for tag in page)
            link = response.links.get("next", {}).get("url")
            url = str(response.url.join(link)) if link else None
        return tags

    # -- internals ---------------------------------------------------------------------------------

    async def _endpoints_for(self, domain: str, capability: str) -> list[_Endpoint]:
        """The endpoints of ``domain`` with ``capability``, mirrors first.

        Raises:
            InvalidArgument: see :meth:`RegistryHosts.hosts`; Unavailable: the resolver is closed.
        """
        if self._closed:
            raise Unavailable("the registry resolver is closed")
        key = (domain, self.plain_http)
        async with self._lock:
            if key not in self._endpoints:
                hosts = await trio.to_thread.run_sync(lambda: self.hosts.hosts(domain, plain_http=self.plain_http))
                self._endpoints[key] = [await self._endpoint(host, domain) for host in hosts]
        found = [e for e in self._endpoints[key] if capability in e.host.capabilities]
        if not found:
            raise NotFound(f"registry {domain}: no host has the {capability} capability")
        return found

    async def _endpoint(self, host: RegistryHost, domain: str) -> _Endpoint:
        tls_key = f"{host.skip_verify}|{host.ca}|{host.client_certs}" if host.scheme == "https" else ""
        client_key = (f"{host.scheme}://{host.host}", tls_key)
        client = self._clients.get(client_key)
        if client is None:
            verify = await trio.to_thread.run_sync(host.ssl_context) if host.scheme == "https" else True
            client = httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(self.timeout), follow_redirects=True,
                                       headers={"User-Agent": _USER_AGENT},
                                       limits=httpx.Limits(max_connections=32, max_keepalive_connections=16))
            self._clients[client_key] = client
        authorizer = self._authorizers.get(host.host)
        if authorizer is None:
            # Token requests go through the host's own client, so its TLS settings apply to the realm too.
            credentials = self.hosts.credentials(host.host) or self.hosts.credentials(domain)
            authorizer = Authorizer(host.host, credentials, client, plain_http_ok=host.scheme == "http")
            self._authorizers[host.host] = authorizer
        return _Endpoint(host, client, authorizer)

    async def _send(self, endpoint: _Endpoint, method: str, url: str, *, scopes: Sequence[str], what: str,
                    headers: dict[str, str] | None = None, content: bytes | AsyncIterator[bytes] | None = None,
                    params: dict[str, str] | None = None, stream: bool = False) -> httpx.Response:
        """Send one request with authorization, answering one 401 challenge and retrying transient
        failures (only when ``content`` is bytes or absent). Returns the response, whatever its status;
        with ``stream`` its body is unread and the caller must close it.

        Raises:
            Unavailable: connection failures after the last retry, or for a streamed body.
            Unauthenticated, Unavailable: from the token server.
        """
        replayable = not isinstance(content, AsyncIterator)
        retries = 0
        auth_retried = False
        while True:
            request_headers = {**{k: v[-1] for k, v in endpoint.host.headers.items() if v}, **(headers or {})}
            authorization = await endpoint.authorizer.authorization(scopes)
            if authorization is not None:
                request_headers["Authorization"] = authorization
            request = endpoint.client.build_request(method, url, headers=request_headers, content=content,
                                                    params=params)
            try:
                response = await endpoint.client.send(request, stream=True)
            except httpx.TransportError as err:
                if not replayable or retries + 1 >= self.retry.attempts:
                    raise Unavailable(f"{what}: registry {endpoint.host.host} unreachable: {_describe(err)}") \
                        from None
                retries += 1
                delay = self.retry.delay(retries)
                log.info("registry_retry", host=endpoint.host.host, method=method, error=_describe(err),
                         retry=retries, delay=delay)
                await trio.sleep(delay)
                continue
            if response.status_code == 401 and not auth_retried and replayable:
                retry_scopes = await endpoint.authorizer.on_unauthorized(response, scopes, sent=authorization)
                if retry_scopes is not None:
                    await response.aclose()
                    auth_retried, scopes = True, retry_scopes
                    continue
            if response.status_code in _RETRY_STATUS and replayable and retries + 1 < self.retry.attempts:
                retries += 1
                delay = self.retry.delay(retries, response.headers.get("retry-after"))
                log.info("registry_retry", host=endpoint.host.host, method=method, status=response.status_code,
                         retry=retries, delay=delay)
                await response.aclose()
                await trio.sleep(delay)
                continue
            if not stream:
                try:
                    await response.aread()
                except httpx.TransportError as err:
                    await response.aclose()
                    if retries + 1 >= self.retry.attempts:
                        raise Unavailable(f"{what}: registry {endpoint.host.host}: {_describe(err)}") from None
                    retries += 1
                    await trio.sleep(self.retry.delay(retries))
                    continue
            return response

    async def _resolve_at(self, endpoint: _Endpoint, ref: Reference) -> Descriptor:
        url = f"{endpoint.host.url}/{ref.repository}/manifests/{ref.object}"
        what = ref.name()
        scopes = [_scope(ref.repository, "pull")]
        headers = {"Accept": MANIFEST_ACCEPT}
        response = await self._send(endpoint, "HEAD", url, scopes=scopes, what=what, headers=headers)
        if response.status_code in (401, 403, 404) or response.status_code in _RETRY_STATUS:
            await _raise_for(response, what)
        if response.status_code == 200:
            media_type = _media_type(response)
            if media_type.startswith(_SCHEMA1_PREFIX):
                raise Unimplemented(f"{what}: Docker schema 1 manifests are not supported")
            digest = str(response.headers.get("docker-content-digest", "")) or ref.digest
            length = str(response.headers.get("content-length", ""))
            if _is_digest(digest) and length.isdigit() and media_type not in _GENERIC_TYPES:
                size = int(length)
                self._check_size(size, what)
                if ref.digest and digest != ref.digest:
                    raise FailedPrecondition(f"{what}: the registry resolved it to {digest}")
                return Descriptor(media_type=media_type, digest=digest, size=size)
        # No usable HEAD answer (405, no digest or length, a generic type): GET and hash the manifest.
        _, desc = await self._get_manifest(endpoint, ref)
        return desc

    async def _get_manifest(self, endpoint: _Endpoint, ref: Reference) -> tuple[bytes, Descriptor]:
        """GET a manifest by tag or digest: its bytes and descriptor, size-limited and digest-checked."""
        url = f"{endpoint.host.url}/{ref.repository}/manifests/{ref.object}"
        what = ref.name()
        response = await self._send(endpoint, "GET", url, scopes=[_scope(ref.repository, "pull")], what=what,
                                    headers={"Accept": MANIFEST_ACCEPT}, stream=True)
        if response.status_code != 200:
            await _raise_for(response, what)
        try:
            length = response.headers.get("content-length", "")
            if length.isdigit():
                self._check_size(int(length), what)
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                self._check_size(len(data), what)
        except httpx.TransportError as err:
            raise Unavailable(f"{what}: registry {endpoint.host.host}: {_describe(err)}") from None
        finally:
            await response.aclose()
        header_digest = str(response.headers.get("docker-content-digest", ""))
        hasher = new_hasher(ref.digest)
        hasher.update(data)
        digest = f"{hasher.name}:{hasher.hexdigest()}"
        if ref.digest and digest != ref.digest:
            raise FailedPrecondition(f"{what}: content digest mismatch (got {digest})")
        if header_digest and header_digest.partition(":")[0] == hasher.name and header_digest != digest:
            raise FailedPrecondition(f"{what}: the registry named it {header_digest} but its content is {digest}")
        media_type = _detect_media_type(_media_type(response), bytes(data), what)
        return bytes(data), Descriptor(media_type=media_type, digest=digest, size=len(data))

    def _check_size(self, size: int, what: str) -> None:
        if size > self.max_manifest_size:
            raise ResourceExhausted(f"{what}: manifest larger than the {self.max_manifest_size}-byte limit")


def _detect_media_type(header_type: str, data: bytes, what: str) -> str:
    """The manifest's media type: the header's unless generic, else its ``mediaType`` field, else guessed
    from its shape (OCI index or manifest).

    Raises:
        Unimplemented: a schema 1 manifest; InvalidArgument: not a JSON manifest when the type must be read
            from the body.
    """
    if header_type.startswith(_SCHEMA1_PREFIX):
        raise Unimplemented(f"{what}: Docker schema 1 manifests are not supported")
    if header_type not in _GENERIC_TYPES:
        return header_type
    try:
        value = json.loads(data)
    except ValueError:
        raise InvalidArgument(f"{what}: the manifest is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what}: the manifest is not a JSON object")
    if value.get("schemaVersion") == 1:
        raise Unimplemented(f"{what}: Docker schema 1 manifests are not supported")
    media_type = value.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    return OCI_INDEX if "manifests" in value else OCI_MANIFEST


def _pick_error(errors: list[BerthError], fallback: str) -> BerthError:
    """The error to report after every host failed: the last one (the server's; mirrors come first)."""
    return errors[-1] if errors else NotFound(fallback)


def _scope(repository: str, actions: str) -> str:
    return f"repository:{repository}:{actions}"


def _is_manifest(desc: Descriptor) -> bool:
    return desc.media_type in INDEX_MEDIA_TYPES or desc.media_type in MANIFEST_MEDIA_TYPES


class Fetcher:
    """Reads blobs and manifests of one repository (from :meth:`Resolver.fetcher`)."""

    def __init__(self, resolver: Resolver, ref: Reference) -> None:
        self.resolver = resolver
        self.ref = ref

    def _what(self, desc: Descriptor) -> str:
        return f"{'manifest' if _is_manifest(desc) else 'blob'} {desc.digest} in {self.ref.locator}"

    def _url(self, endpoint: _Endpoint, desc: Descriptor) -> str:
        kind = "manifests" if _is_manifest(desc) else "blobs"
        return f"{endpoint.host.url}/{self.ref.repository}/{kind}/{desc.digest}"

    async def _open(self, desc: Descriptor, offset: int) -> tuple[_Endpoint, httpx.Response]:
        """A streaming response for ``desc`` from ``offset`` from the first host that has it."""
        what = self._what(desc)
        headers = {"Accept-Encoding": "identity"}
        if _is_manifest(desc):
            headers["Accept"] = f"{desc.media_type}, {MANIFEST_ACCEPT}"
        if offset:
            headers["Range"] = f"bytes={offset}-"
        errors: list[BerthError] = []
        for endpoint in await self.resolver._endpoints_for(self.ref.domain, "pull"):
            try:
                response = await self.resolver._send(endpoint, "GET", self._url(endpoint, desc),
                                                     scopes=[_scope(self.ref.repository, "pull")], what=what,
                                                     headers=headers, stream=True)
                if response.status_code not in (200, 206):
                    await _raise_for(response, what)
                return endpoint, response
            except (NotFound, Unavailable, Unauthenticated, PermissionDenied) as err:
                log.debug("registry_host_failed", host=endpoint.host.host, blob=desc.digest, error=str(err))
                errors.append(err)
        raise _pick_error(errors, what)

    async def fetch(self, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]:
        """Stream ``desc``'s bytes from ``offset`` (``Range: bytes=<offset>-``; a registry that ignores the
        range has the first ``offset`` bytes skipped). A connection reset mid-stream resumes from the
        bytes already yielded, within the retry policy. The digest is not verified (see
        :func:`verify_stream`); at most ``desc.size`` bytes are yielded.

        Raises:
            OutOfRange: ``offset`` outside ``0..desc.size``.
            FailedPrecondition: the registry sent more bytes than ``desc.size``, or a wrong range.
            NotFound, Unauthenticated, PermissionDenied, Unavailable: as :meth:`Resolver.resolve`.
        On cancellation (or when the consumer stops early) the response is closed.
        """
        if not 0 <= offset <= desc.size:
            raise OutOfRange(f"{self._what(desc)}: offset {offset} outside 0..{desc.size}")
        position = offset
        resets = 0
        while position < desc.size or desc.size == 0:
            endpoint, response = await self._open(desc, position)
            try:
                skip = position if response.status_code == 200 else 0
                if response.status_code == 206:
                    _check_content_range(response, position, self._what(desc))
                async for chunk in response.aiter_bytes():
                    if skip:
                        dropped = min(skip, len(chunk))
                        chunk, skip = chunk[dropped:], skip - dropped
                        if not chunk:
                            continue
                    if position + len(chunk) > desc.size:
                        raise FailedPrecondition(f"{self._what(desc)}: the registry sent more than the "
                                                 f"expected {desc.size} bytes")
                    position += len(chunk)
                    yield chunk
            except httpx.TransportError as err:
                resets += 1
                if resets >= self.resolver.retry.attempts:
                    raise Unavailable(f"{self._what(desc)}: connection to {endpoint.host.host} failed at byte "
                                      f"{position}: {_describe(err)}") from None
                delay = self.resolver.retry.delay(resets)
                log.info("registry_fetch_resume", host=endpoint.host.host, blob=desc.digest, offset=position,
                         retry=resets, delay=delay)
                await trio.sleep(delay)
                continue
            finally:
                await response.aclose()
            if position < desc.size:
                raise FailedPrecondition(f"{self._what(desc)}: the registry sent {position} of {desc.size} bytes")
            return

    async def fetch_bytes(self, desc: Descriptor, *, limit: int | None = None) -> bytes:
        """All of ``desc``'s bytes, verified against its size and digest. ``limit`` (default: the
        resolver's manifest limit for manifests and indexes, none otherwise) refuses larger
        descriptors before any request.

        Raises:
            ResourceExhausted: ``desc.size`` over ``limit``.
            FailedPrecondition: a size or digest mismatch; the errors of :meth:`fetch`.
        """
        if limit is None and _is_manifest(desc):
            limit = self.resolver.max_manifest_size
        if limit is not None and desc.size > limit:
            raise ResourceExhausted(f"{self._what(desc)}: {desc.size} bytes is over the {limit}-byte limit")
        data = bytearray()
        async for chunk in verify_stream(desc, self.fetch(desc)):
            data += chunk
        return bytes(data)


def _check_content_range(response: httpx.Response, position: int, what: str) -> None:
    content_range = response.headers.get("content-range", "")
    unit, _, spec = content_range.partition(" ")
    start = spec.split("-", 1)[0]
    if unit.strip().lower() != "bytes" or not start.isdigit() or int(start) != position:
        raise FailedPrecondition(f"{what}: asked for bytes from {position}, the registry sent {content_range!r}")


class Pusher:
    """Writes blobs and manifests to one repository (from :meth:`Resolver.pusher`). Only hosts with the
    ``push`` capability are used (the first one)."""

    def __init__(self, resolver: Resolver, ref: Reference, *, chunk_size: int = 0) -> None:
        self.resolver = resolver
        self.ref = ref
        self.chunk_size = chunk_size

    def _scopes(self, *extra: str) -> list[str]:
        return [_scope(self.ref.repository, "pull,push"), *extra]

    async def _endpoint(self) -> _Endpoint:
        return (await self.resolver._endpoints_for(self.ref.domain, "push"))[0]

    async def exists(self, desc: Descriptor) -> bool:
        """Whether the repository has ``desc`` (``HEAD`` on its blob, or manifest by digest).

        Raises:
            Unauthenticated, PermissionDenied, Unavailable: as :meth:`Resolver.resolve`.
        """
        endpoint = await self._endpoint()
        kind = "manifests" if _is_manifest(desc) else "blobs"
        what = f"{kind[:-1]} {desc.digest} in {self.ref.locator}"
        headers = {"Accept": f"{desc.media_type}, {MANIFEST_ACCEPT}"} if kind == "manifests" else None
        response = await self.resolver._send(endpoint, "HEAD", f"{endpoint.host.url}/{self.ref.repository}/{kind}/"
                                             f"{desc.digest}", scopes=self._scopes(), what=what, headers=headers)
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        await _raise_for(response, what)

    async def push_blob(self, desc: Descriptor, chunks: AsyncIterator[bytes], *,
                        mount_from: str | None = None) -> None:
        """Upload blob ``desc`` from ``chunks`` (its bytes in order). With ``mount_from`` (a repository of
        the same registry) it is mounted from there when the registry allows, and ``chunks`` is not read;
        otherwise uploaded: one streamed ``PUT``, or ``PATCH`` requests of ``chunk_size`` then a ``PUT``.
        The bytes are checked against ``desc`` as they go: a mismatch aborts before the upload completes.

        Raises:
            FailedPrecondition: ``chunks`` does not match ``desc`` (size or digest).
            InvalidArgument: the registry refused the digest or the upload.
            Unauthenticated, PermissionDenied, Unavailable: as :meth:`Resolver.resolve`.
        On cancellation the upload session is abandoned (the registry expires it).
        """
        endpoint = await self._endpoint()
        what = f"blob {desc.digest} to {self.ref.locator}"
        uploads = f"{endpoint.host.url}/{self.ref.repository}/blobs/uploads/"
        params = None
        scopes = self._scopes()
        if mount_from:
            params = {"mount": desc.digest, "from": mount_from}
            scopes.append(_scope(mount_from, "pull"))
        response = await self.resolver._send(endpoint, "POST", uploads, scopes=scopes, what=what, params=params,
                                             headers={"Content-Length": "0"})
        if response.status_code == 201 and mount_from:
            log.debug("registry_blob_mounted", blob=desc.digest, source=mount_from, target=self.ref.locator)
            return
        if response.status_code != 202:
            await _raise_for(response, what)
        location = _location(response, what)
        body = verify_stream(desc, chunks)
        if self.chunk_size > 0:
            location = await self._patch_chunks(endpoint, location, body, what)
            content: bytes | AsyncIterator[bytes] = b""
            headers = {"Content-Length": "0"}
        else:
            content = body
            headers = {"Content-Length": str(desc.size), "Content-Type": "application/octet-stream"}
        url = location.copy_merge_params({"digest": desc.digest})
        response = await self.resolver._send(endpoint, "PUT", str(url), scopes=self._scopes(), what=what,
                                             headers=headers, content=content)
        if response.status_code != 201:
            await _raise_for(response, what)
        stored = response.headers.get("docker-content-digest", desc.digest)
        if stored != desc.digest:
            raise FailedPrecondition(f"{what}: the registry stored it as {stored}")

    async def _patch_chunks(self, endpoint: _Endpoint, location: httpx.URL, body: AsyncIterator[bytes],
                            what: str) -> httpx.URL:
        offset = 0
        buffer = bytearray()

        async def send(piece: bytes) -> httpx.URL:
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(piece)),
                       "Content-Range": f"{offset}-{offset + len(piece) - 1}"}
            response = await self.resolver._send(endpoint, "PATCH", str(location), scopes=self._scopes(),
                                                 what=what, headers=headers, content=piece)
            if response.status_code != 202:
                await _raise_for(response, what)
            return _location(response, what)

        async for chunk in body:
            buffer += chunk
            while len(buffer) >= self.chunk_size:
                piece, buffer = bytes(buffer[: self.chunk_size]), buffer[self.chunk_size:]
                location = await send(piece)
                offset += len(piece)
        if buffer:
            location = await send(bytes(buffer))
        return location

    async def push_manifest(self, desc: Descriptor, data: bytes, *, tag: str | None = None) -> None:
        """Put manifest or index ``data`` (described by ``desc``) under ``tag``, or under its digest when
        ``tag`` is ``None``. Everything it references must be in the repository already.

        Raises:
            InvalidArgument: ``data`` does not match ``desc``, a bad tag, or the registry refused the
                manifest (e.g. a blob it references is missing: ``MANIFEST_BLOB_UNKNOWN``).
            ResourceExhausted: ``data`` over the manifest limit.
            Unauthenticated, PermissionDenied, Unavailable: as :meth:`Resolver.resolve`.
        """
        what = f"manifest {desc.digest} to {self.ref.locator}" + (f":{tag}" if tag else "")
        hasher = new_hasher(desc.digest)
        hasher.update(data)
        if len(data) != desc.size or f"{hasher.name}:{hasher.hexdigest()}" != desc.digest:
            raise InvalidArgument(f"{what}: the data does not match the descriptor's size and digest")
        if len(data) > self.resolver.max_manifest_size:
            raise ResourceExhausted(f"{what}: over the {self.resolver.max_manifest_size}-byte manifest limit")
        target = self.ref.with_tag(tag).tag if tag else desc.digest
        endpoint = await self._endpoint()
        response = await self.resolver._send(endpoint, "PUT", f"{endpoint.host.url}/{self.ref.repository}/manifests/"
                                             f"{target}", scopes=self._scopes(), what=what,
                                             headers={"Content-Type": desc.media_type}, content=data)
        if response.status_code != 201:
            await _raise_for(response, what)
        stored = response.headers.get("docker-content-digest", desc.digest)
        if stored != desc.digest:
            raise FailedPrecondition(f"{what}: the registry stored it as {stored}")


def _location(response: httpx.Response, what: str) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise Unavailable(f"{what}: the registry gave no upload location")
    return response.url.join(location)
