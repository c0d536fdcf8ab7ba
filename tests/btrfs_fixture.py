"""A real btrfs filesystem on a loop device, for tests: ``from btrfs_fixture import btrfs_root``.

:func:`btrfs_filesystem` makes a sparse image file, attaches it to a free loop device, runs
``mkfs.btrfs`` and mounts it; on the way out it unmounts every mount of that device (including
ones a failed test left behind) and detaches the loop device, whether the body passed or not. It
skips the test, with the reason, when not root or when loop devices or btrfs are unavailable.

A test module imports the fixture into its namespace to use it::

    from btrfs_fixture import btrfs_root  # noqa: F401 (a fixture)

    async def test_something(btrfs_root: Path) -> None: ...
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from berth.core.snapshots.mount import MountError, unmount
from berth.snapshotters.btrfs.btrfs import parse_mountinfo

__all__ = ["DEFAULT_SIZE", "btrfs_filesystem", "btrfs_root"]

DEFAULT_SIZE = 512 << 20
_COMMAND_TIMEOUT = 60


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=_COMMAND_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def _why_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a btrfs loop filesystem needs root"
    for tool in ("losetup", "mkfs.btrfs"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: util-linux, btrfs-progs)"
    try:
        with open("/proc/filesystems") as f:
            known = f.read().split()
    except OSError:
        known = []
    if "btrfs" not in known and _run("modprobe", "btrfs").returncode != 0:
        return "the kernel has no btrfs support"
    return None


def _mounts_of(device: str, mountpoint: Path) -> list[str]:
    """Mount points of ``device`` or below ``mountpoint``, newest first."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        entries = list(parse_mountinfo(f.read()))
    below = str(mountpoint).rstrip("/") + "/"
    return [e.mountpoint for e in reversed(entries)
            if e.source == device or e.mountpoint == str(mountpoint) or e.mountpoint.startswith(below)]


def _unmount_everything(device: str, mountpoint: Path) -> None:
    for _ in range(100):  # stacked mounts: one layer per pass
        points = _mounts_of(device, mountpoint)
        if not points:
            return
        for point in points:
            try:
                unmount(Path(point))
            except MountError:
                unmount(Path(point), detach=True)


@contextmanager
def btrfs_filesystem(base: Path, size: int = DEFAULT_SIZE) -> Iterator[Path]:
    """Mount a fresh btrfs filesystem of ``size`` bytes (a sparse file under ``base``); yield its
    mount point. Skips the calling test when that is not possible here."""
    reason = _why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="btrfs-", dir=base))
    image, mountpoint = work / "image", work / "mnt"
    mountpoint.mkdir()
    with image.open("wb") as f:
        f.truncate(size)
    attach = _run("losetup", "--find", "--show", str(image))
    if attach.returncode != 0:
        pytest.skip(f"no loop device available: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        made = _run("mkfs.btrfs", "-q", "-f", device)
        if made.returncode != 0:
            pytest.skip(f"mkfs.btrfs {device} failed: {made.stderr.strip()}")
        mounted = _run("mount", "-t", "btrfs", device, str(mountpoint))
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount btrfs from {device}: {mounted.stderr.strip()}")
        yield mountpoint
    finally:
        try:
            _unmount_everything(device, mountpoint)
        finally:
            detached = _run("losetup", "--detach", device)
            if detached.returncode != 0:
                raise RuntimeError(f"losetup --detach {device} failed: {detached.stderr.strip()}")
            image.unlink(missing_ok=True)


@pytest.fixture
def btrfs_root(tmp_path: Path) -> Iterator[Path]:
    """The mount point of a fresh 512 MiB btrfs filesystem on a loop device (root only; skips
    otherwise). Everything is unmounted and the loop device detached afterwards, pass or fail."""
    with btrfs_filesystem(tmp_path) as mountpoint:
        yield mountpoint
