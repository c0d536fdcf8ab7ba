"""The overlayfs snapshotter, after containerd's ``plugins/snapshots/overlay/overlay.go``.

Layout under ``root``::

    metadata.db              the metastore (:mod:`berth.core.snapshots.storage`)
    snapshots/<id>/fs        a snapshot's own layer: the upperdir of an active snapshot
    snapshots/<id>/work      the overlay workdir (active snapshots only)
    snapshots/new-XXXXXXXX   a snapshot being created (renamed to ``<id>`` once recorded)

Mounts (containerd's rules): no parent → a ``bind`` of ``fs`` (``rw``, or ``ro`` for a view); an
active snapshot with parents → ``overlay`` with ``workdir``, ``upperdir`` and ``lowerdir`` (nearest
parent first), then the configured options; a view of one parent → a read-only bind of that parent's
``fs``; a view of several → ``overlay`` with only ``lowerdir`` (read-only by nature).

A directory is made before the transaction recording it commits and removed after the transaction
forgetting it commits, so a crash leaves at most an orphaned directory for :meth:`cleanup`. With
``sync_remove`` off (the default) :meth:`OverlaySnapshotter.remove` only drops the record and
:meth:`cleanup` reclaims the disk later, as containerd's ``AsynchronousRemove`` does.

The helpers :func:`disk_usage`, :func:`remove_dir`, :func:`rename_into_place` and
:func:`default_platform` are shared with the native snapshotter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import os
import platform
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
import trio

from berth.core.directories import make_spread_directory
from berth.core.errdefs import FailedPrecondition
from berth.core.snapshots.mount import MountError, mount, unmount, unmount_all
from berth.core.snapshots.snapshotter import Info, Kind, Mount, Usage
from berth.core.snapshots.storage import (
    MetaStore,
    Snapshot,
    commit_active,
    create_snapshot,
    get_info,
    get_snapshot,
    id_map,
    remove,
    update_info,
    walk_info,
)

__all__ = [
    "UPPERDIR_LABEL",
    "OverlaySnapshotter",
    "check_supported",
    "default_platform",
    "disk_usage",
    "remove_dir",
    "rename_into_place",
    "supports_dtype",
]

log = structlog.get_logger("berth.snapshotter.overlayfs")

#: Label carrying a snapshot's upperdir, on Stat/Update/Walk results when ``upperdir_label`` is set.
UPPERDIR_LABEL = "berth.io/snapshot/overlay.upperdir"

_INDEX_PARAMETER = Path("/sys/module/overlay/parameters/index")
_BLOCK_UNIT = 512  # st_blocks counts 512-byte units
_DT_UNKNOWN = 0

# ------------------------------------------------------------------------------ shared helpers


def disk_usage(root: Path) -> Usage:
    """Space allocated under ``root`` (``root`` included), as containerd's ``fs.DiskUsage``.

    Every inode is counted once (hardlinks too): ``size`` is the sum of ``st_blocks * 512`` of all
    of them, whatever their type, and ``inodes`` their number. Entries that vanish during the walk
    are skipped. Blocks.
    """
    seen: set[tuple[int, int]] = set()
    size = 0
    top = os.lstat(root)
    seen.add((top.st_dev, top.st_ino))
    size += top.st_blocks * _BLOCK_UNIT
    stack = [os.fspath(root)] if stat.S_ISDIR(top.st_mode) else []
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    key = (st.st_dev, st.st_ino)
                    if key not in seen:
                        seen.add(key)
                        size += st.st_blocks * _BLOCK_UNIT
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
        except FileNotFoundError:
            continue
    return Usage(size=size, inodes=len(seen))


def _ignore_missing(function: Callable[..., Any], path: str,
                    exc_info: tuple[type[BaseException], BaseException, TracebackType]) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def _rmtree(path: Path) -> None:
    """``shutil.rmtree`` that tolerates entries removed concurrently (and a missing ``path``)."""
    shutil.rmtree(path, onerror=_ignore_missing)


def _mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first."""
    top = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == top or point.startswith(top + "/"):
                found.append(point)
    return [Path(p) for p in sorted(found, key=len, reverse=True)]


def remove_dir(path: Path) -> bool:
    """Remove ``path`` and everything below it; never raises. Blocks.

    A removal that fails because something is mounted below ``path`` is retried after lazily
    unmounting those mounts (containerd's ``removeCleanupDir``). Returns whether ``path`` is gone;
    failures are logged.
    """
    try:
        _rmtree(path)
        return True
    except OSError as exc:
        first = exc
    busy = _mounts_under(path)
    if not busy and first.errno != errno.EBUSY:
        log.warning("snapshot_dir_remove_failed", path=str(path), error=str(first))
        return False
    log.warning("snapshot_dir_busy", path=str(path), error=str(first), mounts=len(busy))
    try:
        for point in busy:
            unmount(point, detach=True)
        _rmtree(path)
    except OSError as exc:
        log.warning("snapshot_dir_remove_failed", path=str(path), error=str(exc))
        return False
    return True


_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
                  "armv7l": "arm/v7", "armv6l": "arm/v6", "i386": "386", "i686": "386"}


def default_platform() -> str:
    """This host's platform as ``os/arch[/variant]`` (containerd's ``platforms.DefaultSpec``)."""
    machine = platform.machine()
    return f"linux/{_ARCHITECTURES.get(machine, machine)}"


# --------------------------------------------------------------------------------- host checks


class _Dirent64(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.opendir.restype = ctypes.c_void_p
_libc.readdir64.argtypes = [ctypes.c_void_p]
_libc.readdir64.restype = ctypes.POINTER(_Dirent64)
_libc.closedir.argtypes = [ctypes.c_void_p]


def supports_dtype(directory: Path) -> bool:
    """Whether the filesystem of ``directory`` fills ``d_type`` in directory entries (continuity's
    ``fs.SupportsDType``: make a file there, read the directory, look for ``DT_UNKNOWN``). Blocks.

    Raises: OSError if the directory cannot be read.
    """
    fd, name = tempfile.mkstemp(prefix=".dtype-check-", dir=directory)
    os.close(fd)
    try:
        handle = _libc.opendir(os.fsencode(directory))
        if not handle:
            err = ctypes.get_errno()
            raise OSError(err, f"opendir {directory}: {os.strerror(err)}")
        visited = False
        try:
            while True:
                ctypes.set_errno(0)
                entry = _libc.readdir64(handle)
                if not entry:
                    err = ctypes.get_errno()
                    if err:
                        raise OSError(err, f"readdir {directory}: {os.strerror(err)}")
                    break
                visited = True
                if entry.contents.d_type == _DT_UNKNOWN:
                    return False
        finally:
            _libc.closedir(handle)
    finally:
        os.unlink(name)
    if not visited:
        raise OSError(errno.EIO, f"no directory entry read from {directory}")
    return True


def _probe_overlay(root: Path, extra: Sequence[str] = ()) -> None:
    """Mount a two-lower overlay in a scratch directory under ``root`` and unmount it (containerd's
    ``SupportsMultipleLowerDir``). Blocks. Raises: MountError."""
    scratch = Path(tempfile.mkdtemp(prefix="overlay-check-", dir=root))
    try:
        for name in ("lower1", "lower2", "upper", "work", "merged"):
            (scratch / name).mkdir(mode=0o755)
        merged = scratch / "merged"
        options = (f"lowerdir={scratch / 'lower2'}:{scratch / 'lower1'}", f"upperdir={scratch / 'upper'}",
                   f"workdir={scratch / 'work'}", *extra)
        mount(Mount(type="overlay", source="overlay", options=options), merged)
        try:
            unmount_all(merged)
        except MountError as exc:
            log.warning("overlay_check_unmount_failed", path=str(merged), error=str(exc))
            unmount(merged, detach=True)
    finally:
        remove_dir(scratch)


def _running_in_userns() -> bool:
    """containerd's ``userns.RunningInUserNS``: anything but the full identity uid map."""
    try:
        with open("/proc/self/uid_map") as f:
            fields = f.read().split()
    except OSError:
        return False
    return fields != ["0", "0", "4294967295"]


def needs_userxattr(root: Path) -> bool:
    """Whether overlay mounts need ``userxattr`` (containerd's ``NeedsUserXAttr``): only inside a
    user namespace, and only when the kernel accepts the option there. Blocks."""
    if not _running_in_userns():
        return False
    try:
        _probe_overlay(root, ("ro", "userxattr"))
    except MountError:
        return False
    return True


def check_supported(root: Path) -> None:
    """containerd's ``overlayutils.Supported``: ``root`` must support ``d_type`` and overlay must
    mount there. Blocks.

    Raises: FailedPrecondition naming what is missing.
    """
    if not supports_dtype(root):
        raise FailedPrecondition(f"{root} does not support d_type. If the backing filesystem is xfs, please "
                                 "reformat with ftype=1 to enable d_type support")
    try:
        _probe_overlay(root)
    except MountError as exc:
        raise FailedPrecondition(f"overlayfs is not supported on {root}: {exc}") from exc


def _has_option(options: Sequence[str], key: str) -> bool:
    return any(option == key or option.startswith(f"{key}=") for option in options)


def rename_into_place(temporary: Path, path: Path) -> None:
    """Rename ``temporary`` to ``path``. A directory already at ``path`` is an orphan left by a crash
    (its id was just handed out again), so it is removed first."""
    try:
        os.rename(temporary, path)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        log.warning("snapshot_orphan_replaced", path=str(path))
        _rmtree(path)
        os.rename(temporary, path)


# --------------------------------------------------------------------------------- snapshotter


class OverlaySnapshotter:
    """A :class:`~berth.core.snapshots.snapshotter.Snapshotter` on overlayfs under ``root``.

    The constructor creates ``root``, checks the host (:func:`check_supported`) and works out the
    overlay options, so it blocks: call it in a worker thread, or use :meth:`open`.

    Args:
        mount_options: appended to every overlay mount (never to binds). ``index=off`` is added
            when the kernel has the ``index`` feature and these options do not set ``index``.
        sync_remove: remove a snapshot's directory in :meth:`remove` itself, not in :meth:`cleanup`.
        upperdir_label: add :data:`UPPERDIR_LABEL` to the infos :meth:`stat`, :meth:`update` and
            :meth:`walk` return.

    Raises:
        FailedPrecondition: no ``d_type`` support, or overlay cannot be mounted.
    """

    def __init__(self, root: Path, *, mount_options: Sequence[str] = (), sync_remove: bool = False,
                 upperdir_label: bool = False) -> None:
        self.root = Path(root)
        self.sync_remove = sync_remove
        self.upperdir_label = upperdir_label
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_supported(self.root)
        options = list(mount_options)
        if "userxattr" not in options and needs_userxattr(self.root):
            options.append("userxattr")
        if not _has_option(options, "index") and _INDEX_PARAMETER.exists():
            options.append("index=off")
        self.options: tuple[str, ...] = tuple(options)
        self._snapshots = self.root / "snapshots"
        make_spread_directory(self._snapshots, 0o700)  # one directory per snapshot
        self._ms = MetaStore(self.root / "metadata.db")

    @classmethod
    async def open(cls, root: Path, *, mount_options: Sequence[str] = (), sync_remove: bool = False,
                   upperdir_label: bool = False) -> OverlaySnapshotter:
        """The constructor, run in a worker thread."""
        return await trio.to_thread.run_sync(partial(cls, root, mount_options=mount_options,
                                                     sync_remove=sync_remove, upperdir_label=upperdir_label))

    def _upper(self, snapshot_id: int) -> Path:
        return self._snapshots / str(snapshot_id) / "fs"

    def _work(self, snapshot_id: int) -> Path:
        return self._snapshots / str(snapshot_id) / "work"

    def _labelled(self, snapshot_id: int, info: Info) -> Info:
        if not self.upperdir_label:
            return info
        return dataclasses.replace(info, labels={**info.labels, UPPERDIR_LABEL: str(self._upper(snapshot_id))})

    async def stat(self, key: str) -> Info:
        """Raises: NotFound."""
        snapshot_id, info, _ = await self._ms.transaction(partial(get_info, key=key))
        return self._labelled(snapshot_id, info)

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change labels only. Raises: NotFound; InvalidArgument for any other field."""

        def run(conn: sqlite3.Connection) -> Info:
            updated = update_info(conn, info, fieldpaths)
            return self._labelled(get_info(conn, updated.name)[0], updated)

        return await self._ms.transaction(run)

    async def usage(self, key: str) -> Usage:
        """The recorded usage of a committed snapshot; an active one's upperdir is measured now.

        Raises: NotFound.
        """
        snapshot_id, info, usage = await self._ms.transaction(partial(get_info, key=key))
        if info.kind is Kind.ACTIVE:
            usage = await trio.to_thread.run_sync(disk_usage, self._upper(snapshot_id))
        return usage

    async def mounts(self, key: str) -> list[Mount]:
        """Raises: NotFound; FailedPrecondition for a committed snapshot."""
        snapshot = await self._ms.transaction(partial(get_snapshot, key=key))
        if snapshot.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key} is committed: only active snapshots and views have mounts")
        return self._mounts(snapshot)

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Raises: AlreadyExists, NotFound (parent), FailedPrecondition (parent not committed)."""
        return await self._create(Kind.ACTIVE, key, parent, labels)

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Raises: as :meth:`prepare`."""
        return await self._create(Kind.VIEW, key, parent, labels)

    async def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> list[Mount]:
        placed: list[Path] = []

        def run(conn: sqlite3.Connection) -> Snapshot:
            temporary = Path(tempfile.mkdtemp(prefix="new-", dir=self._snapshots))
            try:
                upper = temporary / "fs"
                upper.mkdir()
                os.chmod(upper, 0o755)
                if kind is Kind.ACTIVE:
                    (temporary / "work").mkdir()
                    os.chmod(temporary / "work", 0o711)
                snapshot = create_snapshot(conn, kind, key, parent, labels)
                if snapshot.parent_ids:
                    # The upperdir's owner is the merged root's owner: take the parent's.
                    st = os.stat(self._upper(snapshot.parent_ids[0]))
                    os.lchown(upper, st.st_uid, st.st_gid)
                path = self._snapshots / str(snapshot.id)
                rename_into_place(temporary, path)
            except BaseException:
                remove_dir(temporary)
                raise
            placed.append(path)
            return snapshot

        try:
            snapshot = await self._ms.transaction(run)
        except BaseException:
            if placed:  # renamed into place, then the commit failed: the record does not exist
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(remove_dir, placed[0])
            raise
        return self._mounts(snapshot)

    def _mounts(self, snapshot: Snapshot) -> list[Mount]:
        if not snapshot.parent_ids:
            flag = "ro" if snapshot.kind is Kind.VIEW else "rw"
            return [Mount(type="bind", source=str(self._upper(snapshot.id)), options=(flag, "rbind"))]
        options: list[str] = []
        if snapshot.kind is Kind.ACTIVE:
            options += [f"workdir={self._work(snapshot.id)}", f"upperdir={self._upper(snapshot.id)}"]
        elif len(snapshot.parent_ids) == 1:
            return [Mount(type="bind", source=str(self._upper(snapshot.parent_ids[0])), options=("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(str(self._upper(p)) for p in snapshot.parent_ids))
        options += self.options
        return [Mount(type="overlay", source="overlay", options=tuple(options))]

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Record the usage of ``key``'s upperdir and make it the committed ``name`` (same directory).

        Raises: NotFound; AlreadyExists (``name``); FailedPrecondition (``key`` is not active).
        """

        def run(conn: sqlite3.Connection) -> None:
            snapshot_id, info, _ = get_info(conn, key)
            if info.kind is not Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key} is a {info.kind} snapshot, only active ones can be "
                                         "committed")
            commit_active(conn, key, name, disk_usage(self._upper(snapshot_id)), labels)

        await self._ms.transaction(run)

    async def remove(self, key: str) -> None:
        """Forget ``key``; its directory goes now with ``sync_remove``, else at :meth:`cleanup`.

        Raises: NotFound; FailedPrecondition when ``key`` has children.
        """

        def run(conn: sqlite3.Connection) -> list[Path]:
            remove(conn, key)
            return self._orphans(conn) if self.sync_remove else []

        doomed = await self._ms.transaction(run)
        if doomed:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._remove_all, doomed)

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[Info]:
        """Every snapshot matching any of ``filters``, by key (read in one transaction first, so
        the caller may call other methods while iterating)."""

        def run(conn: sqlite3.Connection) -> list[Info]:
            infos = walk_info(conn, filters)
            if self.upperdir_label:
                ids = {key: snapshot_id for snapshot_id, key in id_map(conn).items()}
                infos = [self._labelled(ids[info.name], info) for info in infos]
            return infos

        for info in await self._ms.transaction(run):
            yield info

    async def cleanup(self) -> None:
        """Remove the directories of removed snapshots and of creations a crash interrupted."""
        doomed = await self._ms.transaction(self._orphans)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._remove_all, doomed)

    def _orphans(self, conn: sqlite3.Connection) -> list[Path]:
        # Called inside a transaction: no creation is half-way, so every unknown name is an orphan.
        known = {str(snapshot_id) for snapshot_id in id_map(conn)}
        return [self._snapshots / name for name in sorted(os.listdir(self._snapshots)) if name not in known]

    @staticmethod
    def _remove_all(paths: Sequence[Path]) -> None:
        for path in paths:
            remove_dir(path)

    async def aclose(self) -> None:
        """Close the metastore; idempotent."""
        await self._ms.aclose()
