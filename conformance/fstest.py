"""Filesystem appliers and a tree comparison, after containerd's ``continuity/fs/fstest``.

An **applier** is a function ``(root: Path) -> None`` that changes the tree under ``root``; paths are
relative to ``root`` whether or not they start with ``/``. :func:`check_directory_equal` compares two
trees by type, mode, owner, size, content, symlink target, xattrs (``user.*`` and ``trusted.*``
except overlay's own) and hardlink structure, and raises :class:`TreeMismatch` naming the first
difference. Appliers and the check block: run them in a worker thread.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "Applier",
    "TreeMismatch",
    "apply",
    "check_directory_equal",
    "chmod",
    "chown",
    "create_dir",
    "create_file",
    "link",
    "remove_all",
    "rename",
    "set_xattr",
    "symlink",
]

Applier = Callable[[Path], None]


class TreeMismatch(AssertionError):
    """Two trees differ; the message says where and how."""


def _at(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def apply(*appliers: Applier) -> Applier:
    """One applier running ``appliers`` in order."""

    def run(root: Path) -> None:
        for applier in appliers:
            applier(root)

    return run


def create_file(path: str, content: bytes, mode: int) -> Applier:
    """Write ``content`` to ``path`` (replacing it) and set its mode."""

    def run(root: Path) -> None:
        target = _at(root, path)
        target.write_bytes(content)
        os.chmod(target, mode)

    return run


def create_dir(path: str, mode: int) -> Applier:
    """Make the directory ``path`` with ``mode`` (no error if it exists; the mode is set either way)."""

    def run(root: Path) -> None:
        target = _at(root, path)
        target.mkdir(exist_ok=True)
        os.chmod(target, mode)

    return run


def remove_all(path: str) -> Applier:
    """Remove ``path`` and everything under it (nothing if absent)."""

    def run(root: Path) -> None:
        target = _at(root, path)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()

    return run


def chown(path: str, uid: int, gid: int) -> Applier:
    def run(root: Path) -> None:
        os.lchown(_at(root, path), uid, gid)

    return run


def chmod(path: str, mode: int) -> Applier:
    def run(root: Path) -> None:
        os.chmod(_at(root, path), mode)

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
    def run(root: Path) -> None:
        os.symlink(target, _at(root, path))

    return run


def set_xattr(path: str, name: str, value: bytes) -> Applier:
    def run(root: Path) -> None:
        os.setxattr(_at(root, path), name, value, follow_symlinks=False)

    return run


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        if not (name.startswith("user.") or name.startswith("trusted.")) or name.startswith("trusted.overlay."):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


def _describe(root: Path) -> tuple[dict[str, tuple[object, ...]], list[frozenset[str]]]:
    entries: dict[str, tuple[object, ...]] = {}
    inodes: dict[tuple[int, int], set[str]] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(directory) / name
            relative = "/" + str(path.relative_to(root))
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            detail: object = None
            if stat.S_ISREG(st.st_mode):
                detail = (st.st_size, path.read_bytes())
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), set()).add(relative)
            elif stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                detail = st.st_rdev
            entries[relative] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, detail, _xattrs(path))
    links = sorted((frozenset(group) for group in inodes.values() if len(group) > 1), key=sorted)
    return entries, links


def check_directory_equal(expected: Path, actual: Path) -> None:
    """Raise :class:`TreeMismatch` at the first difference between the trees under the two roots."""
    want, want_links = _describe(expected)
    got, got_links = _describe(actual)
    for path in sorted(set(want) | set(got)):
        if path not in got:
            raise TreeMismatch(f"{path} is missing from {actual}")
        if path not in want:
            raise TreeMismatch(f"{path} is in {actual} but not expected")
        fields = ("type", "mode", "uid", "gid", "content", "xattrs")
        for field, a, b in zip(fields, want[path], got[path], strict=True):
            if a != b:
                if field in ("type", "mode") and isinstance(a, int) and isinstance(b, int):
                    shown_a, shown_b = oct(a), oct(b)
                else:
                    shown_a, shown_b = repr(a)[:120], repr(b)[:120]
                raise TreeMismatch(f"{path}: {field} differs: expected {shown_a}, got {shown_b}")
    if want_links != got_links:
        raise TreeMismatch(f"hard links differ: expected {[sorted(g) for g in want_links]}, "
                           f"got {[sorted(g) for g in got_links]}")
