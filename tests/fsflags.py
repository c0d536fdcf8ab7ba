"""What the tests read of a directory's file system: its type, and whether FS_TOPDIR_FL is set."""

from __future__ import annotations

import subprocess
from pathlib import Path

EXT_MAGIC = 0xEF53  # ext2, ext3 and ext4 (statfs f_type)


def filesystem_type(path: Path) -> int:
    return int(subprocess.run(["stat", "-f", "-c", "%t", str(path)], capture_output=True, text=True,
                              check=True).stdout, 16)


def has_topdir_flag(path: Path) -> bool:
    """``lsattr -d``: the flags column shows ``T`` for FS_TOPDIR_FL."""
    listed = subprocess.run(["lsattr", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return "T" in listed.split()[0]
