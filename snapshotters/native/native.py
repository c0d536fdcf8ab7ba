"""The native snapshotter, after containerd's ``plugins/snapshots/native/native.go``: plain
directories and full copies, so it works on any filesystem at O(size) disk per layer.

Layout under ``root``::

    metadata.db              the metastore (:mod:`berth.core.snapshots.storage`)
    snapshots/<id>           a snapshot's whole tree (active and committed snapshots, parentless views)
    snapshots/new-XXXXXXXX   a snapshot being created (renamed to ``<id>`` once recorded)
    snapshots/rm-<id>        a snapshot being removed

Prepare with a parent copies the parent's tree (:func:`copy_tree`) into ``new-XXXXXXXX``, then records
the snapshot and renames the copy into place in one transaction; a view with a parent has no
directory of its own and mounts the parent's read-only. Mounts are ``bind`` with ``rbind`` and
``rw`` (``ro`` for a view). Remove drops the record and renames the directory to ``rm-<id>`` in one
transaction, then deletes it. A crash leaves only orphans, which :meth:`NativeSnapshotter.cleanup`
removes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import sqlite3
import stat
from collections.abc import AsyncIterator, Mapping, Sequence
from functools import partial
from pathlib import Path

import structlog
import trio

from berth.core.directories import make_spread_directory
from berth.core.errdefs import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from berth.core.identifiers import validate_labels
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
from berth.snapshotters.overlayfs.overlayfs import disk_usage, remove_dir, rename_into_place

__all__ = ["NativeSnapshotter", "copy_tree"]

log = structlog.get_logger("berth.snapshotter.native")

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
_CHUNK = 1 << 20
# errnos meaning "this filesystem cannot do that", after which a slower way is used
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}
_XATTR_IGNORED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP}


# ----------------------------------------------------------------------------------- copying


class _Copier:
    """One tree copy: remembers hardlinked inodes and what the filesystem turned out not to support."""

    def __init__(self) -> None:
        self.links: dict[tuple[int, int], str] = {}
        self.reflink = True
        self.copy_range = True

    def copy_tree(self, src: str, dst: str) -> None:
        top = os.lstat(src)
        if not stat.S_ISDIR(top.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, f"{src} is not a directory")
        directories = [(src, dst, top)]  # parents before children; metadata applied in reverse
        pending = [(src, dst)]
        while pending:
            src_dir, dst_dir = pending.pop()
            with os.scandir(src_dir) as it:
                entries = list(it)
            for entry in entries:
                source = entry.path
                target = os.path.join(dst_dir, entry.name)
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(target, 0o700)
                    directories.append((source, target, st))
                    pending.append((source, target))
                    continue
                if st.st_nlink > 1:
                    first = self.links.get((st.st_dev, st.st_ino))
                    if first is not None:
                        os.link(first, target, follow_symlinks=False)
                        continue
                    self.links[(st.st_dev, st.st_ino)] = target
                self.copy_entry(source, target, st)
                copy_metadata(source, target, st)
        for source, target, st in reversed(directories):
            copy_metadata(source, target, st)

    def copy_entry(self, source: str, target: str, st: os.stat_result) -> None:
        mode = st.st_mode
        if stat.S_ISREG(mode):
            self.copy_file(source, target, st.st_size)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(source), target)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            os.mknod(target, mode, st.st_rdev)
        else:
            raise InvalidArgument(f"cannot copy {source}: unsupported file type {stat.S_IFMT(mode):o}")

    def copy_file(self, source: str, target: str, size: int) -> None:
        src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                if size and not self.clone(src, dst):
                    self.copy_sparse(src, dst, size)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def clone(self, src: int, dst: int) -> bool:
        """Share the extents of ``src`` (btrfs, xfs): FICLONE. False if the filesystem cannot."""
        if not self.reflink:
            return False
        try:
            fcntl.ioctl(dst, FICLONE, src)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            self.reflink = False
            return False
        return True

    def copy_sparse(self, src: int, dst: int, size: int) -> None:
        """Copy the data segments only (SEEK_DATA/SEEK_HOLE), leaving the holes as holes."""
        os.ftruncate(dst, size)
        offset = 0
        while offset < size:
            try:
                data = os.lseek(src, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from here on
                    break
                if exc.errno not in _UNSUPPORTED:
                    raise
                data, end = offset, size
            else:
                end = min(os.lseek(src, data, os.SEEK_HOLE), size)
            self.copy_segment(src, dst, data, end - data)
            offset = end

    def copy_segment(self, src: int, dst: int, offset: int, length: int) -> None:
        while length > 0:
            if self.copy_range:
                try:
                    done = os.copy_file_range(src, dst, length, offset, offset)
                except OSError as exc:
                    if exc.errno not in _UNSUPPORTED:
                        raise
                    self.copy_range = False
                    continue
            else:
                chunk = os.pread(src, min(length, _CHUNK), offset)
                done = len(chunk)
                view = memoryview(chunk)
                while view:
                    written = os.pwrite(dst, view, offset + done - len(view))
                    view = view[written:]
            if done == 0:  # the source shrank under us
                return
            offset += done
            length -= done


def copy_metadata(source: str, target: str, st: os.stat_result) -> None:
    """Give ``target`` the owner, mode, xattrs and timestamps of ``source`` (``st``, its lstat).

    xattrs that cannot be set are skipped when they are ``security.*`` (any error) or when the
    target refuses them (EPERM, ENOTSUP); containerd ignores such failures too.
    """
    try:
        os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
    except PermissionError:
        now = os.lstat(target)
        if (now.st_uid, now.st_gid) != (st.st_uid, st.st_gid):
            raise
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(target, stat.S_IMODE(st.st_mode))  # after chown, which clears set-id bits
    copy_xattrs(source, target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def copy_xattrs(source: str, target: str) -> None:
    """Copy every extended attribute of ``source`` to ``target`` (symlinks themselves, not followed)."""
    try:
        names = os.listxattr(source, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        try:
            value = os.getxattr(source, name, follow_symlinks=False)
            os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as exc:
            if not (name.startswith("security.") or exc.errno in _XATTR_IGNORED):
                raise
            log.debug("xattr_not_copied", path=target, xattr=name, error=str(exc))


def copy_tree(src: Path, dst: Path) -> None:
    """Copy the tree at ``src`` into the existing directory ``dst`` (continuity's ``fs.CopyDir``).

    Keeps file types (regular files, directories, symlinks, device nodes, fifos, sockets), owners,
    modes, xattrs, atime/mtime and the hardlink structure within the tree; ``dst`` itself takes
    ``src``'s metadata. Regular files are reflinked (FICLONE) where the filesystem can, else copied
    by data segment with ``copy_file_range`` (or read/write), so holes stay holes. Blocks.

    Raises: OSError.
    """
    _Copier().copy_tree(os.fspath(src), os.fspath(dst))


# --------------------------------------------------------------------------------- snapshotter


def _restore(path: Path, renamed: Path) -> None:
    try:
        os.rename(renamed, path)
    except OSError as exc:
        log.error("snapshot_restore_failed", path=str(renamed), error=str(exc))


def _check_new(conn: sqlite3.Connection, key: str, parent: str, labels: Mapping[str, str] | None) -> int:
    """Fail early (before a copy) as :func:`create_snapshot` would; return the parent's id."""
    if not key:
        raise InvalidArgument("snapshot key must not be empty")
    validate_labels(labels or {})
    try:
        get_info(conn, key)
    except NotFound:
        pass
    else:
        raise AlreadyExists(f"snapshot {key} already exists")
    try:
        parent_id, info, _ = get_info(conn, parent)
    except NotFound:
        raise NotFound(f"parent snapshot {parent} does not exist") from None
    if info.kind is not Kind.COMMITTED:
        raise FailedPrecondition(f"parent {parent} is not a committed snapshot")
    return parent_id


class NativeSnapshotter:
    """A :class:`~berth.core.snapshots.snapshotter.Snapshotter` of plain directories under ``root``.

    The constructor creates ``root`` (it blocks briefly; :meth:`open` runs it in a worker thread).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._snapshots = self.root / "snapshots"
        make_spread_directory(self._snapshots, 0o700)  # one directory per snapshot
        self._ms = MetaStore(self.root / "metadata.db")
        #: names of ``new-*`` directories being filled outside a transaction (cleanup leaves them)
        self._busy: set[str] = set()

    @classmethod
    async def open(cls, root: Path) -> NativeSnapshotter:
        """The constructor, run in a worker thread."""
        return await trio.to_thread.run_sync(cls, root)

    def _dir(self, snapshot_id: int) -> Path:
        return self._snapshots / str(snapshot_id)

    async def stat(self, key: str) -> Info:
        """Raises: NotFound."""
        _, info, _ = await self._ms.transaction(partial(get_info, key=key))
        return info

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change labels only. Raises: NotFound; InvalidArgument for any other field."""
        return await self._ms.transaction(partial(update_info, info=info, fieldpaths=fieldpaths))

    async def usage(self, key: str) -> Usage:
        """The recorded usage of a committed snapshot; an active one's tree is measured now.

        Raises: NotFound.
        """
        snapshot_id, info, usage = await self._ms.transaction(partial(get_info, key=key))
        if info.kind is Kind.ACTIVE:
            usage = await trio.to_thread.run_sync(disk_usage, self._dir(snapshot_id))
        return usage

    async def mounts(self, key: str) -> list[Mount]:
        """Raises: NotFound; FailedPrecondition for a committed snapshot."""
        snapshot = await self._ms.transaction(partial(get_snapshot, key=key))
        if snapshot.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key} is committed: only active snapshots and views have mounts")
        return self._mounts(snapshot)

    def _mounts(self, snapshot: Snapshot) -> list[Mount]:
        flag = "ro" if snapshot.kind is Kind.VIEW else "rw"
        own = not snapshot.parent_ids or snapshot.kind is Kind.ACTIVE
        source = self._dir(snapshot.id if own else snapshot.parent_ids[0])
        return [Mount(type="bind", source=str(source), options=("rbind", flag))]

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """A writable full copy of ``parent``.

        Raises: AlreadyExists, NotFound (parent), FailedPrecondition (parent not committed).
        """
        return await self._create(Kind.ACTIVE, key, parent, labels)

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """A read-only view of ``parent`` (nothing is copied). Raises: as :meth:`prepare`."""
        return await self._create(Kind.VIEW, key, parent, labels)

    async def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> list[Mount]:
        if kind is Kind.VIEW and parent:
            snapshot = await self._ms.transaction(partial(create_snapshot, kind=kind, key=key, parent=parent,
                                                          labels=labels))
            return self._mounts(snapshot)
        name = f"new-{secrets.token_hex(6)}"
        temporary = self._snapshots / name
        placed: list[Path] = []
        parent_id: int | None = None

        def run(conn: sqlite3.Connection) -> Snapshot:
            snapshot = create_snapshot(conn, kind, key, parent, labels)
            if snapshot.parent_ids[:1] != ((parent_id,) if parent_id is not None else ()):
                raise Aborted(f"parent {parent} was replaced while snapshot {key} was being copied from it")
            path = self._dir(snapshot.id)
            rename_into_place(temporary, path)
            placed.append(path)
            return snapshot

        self._busy.add(name)
        try:
            if parent:
                parent_id = await self._ms.transaction(partial(_check_new, key=key, parent=parent, labels=labels))
            await trio.to_thread.run_sync(self._fill, temporary, parent_id)
            snapshot = await self._ms.transaction(run)
        except BaseException:
            with trio.CancelScope(shield=True):
                # the copy, or the copy renamed into place whose record did not commit
                await trio.to_thread.run_sync(remove_dir, placed[0] if placed else temporary)
            raise
        finally:
            self._busy.discard(name)
        return self._mounts(snapshot)

    def _fill(self, temporary: Path, parent_id: int | None) -> None:
        temporary.mkdir(mode=0o700)
        os.chmod(temporary, 0o755)
        if parent_id is not None:
            copy_tree(self._dir(parent_id), temporary)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Record the usage of ``key``'s tree and make it the committed ``name`` (same directory).

        Raises: NotFound; AlreadyExists (``name``); FailedPrecondition (``key`` is not active).
        """

        def run(conn: sqlite3.Connection) -> None:
            snapshot_id, info, _ = get_info(conn, key)
            if info.kind is not Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key} is a {info.kind} snapshot, only active ones can be "
                                         "committed")
            commit_active(conn, key, name, disk_usage(self._dir(snapshot_id)), labels)

        await self._ms.transaction(run)

    async def remove(self, key: str) -> None:
        """Forget ``key`` and delete its directory.

        Raises: NotFound; FailedPrecondition when ``key`` has children.
        """
        moved: list[tuple[Path, Path]] = []

        def run(conn: sqlite3.Connection) -> None:
            snapshot_id, _ = remove(conn, key)
            path = self._dir(snapshot_id)
            renamed = self._snapshots / f"rm-{snapshot_id}"
            if path.exists():
                rename_into_place(path, renamed)
                moved.append((path, renamed))

        try:
            await self._ms.transaction(run)
        except BaseException:
            if moved:  # renamed, then the commit failed: the record is still there, so put it back
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_restore, *moved[0])
            raise
        if moved:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(remove_dir, moved[0][1])

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[Info]:
        """Every snapshot matching any of ``filters``, by key (read in one transaction first, so
        the caller may call other methods while iterating)."""
        for info in await self._ms.transaction(partial(walk_info, filters=filters)):
            yield info

    async def cleanup(self) -> None:
        """Remove directories no snapshot owns: removals and creations a crash interrupted."""

        def orphans(conn: sqlite3.Connection) -> list[str]:
            known = {str(snapshot_id) for snapshot_id in id_map(conn)}
            return [name for name in sorted(os.listdir(self._snapshots)) if name not in known]

        names = await self._ms.transaction(orphans)
        doomed = [self._snapshots / name for name in names if name not in self._busy]
        with trio.CancelScope(shield=True):
            for path in doomed:
                await trio.to_thread.run_sync(remove_dir, path)

    async def aclose(self) -> None:
        """Close the metastore; idempotent."""
        await self._ms.aclose()
