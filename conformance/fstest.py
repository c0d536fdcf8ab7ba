"""Filesystem appliers and a tree comparison, after containerd's ``continuity/fs/fstest``.

An **applier** is a function ``(root: Path) -> None`` that changes the tree under ``root``; paths are
relative to ``root`` whether or not they start with ``/``. The appliers behave as fstest's: for
instance :func:`create_dir` is ``MkdirAll`` (missing parents get the same mode) and :func:`chown`
follows symlinks like ``os.Chown``.

:func:`check_directory_equal` compares two trees entry by entry (the roots themselves excepted) by
type, permission bits (setuid, setgid and sticky included), owner, size and content of regular
files, symlink target, device numbers, extended attributes and hardlink groups, and raises
:class:`TreeMismatch` naming the first difference. Extended attributes are compared in the
``user.``, ``trusted.`` and ``security.capability`` names, minus overlayfs' own bookkeeping
(``trusted.overlay.*``, ``user.overlay.*``); other ``security.*`` names (SELinux labels) depend on
the mount rather than the content. continuity's newer fstest ignores xattrs altogether; comparing
them is stricter, never looser.

Appliers and the check block: run them in a worker thread.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Applier",
    "TreeMismatch",
    "apply",
    "check_directory_equal",
    "check_directory_equal_with_applier",
    "chmod",
    "chown",
    "chtimes",
    "create_dir",
    "create_file",
    "create_socket",
    "link",
    "remove",
    "remove_all",
    "rename",
    "set_xattr",
    "symlink",
]

Applier = Callable[[Path], None]

_OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")


class TreeMismatch(AssertionError):
    """Two trees differ; the message says where and how."""


def _at(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def apply(*appliers: Applier) -> Applier:
    """One applier running ``appliers`` in order (fstest.Apply)."""

    def run(root: Path) -> None:
        for applier in appliers:
            applier(root)

    return run


def create_file(path: str, content: bytes, mode: int) -> Applier:
    """Open ``path`` with O_CREAT|O_TRUNC (created with ``mode``), write ``content``, then chmod to ``mode``."""

    def run(root: Path) -> None:
        target = _at(root, path)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.chmod(target, mode)

    return run


def create_dir(path: str, mode: int) -> Applier:
    """``MkdirAll(path, mode)`` then chmod ``mode``: missing parents are made with ``mode`` too, and an
    existing directory is not an error (its mode is set either way)."""

    def run(root: Path) -> None:
        target = _at(root, path)
        missing: list[Path] = []
        probe = target
        while not probe.is_dir():
            missing.append(probe)
            if probe.parent == probe:
                break
            probe = probe.parent
        for directory in reversed(missing):
            try:
                os.mkdir(directory, mode)
            except FileExistsError:
                if not directory.is_dir():
                    raise
        os.chmod(target, mode)

    return run


def remove(path: str) -> Applier:
    """Remove the file or empty directory ``path`` (``os.Remove``: an error if it is absent)."""

    def run(root: Path) -> None:
        target = _at(root, path)
        try:
            os.unlink(target)
        except IsADirectoryError:
            os.rmdir(target)

    return run


def remove_all(path: str) -> Applier:
    """Remove ``path`` and everything under it; nothing if absent (``os.RemoveAll``)."""

    def run(root: Path) -> None:
        target = _at(root, path)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()

    return run


def chown(path: str, uid: int, gid: int) -> Applier:
    """Change the owner of ``path``, following a symlink (``os.Chown``)."""

    def run(root: Path) -> None:
        os.chown(_at(root, path), uid, gid)

    return run


def chmod(path: str, mode: int) -> Applier:
    def run(root: Path) -> None:
        os.chmod(_at(root, path), mode)

    return run


def chtimes(path: str, atime: float, mtime: float) -> Applier:
    """Set the access and modification times of ``path`` (following a symlink)."""

    def run(root: Path) -> None:
        os.utime(_at(root, path), (atime, mtime))

    return run


def rename(old: str, new: str) -> Applier:
    def run(root: Path) -> None:
        os.rename(_at(root, old), _at(root, new))

    return run


def link(old: str, new: str) -> Applier:
    """A hard link ``new`` to ``old``."""

    def run(root: Path) -> None:
        os.link(_at(root, old), _at(root, new))

    return run


def symlink(target: str, path: str) -> Applier:
    """A symlink at ``path`` pointing to ``target`` (taken literally)."""

    def run(root: Path) -> None:
        os.symlink(target, _at(root, path))

    return run


def create_socket(path: str, mode: int) -> Applier:
    """A unix socket bound at ``path``, then chmod ``mode`` (the socket file outlives the socket)."""

    def run(root: Path) -> None:
        target = _at(root, path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(os.fspath(target))
        os.chmod(target, mode)

    return run


def set_xattr(path: str, name: str, value: bytes) -> Applier:
    def run(root: Path) -> None:
        os.setxattr(_at(root, path), name, value, follow_symlinks=False)

    return run


# ----------------------------------------------------------------------------------- comparison


@dataclass(frozen=True, slots=True)
class _Entry:
    type: str
    mode: int
    uid: int
    gid: int
    content: object  # regular: (size, bytes); symlink: target; device: (major, minor); else None
    xattrs: tuple[tuple[str, bytes], ...]


_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char device",
          stat.S_IFBLK: "block device", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


def _compared_xattr(name: str) -> bool:
    if name.startswith(_OVERLAY_XATTRS):
        return False
    return name.startswith(("user.", "trusted.")) or name == "security.capability"


def _xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.EPERM):  # no xattrs here (e.g. on some symlinks)
            return ()
        raise
    out = []
    for name in sorted(names):
        if _compared_xattr(name):
            try:
                out.append((name, os.getxattr(path, name, follow_symlinks=False)))
            except OSError as err:
                if err.errno != errno.ENODATA:
                    raise
    return tuple(out)


def _describe(root: Path) -> tuple[dict[str, _Entry], list[tuple[str, ...]]]:
    """Every entry below ``root`` by its path ("/a/b"), and the hardlink groups (sorted paths)."""
    entries: dict[str, _Entry] = {}
    inodes: dict[tuple[int, int], list[str]] = {}

    def walk(directory: Path, prefix: str) -> None:
        for name in sorted(os.listdir(directory)):
            path = directory / name
            relative = f"{prefix}/{name}"
            st = os.lstat(path)
            fmt = stat.S_IFMT(st.st_mode)
            content: object = None
            if fmt == stat.S_IFREG:
                content = (st.st_size, path.read_bytes())
            elif fmt == stat.S_IFLNK:
                content = os.readlink(path)
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                content = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if fmt in (stat.S_IFREG, stat.S_IFIFO) and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(relative)
            entries[relative] = _Entry(_TYPES.get(fmt, oct(fmt)), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                       content, _xattrs(path))
            if fmt == stat.S_IFDIR:
                walk(path, relative)

    walk(root, "")
    links = sorted(tuple(sorted(group)) for group in inodes.values() if len(group) > 1)
    return entries, links


def _show(field: str, value: object) -> str:
    if field == "mode" and isinstance(value, int):
        return f"{value:04o}"
    if field == "content" and isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], bytes):
        size, data = value
        shown = repr(data[:60]) + ("..." if len(data) > 60 else "")
        return f"{size} bytes {shown}"
    if field == "xattrs" and isinstance(value, tuple):
        return repr(dict(value))[:200]
    return repr(value)[:200]


def check_directory_equal(expected: Path, actual: Path) -> None:
    """Raise :class:`TreeMismatch` at the first difference (in path order) between the two trees.

    Blocks.
    """
    want, want_links = _describe(expected)
    got, got_links = _describe(actual)
    where = f"{actual} compared with {expected}"
    for path in sorted(set(want) | set(got)):
        if path not in got:
            raise TreeMismatch(f"{where}: {path} ({want[path].type}) is missing")
        if path not in want:
            raise TreeMismatch(f"{where}: {path} ({got[path].type}) is there but not expected")
        a, b = want[path], got[path]
        for field in ("type", "mode", "uid", "gid", "content", "xattrs"):
            if getattr(a, field) != getattr(b, field):
                raise TreeMismatch(f"{where}: {path} ({a.type}): {field} differs: "
                                   f"expected {_show(field, getattr(a, field))}, got {_show(field, getattr(b, field))}")
    if want_links != got_links:
        raise TreeMismatch(f"{where}: hard links differ: expected {[list(g) for g in want_links]}, "
                           f"got {[list(g) for g in got_links]}")


def check_directory_equal_with_applier(root: Path, applier: Applier, scratch: Path) -> None:
    """Apply ``applier`` to a new empty directory under ``scratch`` and compare ``root`` with it.

    Blocks.
    """
    expected = Path(tempfile.mkdtemp(prefix="fstest", dir=scratch))
    try:
        applier(expected)
        check_directory_equal(expected, root)
    finally:
        shutil.rmtree(expected, ignore_errors=True)
