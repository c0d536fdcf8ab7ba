"""The walking differ: apply tar layers into snapshots (and, in :mod:`.compare`, compute them).

Where a layer goes is decided by the snapshot's mounts:

* one ``overlay`` mount with ``upperdir=``: written straight into the upperdir, no mount, with overlay
  whiteouts (0/0 character devices, the ``overlay.opaque`` xattr; ``user.overlay.`` with ``userxattr``);
* one ``bind`` mount (overlayfs without a parent, native): written straight into its source, whiteouts
  as deletions;
* anything else (btrfs, ...): mounted on a temporary directory, applied with whiteouts as deletions,
  and always unmounted afterwards, also on error or cancellation.

Bytes flow from the trio task through a bounded pipe to a decompress thread (hashes the blob and the
uncompressed stream) and through a second bounded pipe to an extract thread, so the event loop stays free
and a layer can be applied while it downloads.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from berth.core.content import Store
from berth.core.errdefs import FailedPrecondition, InvalidArgument
from berth.core.oci import Descriptor, layer_compression
from berth.core.snapshots.mount import amount_all, aunmount_all
from berth.core.snapshots.snapshotter import Mount

from .extract import Extractor, TarSource
from .stream import BytePipe, PipeAborted, StreamDigests, decompress_into

__all__ = ["ApplyResult", "WalkingDiffer"]

#: Bytes queued between the reader and the decompress thread, and between it and the extract thread.
_PIPE_LIMIT = 4 << 20
#: Size of reads from the content store.
_READ_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What an apply measured: the layer's diff ID, the blob's digest and size (compressed)."""

    diff_id: str
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class _Target:
    root: str
    overlay: bool
    lowers: tuple[str, ...] = ()
    xattr_prefix: str = "trusted.overlay."


def _direct_target(mounts: Sequence[Mount]) -> _Target | None:
    """The directory to write into without mounting, or None when the mounts need a real mount."""
    if len(mounts) != 1 or mounts[0].target:
        return None
    mount = mounts[0]
    if "ro" in mount.options:
        raise InvalidArgument(f"cannot apply a layer to a read-only mount of {mount.source}")
    if mount.type == "bind" or "bind" in mount.options or "rbind" in mount.options:
        return _Target(root=mount.source, overlay=False)
    if mount.type != "overlay":
        return None
    options = {key: value for key, _, value in (option.partition("=") for option in mount.options)}
    upper = options.get("upperdir")
    if not upper:
        return None
    lowers = tuple(lower for lower in options.get("lowerdir", "").split(":") if lower)
    prefix = "user.overlay." if "userxattr" in options else "trusted.overlay."
    return _Target(root=upper, overlay=True, lowers=lowers, xattr_prefix=prefix)


class WalkingDiffer:
    """Applies layers into snapshots (``apply``, ``apply_stream``) and computes them (``compare``).

    ``content`` is the content store :meth:`apply` reads blobs from and :meth:`compare` writes layers to
    (:meth:`apply_stream` needs none); ``allow_devices`` lets layers create device nodes; ``scratch`` is
    where temporary mount points are made (the system temp dir when None).
    """

    def __init__(self, content: Store | None = None, *, allow_devices: bool = False,
                 scratch: Path | None = None) -> None:
        self.content = content
        self.allow_devices = allow_devices
        self.scratch = scratch

    async def apply(self, desc: Descriptor, mounts: Sequence[Mount], *, expected_diff_id: str = "") -> str:
        """Apply the committed blob ``desc`` into the snapshot behind ``mounts``; returns its diff ID.

        Raises: as :meth:`apply_stream`, and NotFound when the blob is not in the content store.
        """
        result = await self.apply_stream(mounts, desc.media_type, self._read_blob(desc),
                                         expected_diff_id=expected_diff_id, expected_digest=desc.digest,
                                         expected_size=desc.size)
        return result.diff_id

    def _store(self) -> Store:
        if self.content is None:
            raise FailedPrecondition("this differ has no content store")
        return self.content

    async def _read_blob(self, desc: Descriptor) -> AsyncIterable[bytes]:
        reader = await self._store().reader_at(desc.digest)
        try:
            offset = 0
            while offset < reader.size:
                data = await reader.read_at(offset, min(_READ_SIZE, reader.size - offset))
                if not data:
                    break
                offset += len(data)
                yield data
        finally:
            await reader.close()

    async def apply_stream(self, mounts: Sequence[Mount], media_type: str, chunks: AsyncIterable[bytes], *,
                           expected_diff_id: str = "", expected_digest: str = "",
                           expected_size: int = -1) -> ApplyResult:
        """Apply the layer whose (possibly compressed) bytes ``chunks`` yields, as they arrive.

        ``media_type`` picks the decompressor. The whole stream is read (and hashed) even after the tar's
        end. Raises InvalidArgument for an unsupported media type, a corrupt stream or a refused entry
        (named in the message; nothing outside the snapshot is touched); FailedPrecondition when the diff
        ID, digest or size differs from the expected one (naming both); ResourceExhausted when the disk
        fills; any error of ``chunks`` itself. On any error or cancellation the worker threads stop and a
        temporary mount is undone; the snapshot holds a partial layer and must be removed by the caller.
        """
        compression = layer_compression(media_type)
        target = _direct_target(mounts)
        if target is not None:
            result = await self._run(target, compression, chunks)
        else:
            mount_point = Path(await trio.to_thread.run_sync(
                lambda: tempfile.mkdtemp(prefix="berth-apply-", dir=self.scratch)))
            try:
                await amount_all(mounts, mount_point)
                try:
                    result = await self._run(_Target(root=str(mount_point), overlay=False), compression, chunks)
                finally:
                    with trio.CancelScope(shield=True):
                        await aunmount_all(mount_point)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(os.rmdir, mount_point)
        if expected_digest and result.digest != expected_digest:
            raise FailedPrecondition(f"layer digest mismatch: expected {expected_digest}, got {result.digest}")
        if expected_size >= 0 and result.size != expected_size:
            raise FailedPrecondition(f"layer {expected_digest or ''} size mismatch: expected {expected_size} "
                                     f"bytes, got {result.size}")
        if expected_diff_id and result.diff_id != expected_diff_id:
            raise FailedPrecondition(f"wrong diff id: expected {expected_diff_id}, got {result.diff_id}")
        return result

    async def _run(self, target: _Target, compression: str, chunks: AsyncIterable[bytes]) -> ApplyResult:
        token = trio.lowlevel.current_trio_token()
        compressed = BytePipe(_PIPE_LIMIT, token)
        plain = BytePipe(_PIPE_LIMIT)
        digests = StreamDigests()
        errors: list[BaseException] = []

        def fail(error: BaseException) -> None:
            if not isinstance(error, (PipeAborted, trio.Cancelled)):
                errors.append(error)
            compressed.abort()
            plain.abort()

        async def feed() -> None:
            try:
                async for chunk in chunks:
                    await compressed.aput(chunk)
                compressed.close()
            except BaseException as error:
                fail(error)
                if isinstance(error, trio.Cancelled):
                    raise

        async def decompress(done: trio.Event) -> None:
            try:
                await trio.to_thread.run_sync(decompress_into, compression, compressed, plain, digests)
            except BaseException as error:
                fail(error)
                if isinstance(error, trio.Cancelled):
                    raise
            finally:
                done.set()

        def extract() -> None:
            Extractor(target.root, overlay=target.overlay, lowers=target.lowers, xattr_prefix=target.xattr_prefix,
                      allow_devices=self.allow_devices).run(TarSource(plain))

        async def watchdog() -> None:
            try:
                await trio.sleep_forever()
            finally:  # cancelled: stop both threads
                compressed.abort()
                plain.abort()

        decompressed = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog)
            nursery.start_soon(feed)
            nursery.start_soon(decompress, decompressed)
            try:
                await trio.to_thread.run_sync(extract)
            except BaseException as error:
                fail(error)
                if isinstance(error, trio.Cancelled):
                    raise
            await decompressed.wait()  # the extract thread drained the stream, or the pipes are aborted
            nursery.cancel_scope.cancel()
        if errors:
            raise errors[0]
        return ApplyResult(diff_id=digests.diff_id, digest=digests.digest, size=digests.size)
