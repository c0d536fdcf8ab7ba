"""Resolving a container's user through its rootfs's ``/etc/passwd`` and ``/etc/group``.

The files are read as the container would see them: every symlink on the way is resolved inside
the rootfs (an absolute target starts again at the rootfs, ``..`` stops at it), so a hostile image
whose ``/etc/passwd`` links to ``/etc/shadow`` or ``../../..`` reads its own files or nothing,
never the host's. Only regular files are read, and at most :data:`MAX_FILE_SIZE` bytes of them.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from berth.core.errdefs import InvalidArgument, NotFound

__all__ = ["MAX_FILE_SIZE", "MAX_ID", "ResolvedUser", "UserFiles", "read_in_root", "read_user_files", "resolve_user"]

MAX_FILE_SIZE = 4 << 20
#: Largest uid or gid accepted (runc's limit, which containerd follows).
MAX_ID = 2**31 - 1
_MAX_SYMLINKS = 40


@dataclass(frozen=True, kw_only=True)
class ResolvedUser:
    uid: int
    gid: int
    #: Supplementary groups, the primary group first.
    additional_gids: tuple[int, ...]

    def to_spec(self) -> dict[str, object]:
        return {"uid": self.uid, "gid": self.gid, "additionalGids": list(self.additional_gids)}


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _open_in_root(root: Path, path: str) -> int | None:
    """Open ``path`` read-only as seen from inside ``root``; ``None`` if it does not exist there or is
    not a regular file. Raises OSError (ELOOP) on a symlink loop."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    stack = [root_fd]  # directory fds from the root down to the current one
    try:
        todo = _parts(path)
        hops = 0
        while todo:
            name = todo.pop(0)
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            try:
                st = os.stat(name, dir_fd=stack[-1], follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > _MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, f"too many symlinks resolving {path} in {root}")
                target = os.readlink(name, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo[:0] = _parts(target)
                continue
            # O_NOFOLLOW everywhere: a component swapped for a symlink meanwhile fails, never escapes.
            if todo:
                if not stat.S_ISDIR(st.st_mode):
                    return None
                stack.append(os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     dir_fd=stack[-1]))
                continue
            if not stat.S_ISREG(st.st_mode):
                return None
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=stack[-1])
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                return None
            return fd
        return None
    finally:
        for fd in stack:
            os.close(fd)


def read_in_root(root: Path, path: str) -> str | None:
    """The text of the regular file ``path`` inside ``root`` (symlinks resolved within ``root``), or
    ``None`` when there is none. Blocking: call it from a worker thread.

    Raises:
        InvalidArgument: the file is larger than :data:`MAX_FILE_SIZE` or a symlink loops.
        NotFound: ``root`` itself does not exist.
    """
    try:
        fd = _open_in_root(root, path)
    except FileNotFoundError:
        raise NotFound(f"rootfs {root} does not exist") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise InvalidArgument(f"cannot read /{path.lstrip('/')} in the rootfs: symlink loop") from None
        raise
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as file:
        data = file.read(MAX_FILE_SIZE + 1)
    if len(data) > MAX_FILE_SIZE:
        raise InvalidArgument(f"/{path.lstrip('/')} in the rootfs is larger than {MAX_FILE_SIZE} bytes")
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class UserFiles:
    """An image's ``/etc/passwd`` and ``/etc/group`` as :func:`read_in_root` read them (``None``: absent), kept
    to resolve the users of its next containers without its rootfs."""

    passwd: str | None
    group: str | None


def read_user_files(root: Path) -> UserFiles:
    """Both files of ``root``. Blocking. Raises as :func:`read_in_root`."""
    return UserFiles(read_in_root(root, "etc/passwd"), read_in_root(root, "etc/group"))


def _user_file(root: Path | UserFiles | None, name: str) -> str | None:
    """The text of ``/etc/<name>`` (``passwd`` or ``group``) of ``root``; None without one."""
    if isinstance(root, UserFiles):
        return root.passwd if name == "passwd" else root.group
    return read_in_root(root, f"etc/{name}") if root else None


def _records(text: str | None, fields: int) -> list[list[str]]:
    """``name:...`` lines with at least ``fields`` fields (comments, blanks and short lines skipped)."""
    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) >= fields:
            out.append(parts)
    return out


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _checked(value: int, what: str, user: str) -> int:
    if value > MAX_ID:
        raise InvalidArgument(f"invalid user {user!r}: {what} out of range (0-{MAX_ID})")
    return value


def resolve_user(root: Path | UserFiles | None, user: str) -> ResolvedUser:
    """Resolve an image ``USER`` value (``name``, ``uid``, ``name:group``, ``uid:gid``, and mixes; empty
    means root) as containerd does, through the ``/etc/passwd`` and ``/etc/group`` of ``root`` (a rootfs, or
    the files already read from one). A numeric uid not in ``/etc/passwd`` gets gid 0; a name must be
    there. Supplementary groups are the groups of ``/etc/group`` listing the user by name. With no
    ``root``, only numeric values resolve. Blocking (it may read a rootfs): call it from a worker thread.

    Raises:
        InvalidArgument: malformed value, or an id out of range.
        NotFound: a user or group name absent from the rootfs.
    """
    parts = (user or "0").split(":")
    if len(parts) > 2 or not all(parts):
        raise InvalidArgument(f"invalid user {user!r}: use name, uid, name:group or uid:gid")
    passwd: list[list[str]] | None = None
    groups: list[list[str]] | None = None

    def users() -> list[list[str]]:
        nonlocal passwd
        if passwd is None:
            passwd = _records(_user_file(root, "passwd"), 4)
        return passwd

    def group_records() -> list[list[str]]:
        nonlocal groups
        if groups is None:
            groups = _records(_user_file(root, "group"), 3)
        return groups

    name_or_uid = parts[0]
    uid = _number(name_or_uid)
    if uid is None:
        entry = next((p for p in users() if p[0] == name_or_uid and _number(p[2]) is not None), None)
        if entry is None:
            raise NotFound(f"user {name_or_uid!r} not found in the image's /etc/passwd")
        uid, gid = int(entry[2]), _number(entry[3]) or 0
    else:
        _checked(uid, "uid", user)
        entry = next((p for p in users() if _number(p[2]) == uid), None)
        gid = (_number(entry[3]) or 0) if entry is not None else 0
    if len(parts) == 2:
        group = _number(parts[1])
        if group is None:
            match = next((g for g in group_records() if g[0] == parts[1] and _number(g[2]) is not None), None)
            if match is None:
                raise NotFound(f"group {parts[1]!r} not found in the image's /etc/group")
            group = int(match[2])
        gid = _checked(group, "gid", user)
    _checked(uid, "uid", user)
    username = entry[0] if entry is not None else ""
    extra: list[int] = [gid]
    if username:
        for record in group_records():
            members = [m.strip() for m in record[3].split(",")] if len(record) > 3 else []
            number = _number(record[2])
            if record[0] != username and username in members and number is not None and number not in extra:
                extra.append(number)
    return ResolvedUser(uid=uid, gid=gid, additional_gids=tuple(extra))
