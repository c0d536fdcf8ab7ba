"""The btrfs snapshotter, after containerd's ``plugins/snapshots/btrfs/btrfs.go``.

Layout under ``root`` (which must be on a btrfs filesystem)::

    metadata.db         the metastore (:mod:`berth.core.snapshots.storage`)
    active/<id>         active snapshots: writable subvolumes
    view/<id>           views: read-only snapshots of their parent (an empty subvolume without one)
    snapshots/<id>      committed snapshots: read-only subvolumes

* **Prepare / View** without a parent creates an empty subvolume (mode 0755 whatever the umask);
  with one, it snapshots ``snapshots/<parent id>``, read-only for a view.
* **Commit** snapshots ``active/<id>`` read-only into ``snapshots/<id>`` (the metastore keeps the
  id), then deletes the active subvolume.
* **Mounts** are one ``btrfs`` mount of the filesystem's device (from ``/proc/self/mountinfo``) with
  ``subvolid=<n>``, plus ``ro`` unless the snapshot is active.
* **Remove** drops the record and renames the subvolume to ``rm-<id>`` in one transaction, then
  deletes it; :meth:`BtrfsSnapshotter.cleanup` deletes whatever a crash left behind.
* **Usage** is containerd's: for an active snapshot, ``fs.DiskUsage`` of its subvolume when it has
  no parent, else ``fs.DiffUsage(parent, active)``: the allocated blocks (``st_blocks`` x 512) and
  the count of distinct inodes of every path that was added or modified relative to the parent
  (continuity's ``Changes`` rules; deletions count for nothing, directories count only when their
  mode, owner or device number changed). Commit records that value; views report zero.

The subvolume calls come from the ``btrfsutil`` binding (``pip install 'berth[btrfs]'``, built
against Debian's ``libbtrfsutil-dev``), imported when a snapshotter opens, so this module imports
without it. Every blocking call runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog
import trio

from berth.core.errdefs import FailedPrecondition, NotFound
from berth.core.plugin import SkipPlugin
from berth.core.snapshots import storage
from berth.core.snapshots.snapshotter import Info, Kind, Mount, Usage

__all__ = [
    "BtrfsSnapshotter", "MountInfo", "diff_usage", "disk_usage", "load_btrfsutil", "lookup_mount", "parse_mountinfo",
]

_BLOCK_UNIT = 512  # st_blocks counts 512-byte units
_CAPABILITY_XATTR = "security.capability"
_KIND_DIRS = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "snapshots"}
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def load_btrfsutil() -> ModuleType:
    """Import the ``btrfsutil`` binding.

    Raises:
        FailedPrecondition: it is not installed (the message says how to install it).
    """
    try:
        import btrfsutil
    except ImportError as exc:
        raise FailedPrecondition(
            "the btrfs snapshotter needs the Python module btrfsutil, which is not installed "
            f"({exc}): install it with pip install 'berth[btrfs]' (or 'btrfsutil>=6.10,<6.11'), "
            "which builds against libbtrfsutil (Debian: apt-get install libbtrfsutil-dev)") from exc
    module: ModuleType = btrfsutil
    return module


# ------------------------------------------------------------------------------------ mountinfo


@dataclass(frozen=True, slots=True, kw_only=True)
class MountInfo:
    """One line of ``/proc/self/mountinfo``: where, what filesystem, from which source."""

    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> Iterator[MountInfo]:
    """The entries of a ``/proc/self/mountinfo`` text, in order (octal escapes decoded)."""
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue
        yield MountInfo(mountpoint=_unescape(fields[4]), fstype=fields[separator + 1],
                        source=_unescape(fields[separator + 2]), options=fields[5])


def lookup_mount(path: Path, mountinfo: str | None = None) -> MountInfo:
    """The mount ``path`` is on: the mount with the longest mount point above it (the topmost one
    when several are stacked there), as containerd's ``mount.Lookup``. Blocks.

    Raises:
        NotFound: no mount holds ``path`` (only possible with a partial ``mountinfo``).
    """
    resolved = os.path.realpath(path)
    if mountinfo is None:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            mountinfo = f.read()
    best: MountInfo | None = None
    for entry in parse_mountinfo(mountinfo):
        point = entry.mountpoint
        holds = point == "/" or resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if holds and (best is None or len(point) >= len(best.mountpoint)):
            best = entry
    if best is None:
        raise NotFound(f"no mount holds {resolved}")
    return best


# ---------------------------------------------------------------------------------------- usage


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _capability(path: str) -> bytes | None:
    try:
        return os.getxattr(path, _CAPABILITY_XATTR, follow_symlinks=False)
    except OSError:
        return None


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk_a, chunk_b = fa.read(1 << 16), fb.read(1 << 16)
            if chunk_a != chunk_b:
                return False
            if not chunk_a:
                return True


def _same_file(lower: str, lower_st: os.stat_result, upper: str, upper_st: os.stat_result) -> bool:
    """continuity's ``sameFile``: whether ``upper`` is unchanged from ``lower``."""
    if (lower_st.st_dev, lower_st.st_ino) == (upper_st.st_dev, upper_st.st_ino):
        return True
    if (lower_st.st_mode, lower_st.st_uid, lower_st.st_gid, lower_st.st_rdev) != (
            upper_st.st_mode, upper_st.st_uid, upper_st.st_gid, upper_st.st_rdev):
        return False
    if _capability(lower) != _capability(upper):
        return False
    if stat.S_ISDIR(upper_st.st_mode):
        return True
    if lower_st.st_size != upper_st.st_size:
        return False
    lower_s, lower_ns = divmod(lower_st.st_mtime_ns, 1_000_000_000)
    upper_s, upper_ns = divmod(upper_st.st_mtime_ns, 1_000_000_000)
    if lower_s != upper_s:
        return False
    if lower_ns == 0 and upper_ns == 0:  # timestamps possibly truncated: look at the content
        if stat.S_ISLNK(upper_st.st_mode):
            return os.readlink(lower) == os.readlink(upper)
        if upper_st.st_size == 0 or not stat.S_ISREG(upper_st.st_mode):
            return True
        return _same_content(lower, upper)
    return lower_ns == upper_ns


def _entries(directory: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):  # removed while we walk
        return []


def disk_usage(root: Path) -> Usage:
    """continuity's ``fs.DiskUsage``: blocks and distinct inodes of everything under ``root``,
    ``root`` included. Blocks.

    Raises:
        NotFound: ``root`` does not exist.
    """
    root_st = _lstat(str(root))
    if root_st is None:
        raise NotFound(f"{root} does not exist")
    seen = {(root_st.st_dev, root_st.st_ino)}
    size = root_st.st_blocks * _BLOCK_UNIT
    stack = [str(root)]
    while stack:
        for entry in _entries(stack.pop()):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * _BLOCK_UNIT
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
    return Usage(size=size, inodes=len(seen))


def diff_usage(lower: Path, upper: Path) -> Usage:
    """continuity's ``fs.DiffUsage(lower, upper)``: blocks and distinct inodes of the paths added or
    modified in ``upper`` relative to ``lower`` (the root itself and deletions not counted). Blocks.

    Raises:
        NotFound: ``upper`` does not exist.
    """
    if _lstat(str(upper)) is None:
        raise NotFound(f"{upper} does not exist")
    seen: set[tuple[int, int]] = set()
    size = 0
    # (upper directory, its counterpart in lower or None when lower has no directory there)
    stack: list[tuple[str, str | None]] = [(str(upper), str(lower))]
    while stack:
        upper_dir, lower_dir = stack.pop()
        for entry in _entries(upper_dir):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            lower_path = os.path.join(lower_dir, entry.name) if lower_dir is not None else None
            lower_st = _lstat(lower_path) if lower_path is not None else None
            changed = lower_st is None or lower_path is None or not _same_file(lower_path, lower_st, entry.path, st)
            if changed and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * _BLOCK_UNIT
            if stat.S_ISDIR(st.st_mode):
                lower_is_dir = lower_st is not None and stat.S_ISDIR(lower_st.st_mode)
                stack.append((entry.path, lower_path if lower_is_dir else None))
    return Usage(size=size, inodes=len(seen))


# ---------------------------------------------------------------------------------- snapshotter


class BtrfsSnapshotter:
    """containerd's btrfs snapshotter on ``root``; open one with :meth:`open`.

    See the module docstring for the layout and the rules, and
    :class:`~berth.core.snapshots.snapshotter.Snapshotter` for the interface and its errors.
    """

    def __init__(self, root: Path, device: str, btrfsutil: ModuleType, metastore: storage.MetaStore,
                 log: Any = None) -> None:
        self.root = root
        #: The block device the mounts name as their source.
        self.device = device
        self._btrfsutil = btrfsutil
        self._ms = metastore
        self._log = log if log is not None else structlog.get_logger(__name__)

    @classmethod
    async def open(cls, root: Path, *, log: Any = None) -> BtrfsSnapshotter:
        """Open (creating if needed) the snapshotter on ``root``, a directory on btrfs.

        Raises:
            SkipPlugin: ``root`` is not on a btrfs filesystem.
            FailedPrecondition: the ``btrfsutil`` module is missing.
        """
        device = await trio.to_thread.run_sync(cls._prepare_root, root)
        btrfsutil = load_btrfsutil()
        return cls(root, device, btrfsutil, storage.MetaStore(root / "metadata.db"), log)

    @staticmethod
    def _prepare_root(root: Path) -> str:
        try:
            root.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            if stat.S_IMODE(root.stat().st_mode) != 0o700:
                root.chmod(0o700)
        mount = lookup_mount(root)
        if mount.fstype != "btrfs":
            raise SkipPlugin(f"path {root} ({mount.fstype}) must be a btrfs filesystem to be used with the "
                             "btrfs snapshotter")
        for name in _KIND_DIRS.values():
            (root / name).mkdir(mode=0o755, exist_ok=True)
        return mount.source

    async def __aenter__(self) -> BtrfsSnapshotter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _path(self, kind: Kind, snapshot_id: int | str) -> Path:
        return self.root / _KIND_DIRS[kind] / str(snapshot_id)

    def _mounts(self, kind: Kind, subvolume_id: int) -> list[Mount]:
        options = [f"subvolid={subvolume_id}"]
        if kind is not Kind.ACTIVE:
            options.append("ro")
        return [Mount(type="btrfs", source=self.device, options=tuple(options))]

    def _delete(self, path: Path) -> None:
        self._btrfsutil.delete_subvolume(str(path), recursive=True)

    async def _delete_logged(self, path: Path, what: str) -> None:
        try:
            await trio.to_thread.run_sync(self._delete, path)
        except OSError as exc:
            self._log.warning(f"failed to delete {what} subvolume", subvolume=str(path), error=str(exc))

    # -------------------------------------------------------------------------------- metadata

    async def stat(self, key: str) -> Info:
        return (await self._ms.transaction(lambda conn: storage.get_info(conn, key)))[1]

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        return await self._ms.transaction(lambda conn: storage.update_info(conn, info, fieldpaths))

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[Info]:
        for info in await self._ms.transaction(lambda conn: storage.walk_info(conn, filters)):
            yield info

    async def usage(self, key: str) -> Usage:
        def read(conn: Any) -> tuple[int, Info, Usage, int | None]:
            snapshot_id, info, usage = storage.get_info(conn, key)
            parent_id = None
            if info.kind is Kind.ACTIVE and info.parent:
                parent_id = storage.get_info(conn, info.parent)[0]
            return snapshot_id, info, usage, parent_id

        snapshot_id, info, usage, parent_id = await self._ms.transaction(read)
        if info.kind is not Kind.ACTIVE:
            return usage
        active = self._path(Kind.ACTIVE, snapshot_id)
        if parent_id is None:
            return await trio.to_thread.run_sync(disk_usage, active)
        return await trio.to_thread.run_sync(diff_usage, self._path(Kind.COMMITTED, parent_id), active)

    # ------------------------------------------------------------------------------- snapshots

    async def mounts(self, key: str) -> list[Mount]:
        """The mounts of ``key``; a committed snapshot's are read-only, like a view's."""
        def read(conn: Any) -> tuple[Kind, int]:
            snapshot = storage.get_snapshot(conn, key)
            return snapshot.kind, self._btrfsutil.subvolume_id(str(self._path(snapshot.kind, snapshot.id)))

        kind, subvolume_id = await self._ms.transaction(read)
        return self._mounts(kind, subvolume_id)

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await self._make(Kind.ACTIVE, key, parent, labels)

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await self._make(Kind.VIEW, key, parent, labels)

    async def _make(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> list[Mount]:
        created: list[Path] = []

        def make(conn: Any) -> int:
            snapshot = storage.create_snapshot(conn, kind, key, parent, labels)
            target = self._path(kind, snapshot.id)
            if snapshot.parent_ids:
                source = self._path(Kind.COMMITTED, snapshot.parent_ids[0])
                self._btrfsutil.create_snapshot(str(source), str(target), read_only=kind is Kind.VIEW)
                created.append(target)
            else:
                self._btrfsutil.create_subvolume(str(target))
                created.append(target)
                os.chmod(target, 0o755)  # the kernel applies the umask to a new subvolume's root
            return int(self._btrfsutil.subvolume_id(str(target)))

        try:
            subvolume_id = await self._ms.transaction(make)
        except BaseException:
            for path in created:
                with trio.CancelScope(shield=True):
                    await self._delete_logged(path, "new")
            raise
        return self._mounts(kind, subvolume_id)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        usage = await self.usage(key)
        created: list[Path] = []

        def commit(conn: Any) -> Path:
            snapshot_id = storage.commit_active(conn, key, name, usage, labels)
            source, target = self._path(Kind.ACTIVE, snapshot_id), self._path(Kind.COMMITTED, snapshot_id)
            self._btrfsutil.create_snapshot(str(source), str(target), read_only=True)
            created.append(target)
            return source

        try:
            source = await self._ms.transaction(commit)
        except BaseException:
            for path in created:
                with trio.CancelScope(shield=True):
                    await self._delete_logged(path, "committed")
            raise
        with trio.CancelScope(shield=True):
            await self._delete_logged(source, "active")  # an orphan now: cleanup() retries

    async def remove(self, key: str) -> None:
        renamed: list[tuple[Path, Path]] = []

        def remove(conn: Any) -> None:
            snapshot_id, kind = storage.remove(conn, key)
            source = self._path(kind, snapshot_id)
            removed = source.with_name(f"rm-{snapshot_id}")
            try:
                os.rename(source, removed)
            except FileNotFoundError:  # a record without its subvolume: nothing to delete
                return
            renamed.append((source, removed))

        try:
            await self._ms.transaction(remove)
        except BaseException:
            for source, removed in renamed:  # the transaction did not commit: put the subvolume back
                with contextlib.suppress(OSError):
                    os.rename(removed, source)
            raise
        for _, removed in renamed:
            with trio.CancelScope(shield=True):
                await self._delete_logged(removed, "removed")

    async def cleanup(self) -> None:
        """Delete subvolumes no snapshot record accounts for (left by a crash or a failed delete)."""
        def orphans(conn: Any) -> list[Path]:
            keys = storage.id_map(conn)
            kinds = {info.name: info.kind for info in storage.walk_info(conn)}
            expected = {(_KIND_DIRS[kinds[key]], str(snapshot_id)) for snapshot_id, key in keys.items()}
            found = []
            for directory in _KIND_DIRS.values():
                for entry in _entries(str(self.root / directory)):
                    if entry.is_dir(follow_symlinks=False) and (directory, entry.name) not in expected:
                        found.append(Path(entry.path))
            return found

        for path in await self._ms.transaction(orphans):
            await self._delete_logged(path, "orphaned")

    async def aclose(self) -> None:
        await self._ms.aclose()

