"""Pull: resolve a reference, fetch its tree into the content store, unpack layers while the rest downloads.

The order is containerd's (``client/pull.go``, ``core/unpack``): resolve the root descriptor; fetch the
index (choosing the platform manifests), each manifest, its config and its layers, siblings in parallel
under a bound (``max_concurrent_downloads``); every blob goes through a content writer whose ref names
it (``index-``/``manifest-``/``config-``/``layer-<digest>``), so a blob already present is skipped and an
interrupted download resumes from the bytes already written. Parents get ``berth.io/gc.ref.content.*``
labels naming their children. Once the config is in, its diff IDs give the chain IDs, and an unpack task
applies layer *i* as soon as it has arrived while later layers are still downloading: ``prepare`` a key
on the parent chain ID, apply with the diff ID verified, ``commit`` under the chain ID (skipped when that
snapshot exists). The config is labelled with the top chain ID, the image record is created (or its
target updated), and everything happens under a lease that is released at the end, so a half-pulled image
is neither collected mid-way nor kept once the lease expires.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import trio

from berth.core.content import Info as ContentInfo
from berth.core.content import Store
from berth.core.errdefs import AlreadyExists, BerthError, FailedPrecondition, InvalidArgument, NotFound
from berth.core.metadata.snapshots import NamespacedSnapshotter
from berth.core.namespaces import with_lease
from berth.core.oci import (
    CONFIG_MEDIA_TYPES,
    INDEX_MEDIA_TYPES,
    LAYER_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    Descriptor,
    Platform,
    chain_ids,
    host_platform,
)
from berth.core.snapshots.snapshotter import Mount

log = structlog.get_logger("berth.images.pull")

#: Largest manifest or index accepted (containerd's limit).
MAX_MANIFEST_SIZE = 4 << 20
#: Largest image config accepted.
MAX_CONFIG_SIZE = 16 << 20
#: Writes to the content store are batched to this size (one thread hop per batch, not per packet).
_WRITE_BATCH = 1 << 20
#: Progress for one blob is reported at most this often (seconds).
_PROGRESS_INTERVAL = 0.1

Progress = Callable[[dict[str, Any]], None]


class BlobFetcher(Protocol):
    """Fetches blobs of one repository."""

    def fetch(self, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset`` (a Range request when ``offset`` > 0)."""


class Applier(Protocol):
    """Applies a layer blob from the content store into a prepared snapshot (the differ)."""

    async def apply(self, desc: Descriptor, mounts: Sequence[Mount], *, expected_diff_id: str = "") -> str:
        """Apply and return the layer's diff ID; raises when it differs from ``expected_diff_id``."""


class ImageRecords(Protocol):
    """The part of the image store a pull needs."""

    async def put(self, name: str, target: Descriptor) -> object:
        """Create the image record, or update its target when it exists."""


class Leases(Protocol):
    async def create(self, lease_id: str, labels: Mapping[str, str] | None = None,
                     expires_in: float | None = None) -> Any: ...

    async def delete(self, lease_id: str, *, sync: bool = False) -> None: ...


def _decode_json(data: bytes, desc: Descriptor, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as err:
        raise InvalidArgument(f"{what} {desc.digest} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} {desc.digest} is not a JSON object")
    return value


def _descriptors(value: Any, what: str) -> list[Descriptor]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{what} must be a list of descriptors")
    return [Descriptor.from_wire(item) for item in value]


@dataclass(frozen=True, slots=True)
class Manifest:
    """The parts of an image manifest a pull uses."""

    config: Descriptor
    layers: list[Descriptor]

    @classmethod
    def parse(cls, data: bytes, desc: Descriptor) -> Manifest:
        """Raises: InvalidArgument for a malformed manifest or a layer type berth cannot apply."""
        value = _decode_json(data, desc, "manifest")
        if value.get("schemaVersion") != 2:
            raise InvalidArgument(f"manifest {desc.digest}: schemaVersion must be 2 (schema 1 is not supported)")
        if "config" not in value:
            raise InvalidArgument(f"manifest {desc.digest} has no config")
        config = Descriptor.from_wire(value["config"])
        layers = _descriptors(value.get("layers", []), f"manifest {desc.digest} layers")
        for layer in layers:
            if layer.media_type not in LAYER_MEDIA_TYPES:
                raise InvalidArgument(f"manifest {desc.digest}: layer {layer.digest} has unsupported media type "
                                      f"{layer.media_type!r}")
        return cls(config=config, layers=layers)


def parse_index(data: bytes, desc: Descriptor) -> list[Descriptor]:
    """The manifests an index (or Docker manifest list) names.

    Raises: InvalidArgument for a malformed index.
    """
    value = _decode_json(data, desc, "index")
    return _descriptors(value.get("manifests", []), f"index {desc.digest} manifests")


def parse_diff_ids(data: bytes, desc: Descriptor) -> list[str]:
    """The config's ``rootfs.diff_ids``. Raises: InvalidArgument when absent or malformed."""
    value = _decode_json(data, desc, "config")
    rootfs = value.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or not isinstance(rootfs.get("diff_ids"), list):
        raise InvalidArgument(f"config {desc.digest}: rootfs must be {{type: layers, diff_ids: [...]}}")
    diff_ids = rootfs["diff_ids"]
    if not all(isinstance(d, str) for d in diff_ids):
        raise InvalidArgument(f"config {desc.digest}: diff_ids must be strings")
    return list(diff_ids)


def config_platform(data: bytes, desc: Descriptor) -> Platform | None:
    value = _decode_json(data, desc, "config")
    if isinstance(value.get("os"), str) and isinstance(value.get("architecture"), str):
        return Platform(os=value["os"], architecture=value["architecture"], variant=str(value.get("variant") or ""))
    return None


def select_manifests(manifests: Sequence[Descriptor], platform: Platform | None, *, all_platforms: bool
                     ) -> tuple[list[Descriptor], Descriptor | None]:
    """(manifests to fetch, the one to unpack). With ``all_platforms`` every image manifest is fetched;
    otherwise only the best match for ``platform`` (the host's when ``None``): an exact variant first,
    then one without a variant, in index order.

    Raises: NotFound when no manifest matches.
    """
    wanted = (platform or host_platform()).normalized()
    images = [m for m in manifests if m.media_type in MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES]
    matching = [m for m in images if m.platform is None or wanted.matches(m.platform)]
    matching.sort(key=lambda m: 0 if m.platform is not None and m.platform.normalized().variant == wanted.variant
                  else 1)
    best = matching[0] if matching else None
    if all_platforms:
        return images, best
    if best is None:
        offered = ", ".join(str(m.platform) for m in images if m.platform is not None) or "none"
        raise NotFound(f"no manifest for platform {wanted} (the index offers: {offered})")
    return [best], best


@dataclass
class PullResult:
    name: str
    target: Descriptor
    #: The top chain ID unpacked (empty when nothing was unpacked).
    chain_id: str = ""
    fetched: int = 0
    fetched_bytes: int = 0
    skipped: int = 0
    unpacked_layers: int = 0
    seconds: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target.to_wire(), "chain_id": self.chain_id,
                "fetched": self.fetched, "fetched_bytes": self.fetched_bytes, "skipped": self.skipped,
                "unpacked_layers": self.unpacked_layers, "seconds": self.seconds}


@dataclass
class _Layer:
    desc: Descriptor
    arrived: trio.Event = field(default_factory=trio.Event)


async def _no_chunks() -> AsyncIterator[bytes]:
    return
    yield  # an empty async generator


class Puller:
    """One pull of one image into one namespace (the caller sets the namespace context).

    ``content`` is the namespaced content store, ``snapshotter`` the namespaced snapshotter to unpack
    into (``None``: fetch only), ``applier`` the differ.
    """

    def __init__(self, *, content: Store, fetcher: BlobFetcher, applier: Applier,
                 snapshotter: NamespacedSnapshotter | None, snapshotter_name: str, images: ImageRecords,
                 leases: Leases, max_concurrent_downloads: int = 3, progress: Progress | None = None,
                 source: tuple[str, str] | None = None) -> None:
        self.content = content
        self.fetcher = fetcher
        self.applier = applier
        self.snapshotter = snapshotter
        self.snapshotter_name = snapshotter_name
        self.images = images
        self.leases = leases
        self.limiter = trio.CapacityLimiter(max(1, max_concurrent_downloads))
        self._progress = progress or (lambda event: None)
        #: ``berth.io/distribution.source.<host> = <repository>`` on every fetched blob, so a push to
        #: another repository of that registry can mount it instead of uploading it.
        self._source_labels = {f"berth.io/distribution.source.{source[0]}": source[1]} if source else {}
        self.result: PullResult | None = None

    def _report(self, **event: Any) -> None:
        self._progress(event)

    async def pull(self, name: str, root: Descriptor, *, platform: Platform | None = None,
                   all_platforms: bool = False) -> PullResult:
        """Fetch and (with a snapshotter) unpack ``root`` and record the image ``name``.

        Raises:
            NotFound: no manifest for the platform, or a blob the registry does not have.
            InvalidArgument: a malformed manifest, index or config, or one over its size limit.
            FailedPrecondition: a blob whose bytes do not match its digest, or a layer whose diff ID
                does not match the config (the snapshot is removed).
        On cancellation, downloads stop and keep what they wrote (a later pull resumes); the lease
        is released.
        """
        started = time.monotonic()
        self.result = PullResult(name=name, target=root)
        lease_id = f"pull-{uuid.uuid4().hex[:16]}"
        await self.leases.create(lease_id, {"berth.io/pull": name}, expires_in=24 * 3600)
        try:
            with with_lease(lease_id):
                await self._handle(root, platform, all_platforms, True)
                await self.images.put(name, root)
        finally:
            with trio.CancelScope(shield=True):
                await self.leases.delete(lease_id)
        self.result.seconds = time.monotonic() - started
        log.info("image_pulled", name=name, digest=root.digest, fetched=self.result.fetched,
                 skipped=self.result.skipped, seconds=round(self.result.seconds, 3))
        return self.result

    async def _handle(self, desc: Descriptor, platform: Platform | None, all_platforms: bool, unpack: bool) -> None:
        if desc.media_type in INDEX_MEDIA_TYPES:
            data = await self._fetch_small(desc, "index", MAX_MANIFEST_SIZE)
            chosen, best = select_manifests(parse_index(data, desc), platform, all_platforms=all_platforms)
            await self._label_children(desc, {f"berth.io/gc.ref.content.m.{i}": m.digest for i, m in enumerate(chosen)})
            async with trio.open_nursery() as nursery:
                for manifest in chosen:
                    nursery.start_soon(self._handle, manifest, platform, all_platforms,
                                       unpack and manifest is best)
        elif desc.media_type in MANIFEST_MEDIA_TYPES:
            await self._handle_manifest(desc, unpack=unpack)
        else:
            raise InvalidArgument(f"{desc.digest}: media type {desc.media_type!r} is not an image index or manifest")

    async def _handle_manifest(self, desc: Descriptor, *, unpack: bool) -> None:
        data = await self._fetch_small(desc, "manifest", MAX_MANIFEST_SIZE)
        manifest = Manifest.parse(data, desc)
        if manifest.config.media_type not in CONFIG_MEDIA_TYPES:
            raise InvalidArgument(f"manifest {desc.digest}: config media type {manifest.config.media_type!r} "
                                  "is not an image config")
        labels = {"berth.io/gc.ref.content.config": manifest.config.digest}
        labels.update({f"berth.io/gc.ref.content.l.{i}": layer.digest for i, layer in enumerate(manifest.layers)})
        await self._label_children(desc, labels)
        layers = [_Layer(layer) for layer in manifest.layers]
        async with trio.open_nursery() as nursery:
            for layer in layers:
                nursery.start_soon(self._fetch_layer, layer)
            config = await self._fetch_small(manifest.config, "config", MAX_CONFIG_SIZE)
            diff_ids = parse_diff_ids(config, manifest.config)
            if len(diff_ids) != len(layers):
                raise InvalidArgument(f"config {manifest.config.digest} lists {len(diff_ids)} diff IDs for "
                                      f"{len(layers)} layers in manifest {desc.digest}")
            if unpack and self.snapshotter is not None:
                nursery.start_soon(self._unpack, manifest.config, layers, diff_ids)

    async def _fetch_layer(self, layer: _Layer) -> None:
        await self._fetch(layer.desc, "layer")
        layer.arrived.set()

    async def _fetch_small(self, desc: Descriptor, kind: str, limit: int) -> bytes:
        if desc.size > limit:
            raise InvalidArgument(f"{kind} {desc.digest} is {desc.size} bytes, over the {limit}-byte limit")
        await self._fetch(desc, kind)
        reader = await self.content.reader_at(desc.digest)
        try:
            return await reader.read_at(0, desc.size)
        finally:
            await reader.close()

    async def _fetch(self, desc: Descriptor, kind: str) -> None:
        """Copy one blob into the content store (resuming an earlier ingest), verified by digest."""
        assert self.result is not None
        ref = f"{kind}-{desc.digest}"
        async with self.limiter:
            try:
                writer = await self.content.writer(ref, total=desc.size, expected=desc.digest)
            except AlreadyExists:
                self.result.skipped += 1
                self._report(ref=ref, status="exists", offset=desc.size, total=desc.size)
                return
            try:
                offset = writer.status().offset
                if offset > desc.size:  # not this blob's bytes: start over
                    await writer.truncate(0)
                    offset = 0
                written = offset
                self._report(ref=ref, status="downloading", offset=written, total=desc.size)
                last_report = time.monotonic()
                batch = bytearray()
                # An ingest already holding every byte (killed before its commit) only needs the commit.
                chunks = self.fetcher.fetch(desc, offset) if offset < desc.size else _no_chunks()
                async for chunk in chunks:
                    batch += chunk
                    if len(batch) >= _WRITE_BATCH:
                        await writer.write(bytes(batch))
                        written += len(batch)
                        batch.clear()
                        if time.monotonic() - last_report >= _PROGRESS_INTERVAL:
                            last_report = time.monotonic()
                            self._report(ref=ref, status="downloading", offset=written, total=desc.size)
                        if written > desc.size:
                            break
                if batch:
                    await writer.write(bytes(batch))
                    written += len(batch)
                try:
                    await writer.commit(desc.size, desc.digest, labels=self._source_labels)
                except FailedPrecondition as err:
                    with trio.CancelScope(shield=True):
                        await self.content.abort(ref)
                    raise FailedPrecondition(f"{kind} {desc.digest} from the registry does not match its "
                                             f"descriptor: {err.message}") from None
                except AlreadyExists:
                    self.result.skipped += 1
                    return
            finally:
                with trio.CancelScope(shield=True):
                    await writer.close()
        self.result.fetched += 1
        self.result.fetched_bytes += desc.size - offset
        self._report(ref=ref, status="done", offset=desc.size, total=desc.size)

    async def _label_children(self, desc: Descriptor, labels: Mapping[str, str]) -> None:
        if labels:
            await self.content.update(ContentInfo(digest=desc.digest, size=desc.size, created_at=0, updated_at=0,
                                                  labels=dict(labels)), [f"labels.{key}" for key in labels])

    async def _unpack(self, config: Descriptor, layers: Sequence[_Layer], diff_ids: Sequence[str]) -> None:
        assert self.snapshotter is not None
        assert self.result is not None
        chain = chain_ids(diff_ids)
        parent = ""
        for index, (layer, diff_id, chain_id) in enumerate(zip(layers, diff_ids, chain, strict=True)):
            ref = f"unpack-{chain_id}"
            if not await self._snapshot_exists(chain_id):
                await layer.arrived.wait()
                self._report(ref=ref, status="unpacking", layer=index, total=len(layers))
                await self._apply(layer.desc, diff_id, chain_id, parent)
                self.result.unpacked_layers += 1
            else:
                self._report(ref=ref, status="unpacked", layer=index, total=len(layers))
            parent = chain_id
        self.result.chain_id = chain[-1] if chain else ""
        if chain:
            await self._label_children(config, {f"berth.io/gc.ref.snapshot.{self.snapshotter_name}": chain[-1]})

    async def _snapshot_exists(self, chain_id: str) -> bool:
        assert self.snapshotter is not None
        try:
            await self.snapshotter.stat(chain_id)
        except NotFound:
            return False
        return True

    async def _apply(self, desc: Descriptor, diff_id: str, chain_id: str, parent: str) -> None:
        assert self.snapshotter is not None
        key = f"extract-{uuid.uuid4().hex[:12]} {chain_id}"
        mounts = await self.snapshotter.prepare(key, parent)
        try:
            await self.applier.apply(desc, mounts, expected_diff_id=diff_id)
            await self.snapshotter.commit(chain_id, key)
        except BaseException as err:
            # Whatever stopped the layer (a wrong diff ID, cancellation, or another pull committing the
            # same chain ID first), the extraction key goes; only that last case is not a failure.
            with trio.CancelScope(shield=True):
                try:
                    await self.snapshotter.remove(key)
                except BerthError as cleanup:
                    log.warning("unpack_cleanup_failed", key=key, error=str(cleanup))
            if not isinstance(err, AlreadyExists):
                raise
        await self._label_children(desc, {"berth.io/uncompressed": diff_id})
