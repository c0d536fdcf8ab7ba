"""core/directories.py: the ``FS_TOPDIR_FL`` hint on directories that hold one directory per container,
bundle or snapshot, on a real ext4 (the tests' temporary directory) and where the flag does not exist."""

from __future__ import annotations

import itertools
import os
import statistics
import subprocess
from pathlib import Path

import pytest
from fsflags import EXT_MAGIC, filesystem_type, has_topdir_flag

from berth.core.directories import make_spread_directory, spread_subdirectories
from berth.plugins.content.local.store import LocalStore
from berth.snapshotters.native.native import NativeSnapshotter
from berth.snapshotters.overlayfs.overlayfs import OverlaySnapshotter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and the flag need root")


@pytest.fixture
def ext_dir(tmp_path: Path) -> Path:
    if filesystem_type(tmp_path) != EXT_MAGIC:
        pytest.skip(f"{tmp_path} is not on ext2/3/4, the file systems with FS_TOPDIR_FL")
    return tmp_path


def test_the_flag_is_set_and_kept(ext_dir: Path) -> None:
    target = ext_dir / "containers"
    make_spread_directory(target, 0o700)
    assert has_topdir_flag(target)
    assert target.stat().st_mode & 0o777 == 0o700
    make_spread_directory(target)  # again: it exists, and nothing changes
    assert has_topdir_flag(target)
    assert spread_subdirectories(target)


def test_the_directories_made_in_it_spread_over_block_groups(ext_dir: Path) -> None:
    """What the flag is for: without it every subdirectory lands in its parent's block group, next to the
    one made before; with it the Orlov allocator places them a block group or more apart (an ext4 has at
    least a few hundred inodes per group)."""
    def median_gap(parent: Path) -> int:
        for i in range(16):
            (parent / f"c{i}").mkdir()
        inodes = sorted((parent / f"c{i}").stat().st_ino for i in range(16))
        return int(statistics.median(b - a for a, b in itertools.pairwise(inodes)))

    plain, spread = ext_dir / "plain", ext_dir / "spread"
    plain.mkdir()
    make_spread_directory(spread)
    plain_gap, spread_gap = median_gap(plain), median_gap(spread)
    assert spread_gap >= 256, (plain_gap, spread_gap)
    assert spread_gap >= 16 * plain_gap, (plain_gap, spread_gap)


def test_where_the_flag_does_not_exist_nothing_fails(tmp_path: Path) -> None:
    scratch = tmp_path / "tmpfs"
    scratch.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(scratch)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        assert not spread_subdirectories(scratch)
        make_spread_directory(scratch / "bundles")
        assert (scratch / "bundles").is_dir()
    finally:
        subprocess.run(["umount", str(scratch)], check=False)


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        spread_subdirectories(tmp_path / "missing")


def test_the_content_store_spreads_its_ingests(ext_dir: Path) -> None:
    LocalStore(ext_dir / "content")
    assert has_topdir_flag(ext_dir / "content" / "ingest")


@pytest.mark.parametrize("snapshotter", [OverlaySnapshotter, NativeSnapshotter])
async def test_snapshotters_spread_their_snapshots(ext_dir: Path, snapshotter: type) -> None:
    opened = await snapshotter.open(ext_dir / "sn")
    try:
        assert has_topdir_flag(ext_dir / "sn" / "snapshots")
    finally:
        await opened.aclose()

