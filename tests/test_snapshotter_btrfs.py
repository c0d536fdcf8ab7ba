"""The btrfs snapshotter on a real btrfs filesystem (a loop device), and its skip status elsewhere."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from btrfs_fixture import btrfs_root  # noqa: F401 (a fixture)
from conftest import BerthdProcess

from berth.core.errdefs import AlreadyExists, FailedPrecondition, NotFound
from berth.core.plugin import SkipPlugin
from berth.core.snapshots.mount import amount_all, aunmount_all
from berth.core.snapshots.snapshotter import Kind, Mount
from berth.snapshotters.btrfs.btrfs import BtrfsSnapshotter, lookup_mount

try:
    import btrfsutil
except ImportError:  # the tests that need it skip; the skip-status tests still run
    btrfsutil = None

URI = "io.berth.snapshotter.v1.btrfs"


@pytest.fixture
async def snapshotter(btrfs_root: Path) -> AsyncIterator[BtrfsSnapshotter]:  # noqa: F811
    if btrfsutil is None:
        pytest.skip("the btrfsutil module is not installed (pip install 'berth[btrfs]')")
    async with await BtrfsSnapshotter.open(btrfs_root / "root") as sn:
        yield sn


@contextlib.asynccontextmanager
async def mounted(mounts: list[Mount], target: Path) -> AsyncIterator[Path]:
    """``mounts`` really mounted on ``target``; unmounted on the way out, whatever happens."""
    await trio.to_thread.run_sync(lambda: target.mkdir(parents=True, exist_ok=True))
    await amount_all(mounts, target)
    try:
        yield target
    finally:
        with trio.CancelScope(shield=True):
            await aunmount_all(target)


def only_entry(directory: Path) -> Path:
    entries = [p for p in directory.iterdir()]
    assert len(entries) == 1, entries
    return entries[0]


async def test_prepare_commit_chain_uses_subvolumes(snapshotter: BtrfsSnapshotter, btrfs_root: Path,  # noqa: F811
                                                    tmp_path: Path) -> None:
    sn = snapshotter
    device = lookup_mount(btrfs_root).source
    assert device.startswith("/dev/loop")

    mounts = await sn.prepare("base-active")
    active = only_entry(sn.root / "active")
    assert btrfsutil.is_subvolume(str(active))
    assert not btrfsutil.get_subvolume_read_only(str(active))
    assert mounts == [Mount(type="btrfs", source=device, options=(f"subvolid={btrfsutil.subvolume_id(str(active))}",))]
    assert await sn.mounts("base-active") == mounts

    async with mounted(mounts, tmp_path / "m1") as root:
        assert (root.stat().st_mode & 0o7777) == 0o755
        (root / "etc").mkdir()
        (root / "etc" / "hostname").write_text("base\n")
    await sn.commit("base", "base-active")

    committed = sn.root / "snapshots" / active.name
    assert btrfsutil.is_subvolume(str(committed))
    assert btrfsutil.get_subvolume_read_only(str(committed))
    assert not active.exists()  # the active subvolume was deleted
    with pytest.raises(NotFound):
        await sn.stat("base-active")
    info = await sn.stat("base")
    assert (info.kind, info.parent) == (Kind.COMMITTED, "")

    mounts = await sn.prepare("child-active", "base")
    child = only_entry(sn.root / "active")
    assert btrfsutil.is_subvolume(str(child))
    assert not btrfsutil.get_subvolume_read_only(str(child))
    async with mounted(mounts, tmp_path / "m2") as root:
        assert (root / "etc" / "hostname").read_text() == "base\n"  # the parent's content is there
        (root / "etc" / "hostname").write_text("child\n")
        (root / "new").write_text("new")
    assert (committed / "etc" / "hostname").read_text() == "base\n"  # the parent is untouched
    await sn.commit("top", "child-active")
    info = await sn.stat("top")
    assert (info.kind, info.parent) == (Kind.COMMITTED, "base")
    assert [i.name for i in [i async for i in sn.walk()]] == ["base", "top"]

    mounts = await sn.view("top-view", "top")
    assert mounts[0].options[-1] == "ro"
    view = only_entry(sn.root / "view")
    assert btrfsutil.get_subvolume_read_only(str(view))
    async with mounted(mounts, tmp_path / "m3") as root:
        assert (root / "etc" / "hostname").read_text() == "child\n"
        assert (root / "new").read_text() == "new"

    with pytest.raises(AlreadyExists):
        await sn.prepare("top-view", "top")
    with pytest.raises(FailedPrecondition):
        await sn.commit("x", "top-view")  # a view is never committed


async def test_view_is_read_only_when_mounted(snapshotter: BtrfsSnapshotter, tmp_path: Path) -> None:
    sn = snapshotter
    async with mounted(await sn.prepare("a"), tmp_path / "w") as root:
        (root / "file").write_text("x")
    await sn.commit("c", "a")
    mounts = await sn.view("v", "c")
    async with mounted(mounts, tmp_path / "v") as root:
        assert (root / "file").read_text() == "x"
        with pytest.raises(OSError, match="Read-only") as caught:
            (root / "other").write_text("no")
        assert caught.value.errno == errno.EROFS
    # a view without a parent is read-only too
    async with mounted(await sn.view("empty"), tmp_path / "e") as root:
        assert list(root.iterdir()) == []
        with pytest.raises(OSError, match="Read-only") as caught:
            (root / "other").write_text("no")
        assert caught.value.errno == errno.EROFS


async def test_remove(snapshotter: BtrfsSnapshotter) -> None:
    sn = snapshotter
    await sn.prepare("a")
    await sn.commit("base", "a")
    await sn.prepare("b", "base")
    await sn.commit("mid", "b")
    await sn.prepare("top", "mid")
    await sn.view("v", "mid")

    for parent in ("base", "mid"):
        with pytest.raises(FailedPrecondition, match="remove"):
            await sn.remove(parent)
    assert len(list((sn.root / "snapshots").iterdir())) == 2

    for key in ("top", "v", "mid", "base"):
        await sn.remove(key)
        with pytest.raises(NotFound):
            await sn.stat(key)
    with pytest.raises(NotFound):
        await sn.remove("base")
    for directory in ("active", "view", "snapshots"):  # no subvolume and no rm-<id> left
        assert list((sn.root / directory).iterdir()) == []
    # keys can be reused
    await sn.prepare("base")
    await sn.remove("base")


async def test_usage(snapshotter: BtrfsSnapshotter, tmp_path: Path) -> None:
    sn = snapshotter
    async with mounted(await sn.prepare("a"), tmp_path / "a") as root:
        (root / "dir").mkdir()
        with (root / "dir" / "big").open("wb") as f:
            f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
    usage = await sn.usage("a")
    assert usage.inodes == 3  # the root, dir and big
    assert usage.size >= 1 << 20
    await sn.commit("base", "a")
    assert await sn.usage("base") == usage  # recorded at commit

    async with mounted(await sn.prepare("b", "base"), tmp_path / "b") as root:
        with (root / "dir" / "small").open("wb") as f:
            f.write(os.urandom(64 << 10))
            os.fsync(f.fileno())
    child = await sn.usage("b")  # only what the child added: not the parent's file, not dir
    assert child.inodes == 1
    assert 64 << 10 <= child.size < 1 << 20
    await sn.commit("top", "b")
    assert await sn.usage("top") == child
    await sn.view("v", "top")
    assert (await sn.usage("v")).size == 0


async def test_cleanup_removes_orphans(snapshotter: BtrfsSnapshotter) -> None:
    sn = snapshotter
    await sn.prepare("a")
    keep = only_entry(sn.root / "active")
    await trio.to_thread.run_sync(btrfsutil.create_subvolume, str(sn.root / "active" / "999"))
    await trio.to_thread.run_sync(btrfsutil.create_subvolume, str(sn.root / "snapshots" / "rm-5"))
    await sn.cleanup()
    assert list((sn.root / "active").iterdir()) == [keep]
    assert list((sn.root / "snapshots").iterdir()) == []


async def test_missing_btrfsutil_is_a_clear_error(btrfs_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setitem(sys.modules, "btrfsutil", None)  # makes `import btrfsutil` fail
    with pytest.raises(FailedPrecondition, match=r"btrfsutil.*berth\[btrfs\]"):
        await BtrfsSnapshotter.open(btrfs_root / "root")


async def test_skip_when_root_is_not_btrfs(tmp_path: Path) -> None:
    assert lookup_mount(tmp_path).fstype != "btrfs"
    with pytest.raises(SkipPlugin, match="must be a btrfs filesystem"):
        await BtrfsSnapshotter.open(tmp_path / "root")


def test_berthd_reports_skip(berthd: BerthdProcess) -> None:
    if lookup_mount(berthd.root).fstype == "btrfs":
        pytest.skip("the daemon's root is on btrfs")
    with berthd.client() as client:
        plugins = client.plugins()
    btrfs = next(p for p in plugins if p["uri"] == URI)
    assert btrfs["status"] == "skip"
    assert "must be a btrfs filesystem" in btrfs["error"]["message"]
    assert str(berthd.root / URI) in btrfs["error"]["message"]
