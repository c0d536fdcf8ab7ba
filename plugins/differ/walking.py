"""The walking differ: apply tar layers into snapshots (and, in :mod:`.compare`, compute them).

Where a layer goes is decided by the snapshot's mounts:

* one ``overlay`` mount with ``upperdir=``: written straight into the upperdir, no mount, with overlay
  whiteouts (0/0 character devices, the ``overlay.opaque`` xattr; ``user.overlay.`` with ``userxattr``);
* one ``bind`` mount (overlayfs without a parent, native): written straight into its source, whiteouts
  as deletions;
* anything else (btrfs, ...): mounted on a temporary directory, applied with whiteouts as deletions,
  and always unmounted afterwards, also on error or cancellation.

Bytes flow from the trio task through a bounded pipe to one worker thread that hashes the blob,
decompresses, hashes the tar and extracts it, so the event loop stays free and a layer can be applied while
it downloads.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from berth.core.content import Store, Writer, read_blob
from berth.core.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from berth.core.oci import OCI_LAYER_GZIP, Descriptor, layer_compression
from berth.core.snapshots.mount import amount_all, unmount, unmount_all
from berth.core.snapshots.snapshotter import Mount

from .compare import LayerWriter, walk_double, walk_upper
from .extract import Extractor
from .stream import BytePipe, PipeAborted, StreamDigests, decompressed
from .tarstream import TarSource

__all__ = ["UNCOMPRESSED_LABEL", "ApplyResult", "CompareResult", "WalkingDiffer"]

#: Content label naming a compressed layer's diff ID (containerd's ``containerd.io/uncompressed``).
UNCOMPRESSED_LABEL = "berth.io/uncompressed"
#: Bytes queued between the reader and the worker thread.
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
class CompareResult:
    """A layer written by :meth:`WalkingDiffer.compare`: its descriptor and its diff ID."""

    descriptor: Descriptor
    diff_id: str


@dataclass(frozen=True, slots=True)
class _Target:
    root: str
    overlay: bool
    lowers: tuple[str, ...] = ()
    xattr_prefix: str = "trusted.overlay."


def _is_bind(mount: Mount) -> bool:
    return mount.type == "bind" or "bind" in mount.options or "rbind" in mount.options


def _options(mount: Mount) -> dict[str, str]:
    return {key: value for key, _, value in (option.partition("=") for option in mount.options)}


def _lowers(options: dict[str, str]) -> tuple[str, ...]:
    return tuple(lower for lower in options.get("lowerdir", "").split(":") if lower)


def _layer_dirs(mounts: Sequence[Mount]) -> tuple[str, ...] | None:
    """The directories (top first) that make up a read-only view given by ``mounts``, when they can be
    named without mounting: none, one bind, or one overlay. None otherwise."""
    if not mounts:
        return ()
    if len(mounts) != 1 or mounts[0].target:
        return None
    mount = mounts[0]
    if _is_bind(mount):
        return (mount.source,)
    if mount.type != "overlay":
        return None
    options = _options(mount)
    lowers = _lowers(options)
    return (options["upperdir"], *lowers) if options.get("upperdir") else lowers


def _direct_target(mounts: Sequence[Mount]) -> _Target | None:
    """The directory to write into without mounting, or None when the mounts need a real mount."""
    if len(mounts) != 1 or mounts[0].target:
        return None
    mount = mounts[0]
    if _is_bind(mount):
        return _Target(root=mount.source, overlay=False)
    if mount.type != "overlay":
        return None
    options = _options(mount)
    upper = options.get("upperdir")
    if not upper:
        return None
    prefix = "user.overlay." if "userxattr" in options else "trusted.overlay."
    return _Target(root=upper, overlay=True, lowers=_lowers(options), xattr_prefix=prefix)


def _unmount_in_reverse(mounts: Sequence[Mount], mount_point: Path) -> None:
    """Undo :func:`mount_all`: submounts first, then whatever is left stacked on the mount point."""
    for m in reversed(mounts):
        if m.target:
            unmount(mount_point / m.target.lstrip("/"))
    unmount_all(mount_point)


def _read_only(mounts: Sequence[Mount]) -> list[Mount]:
    return [replace(m, options=(*(o for o in m.options if o != "rw"), "ro")) if "ro" not in m.options else m
            for m in mounts]


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
        async with contextlib.aclosing(read_blob(self._store(), desc.digest, chunk_size=_READ_SIZE)) as blob:
            result = await self.apply_stream(mounts, desc.media_type, blob, expected_diff_id=expected_diff_id,
                                             expected_digest=desc.digest, expected_size=desc.size)
        return result.diff_id

    @contextlib.asynccontextmanager
    async def _mounted(self, mounts: Sequence[Mount], prefix: str) -> AsyncIterator[str]:
        """Mount ``mounts`` on a fresh temporary directory; unmounted and removed on the way out, whatever
        happens (shielded from cancellation)."""
        mount_point = Path(await trio.to_thread.run_sync(
            lambda: tempfile.mkdtemp(prefix=prefix, dir=self.scratch)))
        try:
            await amount_all(mounts, mount_point)
            try:
                yield str(mount_point)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_unmount_in_reverse, mounts, mount_point)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(os.rmdir, mount_point)

    def _store(self) -> Store:
        if self.content is None:
            raise FailedPrecondition("this differ has no content store")
        return self.content

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
        if any("ro" in m.options for m in mounts):
            raise InvalidArgument("cannot apply a layer to read-only mounts (a view, not a prepared snapshot)")
        if target is not None:
            result = await self._run(target, compression, chunks)
        else:
            async with self._mounted(mounts, "berth-apply-") as mount_point:
                result = await self._run(_Target(root=mount_point, overlay=False), compression, chunks)
        if expected_digest and result.digest != expected_digest:
            raise FailedPrecondition(f"layer digest mismatch: expected {expected_digest}, got {result.digest}")
        if expected_size >= 0 and result.size != expected_size:
            raise FailedPrecondition(f"layer {expected_digest or ''} size mismatch: expected {expected_size} "
                                     f"bytes, got {result.size}")
        if expected_diff_id and result.diff_id != expected_diff_id:
            raise FailedPrecondition(f"wrong diff id: expected {expected_diff_id}, got {result.diff_id}")
        return result

    async def compare(self, lower: Sequence[Mount], upper: Sequence[Mount], *, media_type: str = OCI_LAYER_GZIP,
                      ref: str = "", labels: Mapping[str, str] | None = None) -> CompareResult:
        """Write the layer of changes from the snapshot behind ``lower`` (``[]``: empty) to the one behind
        ``upper`` into the content store, compressed as ``media_type`` says (gzip by default).

        The blob is labelled ``berth.io/uncompressed=<diff ID>`` (plus ``labels``); an existing identical
        blob is kept and gets the label. When ``upper`` is an overlay on exactly ``lower``, only its upperdir
        is walked; otherwise both trees are walked (mounted read-only on temporary directories when they
        are not single binds). Raises InvalidArgument for an unsupported media type, FailedPrecondition
        without a content store, store and mount errors as they come. On error or cancellation the walk
        stops, the ingest is aborted and temporary mounts are undone.
        """
        compression = layer_compression(media_type)
        store = self._store()
        lower_dirs, upper_dirs = _layer_dirs(lower), _layer_dirs(upper)
        overlay = None
        if upper_dirs is not None and len(upper_dirs) > 1 and lower_dirs == upper_dirs[1:]:
            overlay = _direct_target(upper)
        async with contextlib.AsyncExitStack() as stack:
            if overlay is not None and overlay.overlay:
                upper_root = overlay.root

                def walk(out: LayerWriter) -> None:
                    walk_upper(upper_root, out, overlay.xattr_prefix + "opaque")
            else:
                lower_root: str | None = None
                if lower:
                    lower_root = lower_dirs[0] if lower_dirs is not None and len(lower_dirs) == 1 else \
                        await stack.enter_async_context(self._mounted(_read_only(lower), "berth-lower-"))
                upper_root = upper_dirs[0] if upper_dirs is not None and len(upper_dirs) == 1 else \
                    await stack.enter_async_context(self._mounted(_read_only(upper), "berth-upper-"))

                def walk(out: LayerWriter) -> None:
                    walk_double(lower_root, upper_root, out)
            digests, chunks = StreamDigests(), BytePipe(_PIPE_LIMIT, trio.lowlevel.current_trio_token())
            ref = ref or f"compare-{uuid.uuid4().hex}"
            writer = await store.writer(ref)
            try:
                await self._pump(walk, compression, chunks, digests, writer)
                all_labels = {**(labels or {}), UNCOMPRESSED_LABEL: digests.diff_id}
                try:
                    await writer.commit(digests.size, expected=digests.digest, labels=all_labels)
                except AlreadyExists:
                    info = await store.info(digests.digest)
                    missing = {key: value for key, value in all_labels.items() if info.labels.get(key) != value}
                    if missing:
                        await store.update(replace(info, labels={**info.labels, **missing}),
                                           [f"labels.{key}" for key in missing])
            except BaseException:
                with trio.CancelScope(shield=True):
                    await writer.close()
                    with contextlib.suppress(NotFound):
                        await store.abort(ref)
                raise
        descriptor = Descriptor(media_type=media_type, digest=digests.digest, size=digests.size)
        return CompareResult(descriptor=descriptor, diff_id=digests.diff_id)

    async def _pump(self, walk: Callable[[LayerWriter], None], compression: str, chunks: BytePipe,
                    digests: StreamDigests, writer: Writer) -> None:
        """Run ``walk`` in a thread writing the compressed tar into ``chunks``, and copy them to ``writer``."""
        errors: list[BaseException] = []

        def produce() -> None:
            out = LayerWriter(compression, chunks, digests)
            walk(out)
            out.finish()

        async def run_walk() -> None:
            try:
                await trio.to_thread.run_sync(produce)
            except BaseException as error:
                if not isinstance(error, (PipeAborted, trio.Cancelled)):
                    errors.append(error)
                chunks.abort()
                if isinstance(error, trio.Cancelled):
                    raise

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_walk)
            try:
                while data := await chunks.aread():
                    await writer.write(bytes(data))
            except BaseException as error:
                if not isinstance(error, PipeAborted):
                    chunks.abort()
                    raise
        if errors:
            raise errors[0]

    async def _run(self, target: _Target, compression: str, chunks: AsyncIterable[bytes]) -> ApplyResult:
        """Feed ``chunks`` through a bounded pipe to one worker thread that decompresses, hashes and
        extracts. (A separate decompress thread was measured: under the GIL the hand-offs cost more than
        the overlap gained, on an idle machine and more so on a busy one.)"""
        compressed = BytePipe(_PIPE_LIMIT, trio.lowlevel.current_trio_token())
        digests = StreamDigests()
        errors: list[BaseException] = []

        def fail(error: BaseException) -> None:
            if not isinstance(error, (PipeAborted, trio.Cancelled)):
                errors.append(error)
            compressed.abort()

        async def feed() -> None:
            try:
                async for chunk in chunks:
                    await compressed.aput(chunk)
                compressed.close()
            except BaseException as error:
                fail(error)
                if isinstance(error, trio.Cancelled):
                    raise

        def extract() -> None:
            pieces = decompressed(compression, compressed, digests)
            Extractor(target.root, overlay=target.overlay, lowers=target.lowers, xattr_prefix=target.xattr_prefix,
                      allow_devices=self.allow_devices).run(TarSource(lambda: next(pieces, b"")))

        async def watchdog() -> None:
            try:
                await trio.sleep_forever()
            finally:  # cancelled: stop the worker thread at its next read
                compressed.abort()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog)
            nursery.start_soon(feed)
            try:
                await trio.to_thread.run_sync(extract)
            except BaseException as error:
                fail(error)
                if isinstance(error, trio.Cancelled):
                    raise
            nursery.cancel_scope.cancel()
        if errors:
            raise errors[0]
        return ApplyResult(diff_id=digests.diff_id, digest=digests.digest, size=digests.size)
