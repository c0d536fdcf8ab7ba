"""containerd's snapshotter testsuite (berth.conformance.snapshotter) on every built-in snapshotter,
mounting for real, and once through the namespaced metadata layer."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from btrfs_fixture import btrfs_root  # noqa: F401 (a fixture)

from berth.conformance.pytest_plugin import snapshotter_tests
from berth.core.metadata.db import MetadataDB
from berth.core.metadata.snapshots import NamespacedSnapshotter
from berth.core.snapshots.snapshotter import Snapshotter
from berth.snapshotters.btrfs.btrfs import BtrfsSnapshotter
from berth.snapshotters.native.native import NativeSnapshotter
from berth.snapshotters.overlayfs.overlayfs import OverlaySnapshotter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the snapshotter cases mount filesystems: run as root")


@contextlib.asynccontextmanager
async def open_native(root: Path) -> AsyncIterator[Snapshotter]:
    sn = await NativeSnapshotter.open(root)
    try:
        yield sn
    finally:
        await sn.aclose()


@contextlib.asynccontextmanager
async def open_overlayfs(root: Path) -> AsyncIterator[Snapshotter]:
    sn = await OverlaySnapshotter.open(root)
    try:
        yield sn
    finally:
        await sn.aclose()


@contextlib.asynccontextmanager
async def open_namespaced_overlayfs(root: Path) -> AsyncIterator[Snapshotter]:
    backend = await OverlaySnapshotter.open(root / "backend")
    db = await MetadataDB.open(root / "meta.db")
    try:
        yield NamespacedSnapshotter(db, "overlayfs", backend)
    finally:
        await db.aclose()
        await backend.aclose()


@pytest.fixture
def open_btrfs(btrfs_root: Path) -> Callable[[Path], AbstractAsyncContextManager[Snapshotter]]:  # noqa: F811
    """A factory putting the snapshotter on a fresh btrfs loop filesystem (the case's root is on ext4)."""

    @contextlib.asynccontextmanager
    async def open_snapshotter(root: Path) -> AsyncIterator[Snapshotter]:
        sn = await BtrfsSnapshotter.open(btrfs_root / root.parent.name)
        try:
            yield sn
        finally:
            await sn.aclose()

    return open_snapshotter


def _redirect_dir() -> bool:
    """Whether overlayfs may rename directories of lower layers (the kernel's redirect_dir)."""
    try:
        return Path("/sys/module/overlay/parameters/redirect_dir").read_text().strip() in ("Y", "on")
    except OSError:
        return False


test_native = snapshotter_tests(open_native)
test_overlayfs = snapshotter_tests(open_overlayfs, can_rename_lower_dirs=_redirect_dir())
test_metadata_overlayfs = snapshotter_tests(open_namespaced_overlayfs, can_rename_lower_dirs=_redirect_dir())
test_btrfs = snapshotter_tests("open_btrfs")
