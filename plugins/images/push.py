"""Push: copy an image's blobs to a registry, then its manifests, children before parents.

Blobs (configs and layers) go first, in parallel under a bound; one the registry has already is skipped
(a ``HEAD``), one that came from another repository of the same registry is mounted from there when the
registry allows (the ``berth.io/distribution.source.<host>`` label a pull left on it); the rest is
uploaded from the content store. Then each manifest, and last the index, so a tag never names something
incomplete. Only what is present locally is pushed: an index pulled for one platform is pushed with the
manifests berth has, as containerd does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import trio

from berth.core.content import Store, read_blob
from berth.core.oci import INDEX_MEDIA_TYPES, MANIFEST_MEDIA_TYPES, Descriptor
from berth.plugins.images.tree import present_tree, read_small

log = structlog.get_logger("berth.images.push")

SOURCE_LABEL_PREFIX = "berth.io/distribution.source."
_CHUNK = 1 << 20

Progress = Callable[[dict[str, Any]], None]


class BlobPusher(Protocol):
    """Pushes to one repository."""

    async def exists(self, desc: Descriptor) -> bool: ...

    async def push_blob(self, desc: Descriptor, chunks: AsyncIterator[bytes], *,
                        mount_from: str | None = None) -> None: ...

    async def push_manifest(self, desc: Descriptor, data: bytes, *, tag: str | None = None) -> None: ...


@dataclass
class PushResult:
    name: str
    target: Descriptor
    pushed: int = 0
    pushed_bytes: int = 0
    skipped: int = 0
    mounted: int = 0
    seconds: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target.to_wire(), "pushed": self.pushed,
                "pushed_bytes": self.pushed_bytes, "skipped": self.skipped, "mounted": self.mounted,
                "seconds": self.seconds}


class Pusher:
    """One push of one image from a (namespaced) content store to ``pusher``'s repository."""

    def __init__(self, *, content: Store, pusher: BlobPusher, host: str, repository: str,
                 max_concurrent_uploads: int = 3, progress: Progress | None = None) -> None:
        self.content = content
        self.pusher = pusher
        self.host = host
        self.repository = repository
        self.limiter = trio.CapacityLimiter(max(1, max_concurrent_uploads))
        self._progress = progress or (lambda event: None)

    async def push(self, name: str, target: Descriptor, tag: str | None) -> PushResult:
        """Push ``target`` and everything it references that is present, tagging it ``tag``.

        Raises: NotFound (a needed blob is missing locally), the registry's errors (PermissionDenied,
        Unavailable, ...). On cancellation, uploads in flight are abandoned (the registry drops them).
        """
        started = time.monotonic()
        result = PushResult(name=name, target=target)
        tree = await present_tree(self.content, target)
        manifests = [d for d in tree if d.media_type in MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES]
        blobs = [d for d in tree if d not in manifests]
        async with trio.open_nursery() as nursery:
            for desc in blobs:
                nursery.start_soon(self._push_blob, desc, result)
        for desc in reversed(manifests):  # children first: the tree lists parents before children
            data = await read_small(self.content, desc)
            await self.pusher.push_manifest(desc, data, tag=tag if desc.digest == target.digest else None)
            result.pushed += 1
            self._progress({"ref": f"manifest-{desc.digest}", "status": "done", "offset": desc.size,
                            "total": desc.size})
        result.seconds = time.monotonic() - started
        log.info("image_pushed", name=name, digest=target.digest, pushed=result.pushed, skipped=result.skipped,
                 mounted=result.mounted, seconds=round(result.seconds, 3))
        return result

    async def _push_blob(self, desc: Descriptor, result: PushResult) -> None:
        ref = f"blob-{desc.digest}"
        async with self.limiter:
            if await self.pusher.exists(desc):
                result.skipped += 1
                self._progress({"ref": ref, "status": "exists", "offset": desc.size, "total": desc.size})
                return
            info = await self.content.info(desc.digest)
            source = info.labels.get(SOURCE_LABEL_PREFIX + self.host, "")
            mount_from = source if source and source != self.repository else None
            self._progress({"ref": ref, "status": "uploading", "offset": 0, "total": desc.size})
            sent = 0

            async def chunks() -> AsyncIterator[bytes]:
                nonlocal sent
                async for chunk in read_blob(self.content, desc.digest, chunk_size=_CHUNK):
                    sent += len(chunk)
                    yield chunk

            await self.pusher.push_blob(desc, chunks(), mount_from=mount_from)
            if mount_from is not None and sent == 0 and desc.size:  # the registry mounted it: no byte was read
                result.mounted += 1
            else:
                result.pushed += 1
                result.pushed_bytes += desc.size
            self._progress({"ref": ref, "status": "done", "offset": desc.size, "total": desc.size})
