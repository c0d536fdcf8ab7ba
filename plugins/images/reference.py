"""Image references, parsed and normalised exactly as Docker (``distribution/reference``) does.

``busybox`` is ``docker.io/library/busybox:latest``; ``index.docker.io/x/y`` is ``docker.io/x/y:latest``;
``host:5000/team/app:v1@sha256:...`` keeps its host, tag and digest. A reference with a digest and no tag
gets no ``latest``. The first path component is a registry host only when it has a ``.`` or a ``:`` or is
``localhost``; a bare 64-hex name (an image ID) is refused, as is an upper-case repository.

Use::

    ref = parse_reference("busybox")
    ref.domain, ref.repository, ref.tag, ref.digest   # "docker.io", "library/busybox", "latest", ""
    ref.name()           # "docker.io/library/busybox:latest" (the image name berth stores)
    ref.locator          # "docker.io/library/busybox"
    ref.registry_host()  # "registry-1.docker.io" (where the distribution API is served)
    ref.object           # the digest if there is one, else the tag (what /manifests/<object> takes)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from berth.core.content import validate_digest
from berth.core.errdefs import InvalidArgument

__all__ = [
    "DOCKER_DOMAIN",
    "DOCKER_REGISTRY_HOST",
    "Reference",
    "host_is_loopback",
    "parse_reference",
]

#: The domain short names belong to.
DOCKER_DOMAIN = "docker.io"
#: Where docker.io's distribution API is served.
DOCKER_REGISTRY_HOST = "registry-1.docker.io"
_LEGACY_DOCKER_DOMAIN = "index.docker.io"
_OFFICIAL_PREFIX = "library/"
_DEFAULT_TAG = "latest"
_NAME_TOTAL_LENGTH_MAX = 255

# The grammar of distribution/reference/regexp.go, written out afresh.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"(?P<name>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?\Z")
_ANCHORED_ID = re.compile(r"[a-f0-9]{64}\Z")
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


@dataclass(frozen=True, slots=True)
class Reference:
    """A normalised image reference. ``tag`` and ``digest`` are ``""`` when absent; at least one is set
    after :func:`parse_reference` (``latest`` when the text had neither)."""

    domain: str
    repository: str
    tag: str = ""
    digest: str = ""

    @property
    def locator(self) -> str:
        """``domain/repository``: the image without tag or digest."""
        return f"{self.domain}/{self.repository}"

    @property
    def object(self) -> str:
        """What ``/v2/<repository>/manifests/<object>`` takes: the digest when there is one, else the tag."""
        return self.digest or self.tag

    def name(self) -> str:
        """The full normalised reference, ``domain/repository[:tag][@digest]``."""
        text = self.locator
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def registry_host(self) -> str:
        """The host (``host[:port]``) serving the distribution API: ``registry-1.docker.io`` for docker.io."""
        return DOCKER_REGISTRY_HOST if self.domain == DOCKER_DOMAIN else self.domain

    def is_loopback(self) -> bool:
        """Whether the registry is on this machine (``localhost``, ``127.0.0.1``, ``::1``, any port)."""
        return host_is_loopback(self.domain)

    def with_tag(self, tag: str) -> Reference:
        """The same repository with ``tag`` and no digest.

        Raises:
            InvalidArgument: ``tag`` is not a valid tag.
        """
        if not re.fullmatch(_TAG, tag):
            raise InvalidArgument(f"invalid tag {tag!r} for {self.locator}")
        return replace(self, tag=tag, digest="")

    def with_digest(self, digest: str) -> Reference:
        """The same repository pinned to ``digest`` (the tag is kept).

        Raises:
            InvalidArgument: ``digest`` is not a digest berth can verify.
        """
        return replace(self, digest=validate_digest(digest))

    def __str__(self) -> str:
        return self.name()


def host_is_loopback(host: str) -> bool:
    """Whether ``host[:port]`` names this machine's loopback (``localhost``, ``127.0.0.1``, ``::1``)."""
    if host.startswith("["):
        bare = host[: host.find("]") + 1] if "]" in host else host
    else:
        bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return bare.lower() in _LOOPBACK_HOSTS


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``text`` as Docker does (``ParseDockerRef``: a tagless, digestless name gets
    ``latest``).

    Raises:
        InvalidArgument: naming the reference and what is wrong with it (bad format, upper case, too
            long, an image ID, an unsupported digest algorithm).
    """
    if not isinstance(text, str) or not text:
        raise InvalidArgument(f"invalid reference {text!r}: empty")
    if _ANCHORED_ID.match(text):
        raise InvalidArgument(f"invalid reference {text!r}: cannot specify 64-byte hexadecimal strings "
                              "(an image ID is not a reference)")
    domain, remainder = _split_domain(text)
    repository_part = _repository_part(remainder)
    if repository_part != repository_part.lower():
        raise InvalidArgument(f"invalid reference {text!r}: repository name must be lowercase")
    match = _REFERENCE.match(f"{domain}/{remainder}")
    if match is None:
        raise InvalidArgument(f"invalid reference {text!r}: not [host[:port]/]path[:tag][@digest] "
                              "with a lowercase path")
    name = match.group("name")
    if len(name) > _NAME_TOTAL_LENGTH_MAX:
        raise InvalidArgument(f"invalid reference {text!r}: repository name must not be longer than "
                              f"{_NAME_TOTAL_LENGTH_MAX} characters")
    digest = match.group("digest") or ""
    if digest:
        try:
            validate_digest(digest)
        except InvalidArgument as err:
            raise InvalidArgument(f"invalid reference {text!r}: {err}") from None
    tag = match.group("tag") or ("" if digest else _DEFAULT_TAG)
    repository = name[len(domain) + 1:]
    return Reference(domain=domain, repository=repository, tag=tag, digest=digest)


def _repository_part(remainder: str) -> str:
    """The path of ``remainder`` without ``:tag`` and ``@digest``."""
    path = remainder.split("@", 1)[0]
    slash = path.rfind("/")
    colon = path.rfind(":")
    return path[:colon] if colon > slash else path


def _split_domain(text: str) -> tuple[str, str]:
    """Docker's ``splitDockerDomain``: the domain and the rest, with ``library/`` added for official
    images on docker.io."""
    slash = text.find("/")
    first = text[:slash]
    if slash == -1 or ("." not in first and ":" not in first and first != "localhost"
                       and first.lower() == first):
        domain, remainder = DOCKER_DOMAIN, text
    else:
        domain, remainder = first, text[slash + 1:]
    if domain == _LEGACY_DOCKER_DOMAIN:
        domain = DOCKER_DOMAIN
    if domain == DOCKER_DOMAIN and "/" not in remainder:
        remainder = _OFFICIAL_PREFIX + remainder
    return domain, remainder
