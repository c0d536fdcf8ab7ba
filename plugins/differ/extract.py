"""Extracting a tar stream into a directory without ever touching anything outside it.

Path rules (stricter than containerd's ``archive/tar.go``, which cleans every name relative to the root
and follows symlinks as if chrooted):

* An entry name is split on ``/``; empty and ``.`` components are dropped (so ``./a//b`` is ``a/b``).
  A name starting with ``/`` (absolute) or holding a ``..`` component is refused, even when it would
  stay inside: layers written by Docker, BuildKit, umoci or containerd never contain either.
* Every parent component is opened with ``openat(O_NOFOLLOW|O_DIRECTORY)`` from the directory above it.
  A parent that is a symlink is followed inside the root: a relative target from its directory
  (``lib -> usr/lib``), an absolute one from the snapshot root, as the container will see it
  (``var/run -> /run``; containerd does the same); a target climbing above the root, or more than 40
  hops, is refused. A missing parent is created (mode 0755, or copied from the lower layers in overlay mode).
* Hardlink targets follow the same rules and must already exist; whiteouts name one file in a resolved
  directory. The last component of an entry is never followed: an existing file, symlink or directory
  there is replaced (a directory over a directory is kept and gets the new metadata).
* Device nodes are refused unless ``allow_devices``; ``trusted.overlay.*`` / ``user.overlay.*`` xattrs
  are always refused (they would steer the overlay filesystem).

Two whiteout modes: **overlay** (writing into an overlay upperdir) turns ``.wh.NAME`` into a 0/0
character device and ``.wh..wh..opq`` into the ``overlay.opaque=y`` xattr on the directory; **plain**
(a bind source or a mounted snapshot) deletes ``NAME`` and, for an opaque marker, everything in the
directory that this layer did not write. In both, a whiteout never hides an entry of its own layer (OCI:
whiteouts apply to lower layers only), and other ``.wh..wh.`` names (AUFS metadata) are skipped.

Every error is raised as a :class:`~berth.core.errdefs.BerthError` naming the entry.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from berth.core.errdefs import BerthError, InvalidArgument, ResourceExhausted

from .tarstream import TarEntry, TarSource, read_entries

__all__ = ["Extractor", "split_name"]

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
_MAX_HOPS = 40
_MAX_CACHED_DIRS = 256
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_XATTR_PREFIX = "SCHILY.xattr."


def _read_umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race with other threads)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o777  # unknown: never rely on it


def split_name(name: str) -> tuple[str, ...]:
    """The components of a tar entry name, ``.`` and empty ones dropped.

    Raises: InvalidArgument for an absolute name or a ``..`` component.
    """
    if name.startswith("/"):
        raise InvalidArgument(f"layer entry {name!r}: absolute paths are not allowed")
    parts = tuple(part for part in name.split("/") if part and part != ".")
    if ".." in parts:
        raise InvalidArgument(f"layer entry {name!r}: '..' is not allowed in a path")
    return parts


class _EntryError(Exception):
    """Internal: a refusal found while resolving; turned into InvalidArgument naming the entry."""


@dataclass(slots=True)
class _Times:
    parts: tuple[str, ...]
    atime_ns: int
    mtime_ns: int


class Extractor:
    """Applies one tar stream into ``root`` (see the module docstring for the rules).

    ``overlay`` selects overlay whiteouts; ``lowers`` are the overlay's lower directories, nearest first,
    used only to copy attributes of parent directories that the layer does not list. Not thread-safe:
    one extractor per apply, used from one worker thread.
    """

    def __init__(self, root: str, *, overlay: bool = False, lowers: Sequence[str] = (),
                 xattr_prefix: str = "trusted.overlay.", allow_devices: bool = False) -> None:
        self._root = root
        self._overlay = overlay
        self._lowers = tuple(lowers)
        self._opaque_xattr = xattr_prefix + "opaque"
        self._allow_devices = allow_devices
        self._cache: dict[tuple[str, ...], int] = {}
        self._retired: list[int] = []
        #: cached directory descriptors whose directory is set-group-ID (new files take its group)
        self._sgid: set[int] = set()
        self._euid, self._egid = os.geteuid(), os.getegid()
        self._umask = _read_umask()
        self._dir_times: list[_Times] = []
        self._written: set[tuple[str, ...]] = set()
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if os.fstat(self._root_fd).st_mode & stat.S_ISGID:
            self._sgid.add(self._root_fd)

    # -- lifecycle -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every descriptor (idempotent)."""
        self._drop_cache()
        self._close_retired()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def _drop_cache(self) -> None:
        """Forget every cached directory (after a removal or replacement). The descriptors may still be
        in use by the entry being applied, so they are closed only when it is done."""
        self._retired.extend(self._cache.values())
        self._cache.clear()

    def _close_retired(self) -> None:
        for fd in self._retired:
            self._sgid.discard(fd)
            os.close(fd)
        self._retired.clear()

    def run(self, source: TarSource) -> int:
        """Extract every entry of the tar stream, then read the stream to its end; returns the entry count.

        Blocks. Raises InvalidArgument naming the entry for any refused or malformed entry,
        ResourceExhausted when the disk is full, PipeAborted when the stream was aborted.
        """
        count = 0
        try:
            for entry in read_entries(source):
                count += 1
                try:
                    self._entry(source, entry)
                finally:
                    self._close_retired()
            self._finish_dir_times()
        finally:
            self.close()
        source.drain()
        return count

    # -- path resolution -------------------------------------------------------------------------------

    def _dir_fd(self, parts: tuple[str, ...], create: bool, hops: int = 0) -> int:
        """A descriptor of directory ``parts`` below the root (borrowed from the cache: do not close).

        Raises _EntryError for an escape or a non-directory; FileNotFoundError when missing and not
        ``create``.
        """
        if not parts:
            return self._root_fd
        cached = self._cache.get(parts)
        if cached is not None:
            return cached
        parent = self._dir_fd(parts[:-1], create, hops)
        name = parts[-1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            self._mkdir_parent(parent, parts)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.lstat(name, dir_fd=parent)
            if not stat.S_ISLNK(st.st_mode):
                raise _EntryError(f"{'/'.join(parts)!r} is not a directory") from None
            target = os.readlink(name, dir_fd=parent)
            resolved = self._follow(parts, target, hops)
            return self._dir_fd(resolved, create, hops + 1)
        if len(self._cache) >= _MAX_CACHED_DIRS:
            oldest = next(iter(self._cache))
            self._retired.append(self._cache.pop(oldest))
        self._cache[parts] = fd
        if os.fstat(fd).st_mode & stat.S_ISGID:
            self._sgid.add(fd)
        return fd

    @staticmethod
    def _follow(parts: tuple[str, ...], target: str, hops: int) -> tuple[str, ...]:
        where = "/".join(parts)
        if hops >= _MAX_HOPS:
            raise _EntryError(f"too many levels of symlinks at {where!r}")
        # An absolute target means the container's root, as the container will see it (containerd
        # resolves it the same way): it is followed from the snapshot root, never from the host's.
        resolved = [] if target.startswith("/") else list(parts[:-1])
        for part in target.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    raise _EntryError(f"{where!r} is a symlink to {target!r}, outside the snapshot")
                resolved.pop()
            else:
                resolved.append(part)
        return tuple(resolved)

    def _mkdir_parent(self, parent: int, parts: tuple[str, ...]) -> None:
        """Create a parent directory the layer does not list: like the lower layers' one when there is one."""
        os.mkdir(parts[-1], 0o755, dir_fd=parent)
        self._written.add(parts)
        if not self._overlay:
            return
        for lower in self._lowers:
            st = _lstat_below(lower, parts)
            if st is not None:
                if stat.S_ISDIR(st.st_mode):
                    os.chown(parts[-1], st.st_uid, st.st_gid, dir_fd=parent, follow_symlinks=False)
                    os.chmod(parts[-1], stat.S_IMODE(st.st_mode), dir_fd=parent)
                    self._dir_times.append(_Times(parts, st.st_atime_ns, st.st_mtime_ns))
                return

    # -- entries ---------------------------------------------------------------------------------------

    def _entry(self, source: TarSource, member: TarEntry) -> None:
        name = member.name
        try:
            parts = split_name(name)
            if not parts:
                return  # the root itself: its attributes belong to the snapshot, not the layer
            base = parts[-1]
            if base.startswith(WHITEOUT_PREFIX):
                self._whiteout(parts)
                return
            for key, _ in member.xattrs:
                if key.startswith(("trusted.overlay.", "user.overlay.")):
                    raise _EntryError(f"overlay xattr {key!r} is not allowed")
            kind = member.kind
            if kind in ("char", "block") and not self._allow_devices:
                raise _EntryError("device nodes are not allowed (allow_devices = false)")
            parent = self._dir_fd(parts[:-1], create=True)
            self._written.add(parts)
            if kind == "file":
                self._regular(source, member, parent, base)
            elif kind == "dir":
                self._directory(member, parent, parts)
            elif kind == "symlink":
                self._symlink(member, parent, base)
            elif kind == "hardlink":
                self._hardlink(member, parent, base)
            else:
                self._special(member, parent, base)
        except _EntryError as err:
            raise InvalidArgument(f"layer entry {name!r}: {err}") from None
        except BerthError:
            raise
        except ValueError as err:  # a NUL byte in a PAX name, link target or xattr key
            raise InvalidArgument(f"layer entry {name!r}: {err}") from None
        except OSError as err:
            reason = os.strerror(err.errno) if err.errno else str(err)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"layer entry {name!r}: {reason}") from None
            raise InvalidArgument(f"layer entry {name!r}: {reason}") from None

    def _make_room(self, parent: int, name: str, keep_dir: bool) -> bool:
        """Remove whatever is at ``name`` (a directory is kept when ``keep_dir``); True if a directory
        was kept."""
        try:
            st = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self._drop_cache()
            shutil.rmtree(name, dir_fd=parent)
        else:
            if stat.S_ISLNK(st.st_mode):
                self._drop_cache()
            os.unlink(name, dir_fd=parent)
        return False

    def _regular(self, source: TarSource, member: TarEntry, parent: int, name: str) -> None:
        mode = stat.S_IMODE(member.mode)
        # Created with its final mode when the umask cannot change it (saves an fchmod per file).
        exact = not mode & (0o7000 | self._umask)
        try:
            fd = os.open(name, _FILE_FLAGS, mode if exact else 0o600, dir_fd=parent)
        except FileExistsError:
            self._make_room(parent, name, keep_dir=False)
            fd = os.open(name, _FILE_FLAGS, mode if exact else 0o600, dir_fd=parent)
        try:
            if source.copy_to(fd, member.size) != member.size:
                raise _EntryError("the layer ends inside this file")
            # A new file already has our uid and gid, unless the directory is set-group-ID.
            if member.uid != self._euid or member.gid != self._egid or parent in self._sgid:
                os.fchown(fd, member.uid, member.gid)
            for key, value in member.xattrs:
                os.setxattr(fd, key, value)
            if not exact:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(member.atime_ns, member.mtime_ns))
        finally:
            os.close(fd)

    def _directory(self, member: TarEntry, parent: int, parts: tuple[str, ...]) -> None:
        name = parts[-1]
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            if not self._make_room(parent, name, keep_dir=True):
                os.mkdir(name, 0o700, dir_fd=parent)
        fd = self._dir_fd(parts, create=False)
        os.fchown(fd, member.uid, member.gid)
        for key, value in member.xattrs:
            os.setxattr(fd, key, value)
        os.fchmod(fd, stat.S_IMODE(member.mode))
        if member.mode & stat.S_ISGID:
            self._sgid.add(fd)
        else:
            self._sgid.discard(fd)
        self._dir_times.append(_Times(parts, member.atime_ns, member.mtime_ns))

    def _symlink(self, member: TarEntry, parent: int, name: str) -> None:
        try:
            os.symlink(member.linkname, name, dir_fd=parent)
        except FileExistsError:
            self._make_room(parent, name, keep_dir=False)
            os.symlink(member.linkname, name, dir_fd=parent)
        os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        xattrs = member.xattrs
        if xattrs:
            path = f"/proc/self/fd/{parent}/{name}"
            for key, value in xattrs:
                os.setxattr(path, key, value, follow_symlinks=False)
        os.utime(name, ns=(member.atime_ns, member.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _hardlink(self, member: TarEntry, parent: int, name: str) -> None:
        try:
            target = split_name(member.linkname)
        except InvalidArgument:
            raise _EntryError(f"hardlink target {member.linkname!r} is outside the snapshot") from None
        if not target:
            raise _EntryError("hardlink to the root directory")
        try:
            target_parent = self._dir_fd(target[:-1], create=False)
        except FileNotFoundError:
            raise _EntryError(f"hardlink target {member.linkname!r} does not exist") from None
        try:
            os.link(target[-1], name, src_dir_fd=target_parent, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            if target_parent == parent and target[-1] == name:
                return  # a link to itself: already there
            self._make_room(parent, name, keep_dir=False)
            os.link(target[-1], name, src_dir_fd=target_parent, dst_dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            raise _EntryError(f"hardlink target {member.linkname!r} does not exist") from None

    def _special(self, member: TarEntry, parent: int, name: str) -> None:
        if member.kind == "fifo":
            kind, device = stat.S_IFIFO, 0
        else:
            kind = stat.S_IFCHR if member.kind == "char" else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
        try:
            os.mknod(name, kind | 0o600, device, dir_fd=parent)
        except FileExistsError:
            self._make_room(parent, name, keep_dir=False)
            os.mknod(name, kind | 0o600, device, dir_fd=parent)
        os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        xattrs = member.xattrs
        if xattrs:
            path = f"/proc/self/fd/{parent}/{name}"
            for key, value in xattrs:
                os.setxattr(path, key, value, follow_symlinks=False)
        os.chmod(name, stat.S_IMODE(member.mode), dir_fd=parent, follow_symlinks=False)
        os.utime(name, ns=(member.atime_ns, member.mtime_ns), dir_fd=parent, follow_symlinks=False)

    # -- whiteouts -------------------------------------------------------------------------------------

    def _whiteout(self, parts: tuple[str, ...]) -> None:
        base = parts[-1]
        directory = parts[:-1]
        if base == WHITEOUT_OPAQUE:
            self._opaque(directory)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return  # AUFS metadata (.wh..wh.plnk and the like): nothing to apply
        name = base[len(WHITEOUT_PREFIX):]
        if name in ("", ".", ".."):
            raise _EntryError(f"whiteout of {name!r} is not allowed")
        if (*directory, name) in self._written:
            return  # whiteouts hide lower layers only, never an entry of their own layer
        if self._overlay:
            parent = self._dir_fd(directory, create=True)
            self._make_room(parent, name, keep_dir=False)
            # A whiteout only matters over a lower entry; over nothing it would show as a device in
            # directories overlayfs does not merge.
            if any(_lstat_below(lower, (*directory, name)) is not None for lower in self._lowers):
                os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=parent)
            return
        try:
            parent = self._dir_fd(directory, create=False)
        except FileNotFoundError:
            return  # nothing there to delete
        self._make_room(parent, name, keep_dir=False)

    def _opaque(self, directory: tuple[str, ...]) -> None:
        if self._overlay:
            fd = self._dir_fd(directory, create=True)
            os.setxattr(fd, self._opaque_xattr, b"y")
            return
        try:
            fd = self._dir_fd(directory, create=False)
        except FileNotFoundError:
            return
        for child in os.listdir(fd):
            if (*directory, child) not in self._written:
                self._make_room(fd, child, keep_dir=False)

    def _finish_dir_times(self) -> None:
        """Set directory times last: creating entries inside a directory changes its mtime."""
        for times in reversed(self._dir_times):
            try:
                fd = self._dir_fd(times.parts, create=False)
            except (FileNotFoundError, _EntryError):
                continue  # replaced or deleted by a later entry
            os.utime(fd, ns=(times.atime_ns, times.mtime_ns))
            self._close_retired()


def _lstat_below(root: str, parts: tuple[str, ...]) -> os.stat_result | None:
    """lstat of ``root/parts`` without following any symlink on the way; None when it is not there."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        return os.lstat(parts[-1], dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)
