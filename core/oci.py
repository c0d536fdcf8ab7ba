"""OCI image-spec value types shared by the registry client, the differ, the image store and the CLI.

Only the parts every one of them needs: media types (OCI and Docker), :class:`Descriptor`,
:class:`Platform` with the host's platform and matching, and chain IDs. Wire forms use the OCI JSON
field names (``mediaType``, ``digest``, ``size``, ...), so a descriptor read from a manifest and one sent
over RPC look the same.
"""

from __future__ import annotations

import hashlib
import platform as _platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from berth.core.content import validate_digest
from berth.core.errdefs import InvalidArgument

__all__ = [
    "CONFIG_MEDIA_TYPES",
    "DOCKER_CONFIG",
    "DOCKER_FOREIGN_LAYER_GZIP",
    "DOCKER_LAYER",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_MEDIA_TYPES",
    "LAYER_MEDIA_TYPES",
    "MANIFEST_MEDIA_TYPES",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_NONDIST",
    "OCI_LAYER_NONDIST_GZIP",
    "OCI_LAYER_NONDIST_ZSTD",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "Descriptor",
    "Platform",
    "chain_ids",
    "host_platform",
    "layer_compression",
]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_MEDIA_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

#: Layer media type -> compression ("" for plain tar, "gzip", "zstd").
_LAYER_COMPRESSION: dict[str, str] = {
    OCI_LAYER: "", OCI_LAYER_NONDIST: "", DOCKER_LAYER: "",
    OCI_LAYER_GZIP: "gzip", OCI_LAYER_NONDIST_GZIP: "gzip", DOCKER_LAYER_GZIP: "gzip",
    DOCKER_FOREIGN_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd", OCI_LAYER_NONDIST_ZSTD: "zstd",
}
LAYER_MEDIA_TYPES = frozenset(_LAYER_COMPRESSION)


def layer_compression(media_type: str) -> str:
    """The compression of a layer media type: ``""`` (plain tar), ``"gzip"`` or ``"zstd"``.

    Raises:
        InvalidArgument: the media type is not a layer type berth can apply.
    """
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise InvalidArgument(f"unsupported layer media type {media_type!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Platform:
    """An OCI platform (``os``/``architecture``/``variant``), as in an index entry or a config."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os[/arch[/variant]]`` (Docker's ``--platform`` syntax), normalised as containerd does
        (``x86_64`` -> ``amd64``, ``aarch64`` -> ``arm64``, ``arm64/v8`` -> ``arm64``).

        Raises:
            InvalidArgument: an empty part or more than three parts.
        """
        parts = text.strip().lower().split("/")
        if not 1 <= len(parts) <= 3 or any(not part for part in parts):
            raise InvalidArgument(f"invalid platform {text!r}: expected os[/architecture[/variant]]")
        if len(parts) == 1:
            host = host_platform()
            return cls(os=parts[0], architecture=host.architecture, variant=host.variant).normalized()
        return cls(os=parts[0], architecture=parts[1], variant=parts[2] if len(parts) == 3 else "").normalized()

    def normalized(self) -> Platform:
        architecture, variant = _normalize_architecture(self.architecture, self.variant)
        return Platform(os=self.os.lower(), architecture=architecture, variant=variant,
                        os_version=self.os_version, os_features=self.os_features)

    def matches(self, other: Platform) -> bool:
        """Whether an image for ``other`` runs on this platform (containerd's ``platforms.Only`` for the
        variant: an arm64 host without a variant takes any arm64 image)."""
        mine, theirs = self.normalized(), other.normalized()
        if mine.os != theirs.os or mine.architecture != theirs.architecture:
            return False
        return not mine.variant or not theirs.variant or mine.variant == theirs.variant

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            wire["variant"] = self.variant
        if self.os_version:
            wire["os.version"] = self.os_version
        if self.os_features:
            wire["os.features"] = list(self.os_features)
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Platform:
        if not isinstance(wire, Mapping) or not isinstance(wire.get("os"), str) \
                or not isinstance(wire.get("architecture"), str):
            raise InvalidArgument(f"invalid platform {wire!r}: needs string os and architecture")
        return cls(os=wire["os"], architecture=wire["architecture"], variant=str(wire.get("variant") or ""),
                   os_version=str(wire.get("os.version") or ""),
                   os_features=tuple(str(feature) for feature in wire.get("os.features") or ()))


def _normalize_architecture(architecture: str, variant: str) -> tuple[str, str]:
    architecture, variant = architecture.lower(), variant.lower()
    if architecture in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if architecture in ("aarch64", "arm64"):
        return "arm64", "" if variant in ("8", "v8") else variant
    if architecture == "armhf":
        return "arm", "v7"
    if architecture == "armel":
        return "arm", "v6"
    if architecture == "arm":
        return "arm", {"": "v7", "5": "v5", "6": "v6", "7": "v7", "8": "v8"}.get(variant, variant)
    if architecture in ("i386", "i486", "i586", "i686", "386"):
        return "386", variant
    return architecture, variant


def host_platform() -> Platform:
    """The platform of this machine (Linux, the kernel's architecture)."""
    architecture, variant = _normalize_architecture(_platform.machine() or "amd64", "")
    return Platform(os="linux", architecture=architecture, variant=variant)


@dataclass(frozen=True, slots=True, kw_only=True)
class Descriptor:
    """An OCI content descriptor: what a blob is (``media_type``), which (``digest``) and how big."""

    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    artifact_type: str = ""

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            wire["urls"] = list(self.urls)
        if self.annotations:
            wire["annotations"] = dict(self.annotations)
        if self.platform is not None:
            wire["platform"] = self.platform.to_wire()
        if self.artifact_type:
            wire["artifactType"] = self.artifact_type
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> Descriptor:
        """Decode an OCI JSON descriptor.

        Raises:
            InvalidArgument: a missing or mistyped field, a bad digest or a negative size.
        """
        if not isinstance(wire, Mapping):
            raise InvalidArgument(f"descriptor must be a map, got {type(wire).__name__}")
        media_type, size = wire.get("mediaType", ""), wire.get("size")
        if not isinstance(media_type, str):
            raise InvalidArgument("descriptor mediaType must be a string")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"descriptor size must be a non-negative integer, got {size!r}")
        annotations = wire.get("annotations") or {}
        if not isinstance(annotations, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise InvalidArgument("descriptor annotations must map strings to strings")
        urls = wire.get("urls") or ()
        if not isinstance(urls, Sequence) or isinstance(urls, str) or not all(isinstance(u, str) for u in urls):
            raise InvalidArgument("descriptor urls must be a list of strings")
        platform = wire.get("platform")
        return cls(media_type=media_type, digest=validate_digest(wire.get("digest")), size=size,
                   urls=tuple(urls), annotations=dict(annotations),
                   platform=Platform.from_wire(platform) if platform is not None else None,
                   artifact_type=str(wire.get("artifactType") or ""))


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI chain IDs of a layer stack: ``ChainID(L0) = DiffID(L0)``, ``ChainID(Ln) =
    sha256(ChainID(Ln-1) + " " + DiffID(Ln))``. These name committed snapshots."""
    result: list[str] = []
    for diff_id in diff_ids:
        validate_digest(diff_id)
        if not result:
            result.append(diff_id)
        else:
            result.append("sha256:" + hashlib.sha256(f"{result[-1]} {diff_id}".encode()).hexdigest())
    return result
