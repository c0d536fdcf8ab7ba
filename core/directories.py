"""Directories that hold one unrelated subdirectory per container, bundle or snapshot.

ext2/3/4 place a new directory in its parent's block group, and a new file in its directory's, so every
container's directories and files would share one group. Where the file system has no journal, each
inode allocation first skips, one by one, the group's inodes deleted in the last minutes (``ext4``'s
``recently_deleted``): with containers made and removed all day, that scan costs up to milliseconds per
file. ``FS_TOPDIR_FL`` (``chattr +T``) marks a directory as the top of unrelated hierarchies, and the
Orlov allocator then spreads the directories made in it over the block groups, as it does for the
children of ``/``. Other file systems have no such flag and nothing changes there.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

__all__ = ["make_spread_directory", "spread_subdirectories"]

# <linux/fs.h>: _IOR('f', 1, long) and _IOW('f', 2, long); the kernel reads and writes an int there.
_FS_IOC_GETFLAGS = (2 << 30) | (struct.calcsize("l") << 16) | (ord("f") << 8) | 1
_FS_IOC_SETFLAGS = (1 << 30) | (struct.calcsize("l") << 16) | (ord("f") << 8) | 2
_FS_TOPDIR_FL = 0x00020000


def spread_subdirectories(path: Path) -> bool:
    """Set ``FS_TOPDIR_FL`` on directory ``path``. Blocking (an open and one or two ioctls).

    Returns whether the flag is set; False where it cannot be (a file system without such flags, or
    one that refuses them here): it is a hint, and nothing depends on it.
    Raises: OSError when ``path`` cannot be opened as a directory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))[:4])[0]
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags | _FS_TOPDIR_FL) + bytes(4))
        return True
    except OSError:  # ENOTTY, EOPNOTSUPP, EINVAL: no such flags; EPERM, EROFS: not here
        return False
    finally:
        os.close(fd)


def make_spread_directory(path: Path, mode: int = 0o777) -> None:
    """Create directory ``path`` (and its parents; ``mode`` less the umask) if missing, and mark it with
    :func:`spread_subdirectories`. Blocking. Raises: OSError when it cannot be created."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    spread_subdirectories(path)
