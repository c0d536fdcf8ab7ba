"""``io.berth.transfer.v1.local``: pull, push, import and export of images, done in the daemon (containerd
2.x's transfer service).

It ties together the registry client (:mod:`berth.plugins.images.registry`), the namespaced content store
and snapshotters of the metadata plugin, the differ, the image store and the lease manager. Every
method works in the caller's namespace.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from berth.core.errdefs import InvalidArgument, NotFound
from berth.core.metadata.images import Image, ImageStore
from berth.core.metadata.leases import LeaseManager
from berth.core.metadata.snapshots import NamespacedSnapshotter
from berth.core.namespaces import with_lease
from berth.core.oci import Descriptor, Platform
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl, plugin_ref
from berth.plugins.images.archive import ArchiveExporter, ArchiveImporter
from berth.plugins.images.hosts import RegistryHosts
from berth.plugins.images.pull import Applier, Progress, Puller, PullResult
from berth.plugins.images.push import Pusher, PushResult
from berth.plugins.images.reference import parse_reference
from berth.plugins.images.registry import Resolver
from berth.plugins.metadata.plugin import Metadata


@dataclass(kw_only=True)
class Config:
    #: Blobs fetched at once per pull (containerd's default).
    max_concurrent_downloads: int = 3
    #: Blobs uploaded at once per push.
    max_concurrent_uploads: int = 3
    #: Per-registry settings, one ``<host>/hosts.toml`` per registry (containerd's ``certs.d`` layout).
    config_path: str = "/etc/berth/certs.d"
    #: Registry credentials in Docker's ``config.json`` format ("": ``$DOCKER_CONFIG/config.json``, else
    #: ``~/.docker/config.json``; a missing file means anonymous access).
    docker_config: str = ""
    #: The snapshotter images are unpacked into when a call names none.
    snapshotter: str = plugin_ref(PluginType.SNAPSHOTTER, "overlayfs", doc="snapshotter to unpack into")


class Transfer:
    """What the plugin provides (and the transfer RPC service calls)."""

    def __init__(self, *, metadata: Metadata, leases: LeaseManager, applier: Applier, images: ImageStore,
                 config: Config) -> None:
        self.metadata = metadata
        self.leases = leases
        self.applier = applier
        self.images = images
        self.config = config
        docker_config = config.docker_config or os.path.join(
            os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker"), "config.json")
        self.hosts = RegistryHosts.load(Path(config.config_path), Path(docker_config))

    def snapshotter(self, name: str) -> tuple[str, NamespacedSnapshotter]:
        """Raises: NotFound naming the loaded snapshotters."""
        name = name or self.config.snapshotter
        try:
            return name, self.metadata.snapshotters[name]
        except KeyError:
            loaded = ", ".join(sorted(self.metadata.snapshotters)) or "none"
            raise NotFound(f"snapshotter {name!r} is not loaded (loaded: {loaded})") from None

    async def pull(self, reference: str, *, platform: str = "", all_platforms: bool = False, snapshotter: str = "",
                   unpack: bool = True, plain_http: bool = False, progress: Progress | None = None) -> PullResult:
        """Pull ``reference`` into the current namespace (see :mod:`berth.plugins.images.pull`).

        Raises: InvalidArgument (bad reference or platform), NotFound, PermissionDenied, Unavailable,
        FailedPrecondition (corrupt blob, wrong diff ID).
        """
        ref = parse_reference(reference)
        wanted = Platform.parse(platform) if platform else None
        name, sn = self.snapshotter(snapshotter)
        async with Resolver(self.hosts, plain_http=plain_http) as resolver:
            resolved_name, root = await resolver.resolve(ref)
            puller = Puller(content=self.metadata.content, fetcher=resolver.fetcher(ref), applier=self.applier,
                            snapshotter=sn if unpack else None, snapshotter_name=name,
                            images=self.images, leases=self.leases,
                            max_concurrent_downloads=self.config.max_concurrent_downloads, progress=progress,
                            source=(ref.registry_host(), ref.repository))
            return await puller.pull(resolved_name, root, platform=wanted, all_platforms=all_platforms)

    async def push(self, name: str, destination: str = "", *, plain_http: bool = False,
                   progress: Progress | None = None) -> PushResult:
        """Push the image ``name`` to ``destination`` (default: its own name).

        Raises: NotFound (no such image, or a blob missing locally), the registry's errors.
        """
        image = await self.images.get(name)
        ref = parse_reference(destination or name)
        async with Resolver(self.hosts, plain_http=plain_http) as resolver:
            pusher = Pusher(content=self.metadata.content, pusher=resolver.pusher(ref), host=ref.registry_host(),
                            repository=ref.repository, max_concurrent_uploads=self.config.max_concurrent_uploads,
                            progress=progress)
            return await pusher.push(ref.name(), image.target, ref.tag or None)

    async def import_archive(self, archive_digest: str, *, base_name: str = "", snapshotter: str = "",
                             unpack: bool = True) -> dict[str, Any]:
        """Import the archive blob ``archive_digest`` (uploaded by the client), create its images and
        unpack them; the archive blob itself is released.

        Raises: NotFound (no such blob), InvalidArgument (not an archive, corrupt or unnamed content).
        """
        name, sn = self.snapshotter(snapshotter)
        lease_id = f"import-{uuid.uuid4().hex[:16]}"
        await self.leases.create(lease_id, {"berth.io/import": archive_digest}, expires_in=24 * 3600)
        try:
            with with_lease(lease_id):
                result = await ArchiveImporter(self.metadata.content).run(archive_digest, base_name=base_name)
                images = []
                for imported in result.images:
                    puller = Puller(content=self.metadata.content, fetcher=_NoFetch(), applier=self.applier,
                                    snapshotter=sn if unpack else None, snapshotter_name=name,
                                    images=self.images, leases=self.leases)
                    pulled = await puller.pull(imported.name, imported.target)
                    images.append({"name": imported.name, "target": imported.target.to_wire(),
                                   "chain_id": pulled.chain_id})
        finally:
            with trio.CancelScope(shield=True):
                await self.leases.delete(lease_id)
        return {"images": images, "unnamed": [d.to_wire() for d in result.unnamed], "blobs": result.blobs}

    async def export(self, names: Sequence[str]) -> AsyncIterator[bytes]:
        """An OCI image layout tar of the images ``names``.

        Raises: NotFound (an unknown image or a missing blob), InvalidArgument (no names).
        """
        if not names:
            raise InvalidArgument("export needs at least one image name")
        images: list[Image] = [await self.images.get(name) for name in names]
        async for chunk in ArchiveExporter(self.metadata.content).stream([(i.name, i.target) for i in images]):
            yield chunk


class _NoFetch:
    """A fetcher for content that must already be in the store (import): asking for a blob is an error."""

    def fetch(self, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]:
        raise InvalidArgument(f"the archive does not contain {desc.digest} ({desc.media_type})")


async def init(ic: InitContext) -> Transfer:
    metadata: Metadata = ic.get_single(PluginType.METADATA)
    leases: LeaseManager = ic.get_single(PluginType.LEASE)
    applier: Applier = ic.get_single(PluginType.DIFFER)
    images: ImageStore = ic.get_by_id(PluginType.SERVICE, "images-service")
    config: Config = ic.config
    if config.max_concurrent_downloads < 1 or config.max_concurrent_uploads < 1:
        raise InvalidArgument("max_concurrent_downloads and max_concurrent_uploads must be at least 1")
    return Transfer(metadata=metadata, leases=leases, applier=applier, images=images, config=config)


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.TRANSFER, id="local", init=init, config=Config,
                                   requires=(PluginType.SNAPSHOTTER, PluginType.METADATA, PluginType.LEASE,
                                             PluginType.DIFFER, PluginType.SERVICE)))
