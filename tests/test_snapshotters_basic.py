"""Quick checks of the overlayfs and native snapshotters, with real mounts (root only).

Every mount a test makes goes through the ``mounter`` fixture, which unmounts it at the end of the
test whether it passed or not. The full containerd suite is in ``berth.conformance.snapshotter``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from conftest import BerthdFactory, Mounter

from berth.core.errdefs import AlreadyExists, FailedPrecondition, NotFound
from berth.core.snapshots.mount import unmount_all
from berth.core.snapshots.snapshotter import Info, Kind, Mount, Usage
from berth.snapshotters.native.native import NativeSnapshotter
from berth.snapshotters.overlayfs.overlayfs import (
    UPPERDIR_LABEL,
    OverlaySnapshotter,
    disk_usage,
    supports_dtype,
)

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount"),
]

INDEX_OFF = ("index=off",) if Path("/sys/module/overlay/parameters/index").exists() else ()

def unmount(target: Path) -> None:
    unmount_all(target)


@pytest.fixture
async def overlay(tmp_path: Path) -> AsyncIterator[OverlaySnapshotter]:
    sn = await OverlaySnapshotter.open(tmp_path / "overlay")
    try:
        yield sn
    finally:
        await sn.aclose()


@pytest.fixture
async def native(tmp_path: Path) -> AsyncIterator[NativeSnapshotter]:
    sn = await NativeSnapshotter.open(tmp_path / "native")
    try:
        yield sn
    finally:
        await sn.aclose()


async def make_layer(sn: OverlaySnapshotter | NativeSnapshotter, mounter: Mounter, name: str, parent: str,
                     change: Callable[[Path], None]) -> None:
    """Prepare on ``parent``, mount, apply ``change``, unmount, commit as ``name``."""
    key = f"extract-{name}"
    target = mounter(await sn.prepare(key, parent))
    try:
        change(target)
    finally:
        unmount(target)
    await sn.commit(name, key)


def assert_readonly(path: Path) -> None:
    """Writing ``path`` fails with EROFS (a real write, not a look at the mount options)."""
    with pytest.raises(OSError, match="Read-only file system") as excinfo:
        path.write_text("no")
    assert excinfo.value.errno == errno.EROFS


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ------------------------------------------------------------------------------------- overlay


async def test_overlay_mount_shapes(tmp_path: Path) -> None:
    sn = await OverlaySnapshotter.open(tmp_path / "o", mount_options=["volatile"])
    snaps = tmp_path / "o" / "snapshots"
    try:
        assert sn.options == ("volatile", *INDEX_OFF)
        [m] = await sn.prepare("a")
        assert (m.type, m.source, m.options) == ("bind", f"{snaps}/1/fs", ("rw", "rbind"))
        assert stat.S_IMODE(os.stat(snaps / "1" / "fs").st_mode) == 0o755
        assert stat.S_IMODE(os.stat(snaps / "1" / "work").st_mode) == 0o711
        await sn.commit("A", "a")
        assert (snaps / "1" / "fs").is_dir()  # committing keeps the directory
        [m] = await sn.view("v0")
        assert (m.type, m.options) == ("bind", ("ro", "rbind"))
        assert not (snaps / "2" / "work").exists()  # a view has no workdir

        await sn.prepare("b", "A")
        await sn.commit("B", "b")
        await sn.prepare("c", "B")
        await sn.commit("C", "c")
        [m] = await sn.prepare("top", "C")
        assert (m.type, m.source) == ("overlay", "overlay")
        assert m.options == (f"workdir={snaps}/5/work", f"upperdir={snaps}/5/fs",
                             f"lowerdir={snaps}/4/fs:{snaps}/3/fs:{snaps}/1/fs", "volatile", *INDEX_OFF)
        assert await sn.mounts("top") == [m]

        [m] = await sn.view("v1", "A")
        assert (m.type, m.source, m.options) == ("bind", f"{snaps}/1/fs", ("ro", "rbind"))
        [m] = await sn.view("v3", "C")
        assert (m.type, m.options) == ("overlay", (f"lowerdir={snaps}/4/fs:{snaps}/3/fs:{snaps}/1/fs", "volatile",
                                                   *INDEX_OFF))
        with pytest.raises(FailedPrecondition):
            await sn.mounts("A")
        with pytest.raises(AlreadyExists):
            await sn.prepare("top", "C")
        with pytest.raises(AlreadyExists):
            await sn.view("A")
        with pytest.raises(NotFound):
            await sn.prepare("x", "missing")
        with pytest.raises(FailedPrecondition):
            await sn.prepare("x", "top")  # parent not committed
        with pytest.raises(FailedPrecondition):
            await sn.commit("V", "v1")  # a view cannot be committed
        assert sorted(os.listdir(snaps), key=int) == [str(i) for i in range(1, 8)]  # no temp dirs left
    finally:
        await sn.aclose()


async def test_overlay_user_index_option_kept(tmp_path: Path) -> None:
    sn = await OverlaySnapshotter.open(tmp_path / "o", mount_options=["index=on"])
    try:
        assert sn.options == ("index=on",)
    finally:
        await sn.aclose()


async def test_overlay_three_layers_merged(overlay: OverlaySnapshotter, mounter: Mounter) -> None:
    def layer1(root: Path) -> None:
        write(root / "a", "v1")
        write(root / "dir" / "x", "x")
        write(root / "only1", "gone later")

    def layer2(root: Path) -> None:
        write(root / "a", "v2")
        write(root / "b", "b")
        (root / "only1").unlink()

    def layer3(root: Path) -> None:
        write(root / "c", "c")

    await make_layer(overlay, mounter, "L1", "", layer1)
    await make_layer(overlay, mounter, "L2", "L1", layer2)
    await make_layer(overlay, mounter, "L3", "L2", layer3)

    mounts = await overlay.prepare("top", "L3")
    upper = Path(next(o for o in mounts[0].options if o.startswith("upperdir=")).removeprefix("upperdir="))
    merged = mounter(mounts)
    assert sorted(os.listdir(merged)) == ["a", "b", "c", "dir"]
    assert (merged / "a").read_text() == "v2"
    assert (merged / "dir" / "x").read_text() == "x"

    # A file made and deleted in the upper leaves nothing behind: no whiteout.
    write(merged / "scratch", "tmp")
    (merged / "scratch").unlink()
    assert os.listdir(upper) == []
    # Deleting a lower file leaves a whiteout (char 0/0) in the upper only.
    (merged / "b").unlink()
    assert sorted(os.listdir(merged)) == ["a", "c", "dir"]
    st = os.lstat(upper / "b")
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == 0
    assert (await overlay.usage("top")).inodes == 2  # the upper root and the whiteout

    # A view of the stack is read-only (an overlay with lowerdirs only) and shows the same.
    view = mounter(await overlay.view("v", "L3"))
    assert sorted(os.listdir(view)) == ["a", "b", "c", "dir"]
    assert_readonly(view / "new")


async def test_overlay_view_readonly_single_parent(overlay: OverlaySnapshotter, mounter: Mounter) -> None:
    await make_layer(overlay, mounter, "base", "", lambda root: write(root / "f", "f"))
    view = mounter(await overlay.view("v", "base"))
    assert (view / "f").read_text() == "f"
    assert_readonly(view / "g")
    empty = mounter(await overlay.view("empty"))
    assert_readonly(empty / "g")


async def test_overlay_upper_owner_follows_parent(overlay: OverlaySnapshotter, mounter: Mounter) -> None:
    await make_layer(overlay, mounter, "base", "", lambda root: os.chown(root, 1000, 1000))
    child = mounter(await overlay.prepare("child", "base"))
    st = os.stat(child)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o755)


async def test_overlay_upperdir_label(tmp_path: Path) -> None:
    sn = await OverlaySnapshotter.open(tmp_path / "o", upperdir_label=True)
    try:
        await sn.prepare("a", labels={"x": "1"})
        upper = str(tmp_path / "o" / "snapshots" / "1" / "fs")
        info = await sn.stat("a")
        assert info.labels == {"x": "1", UPPERDIR_LABEL: upper}
        updated = await sn.update(Info(name="a", kind=Kind.ACTIVE, labels={"y": "2"}))
        assert updated.labels == {"y": "2", UPPERDIR_LABEL: upper}
        assert [i.labels async for i in sn.walk()] == [{"y": "2", UPPERDIR_LABEL: upper}]
    finally:
        await sn.aclose()


async def test_remove_with_children_refused(overlay: OverlaySnapshotter, native: NativeSnapshotter,
                                            mounter: Mounter) -> None:
    for sn in (overlay, native):
        await make_layer(sn, mounter, "base", "", lambda root: write(root / "f", "f"))
        await make_layer(sn, mounter, "mid", "base", lambda root: write(root / "g", "g"))
        await sn.prepare("top", "mid")
        for key in ("base", "mid"):
            with pytest.raises(FailedPrecondition, match="remove"):
                await sn.remove(key)
        for key in ("top", "mid", "base"):
            await sn.remove(key)
        with pytest.raises(NotFound):
            await sn.stat("base")
        assert [i async for i in sn.walk()] == []
        await sn.prepare("base")  # keys are reusable after Remove
        await sn.remove("base")


async def test_overlay_async_remove_and_cleanup(overlay: OverlaySnapshotter, mounter: Mounter,
                                                tmp_path: Path) -> None:
    snaps = tmp_path / "overlay" / "snapshots"
    await make_layer(overlay, mounter, "base", "", lambda root: write(root / "f", "f"))
    await overlay.prepare("work", "base")
    (snaps / "new-crashed").mkdir()  # a creation a crash interrupted
    await overlay.remove("work")
    await overlay.remove("base")
    assert sorted(os.listdir(snaps)) == ["1", "2", "new-crashed"]  # async: only the records went
    await overlay.prepare("kept")
    await overlay.cleanup()
    assert os.listdir(snaps) == ["3"]
    await overlay.cleanup()  # nothing left to do
    assert os.listdir(snaps) == ["3"]


async def test_overlay_sync_remove(tmp_path: Path) -> None:
    sn = await OverlaySnapshotter.open(tmp_path / "o", sync_remove=True)
    snaps = tmp_path / "o" / "snapshots"
    try:
        await sn.prepare("a")
        await sn.prepare("b")
        await sn.remove("a")
        assert os.listdir(snaps) == ["2"]
    finally:
        await sn.aclose()


async def test_overlay_orphan_with_reused_id_replaced(overlay: OverlaySnapshotter, tmp_path: Path) -> None:
    # A crash between renaming a snapshot into place and committing its record leaves a directory
    # under an id the metastore hands out again: the next creation must replace it, not fail.
    snaps = tmp_path / "overlay" / "snapshots"
    write(snaps / "1" / "fs" / "stale", "stale")
    await overlay.prepare("a")
    assert os.listdir(snaps / "1" / "fs") == []


async def test_overlay_refused_where_overlay_cannot_mount(tmp_path: Path, mounter: Mounter) -> None:
    # overlayfs cannot be the upper filesystem of another overlay: init must fail, saying why.
    for name in ("lower", "upper", "work"):
        (tmp_path / name).mkdir()
    merged = mounter([Mount(type="overlay", source="overlay",
                            options=(f"lowerdir={tmp_path / 'lower'}", f"upperdir={tmp_path / 'upper'}",
                                     f"workdir={tmp_path / 'work'}"))])
    with pytest.raises(FailedPrecondition, match="overlayfs is not supported"):
        await OverlaySnapshotter.open(merged / "root")
    assert supports_dtype(tmp_path)


# -------------------------------------------------------------------------------------- native


def build_tree(root: Path) -> None:
    """Every kind of file native must copy, with owners, modes, xattrs and times that stand out."""
    os.chmod(root, 0o751)
    os.chown(root, 7, 8)
    os.setxattr(root, "user.root", b"r")
    d = root / "d"
    d.mkdir()
    write(d / "f", "content")
    os.chown(d / "f", 1234, 5678)
    os.chmod(d / "f", 0o4755)
    os.setxattr(d / "f", "user.x", b"1")
    os.utime(d / "f", ns=(1_000_000_000_123, 2_000_000_000_456))
    os.link(d / "f", d / "f-link")
    os.link(d / "f", root / "f-link2")
    os.symlink("d/f", root / "lnk")
    os.chown(root / "lnk", 42, 43, follow_symlinks=False)
    os.utime(root / "lnk", ns=(3_000_000_000, 4_000_000_000), follow_symlinks=False)
    with open(root / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"x" * 4096)
    os.mkfifo(root / "fifo", 0o640)
    os.chown(root / "fifo", 3, 4)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.mknod(root / "sock", stat.S_IFSOCK | 0o755)
    os.chmod(d, 0o2750)
    os.chown(d, 1000, 1001)
    os.setxattr(d, "user.dir", b"yes")
    os.utime(d, ns=(5_000_000_000, 6_000_000_000))


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """path -> what must survive a copy (lstat fields, symlink target, xattrs, content)."""
    out: dict[str, tuple[object, ...]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = os.lstat(path)
        extra: tuple[object, ...] = ()
        if stat.S_ISLNK(st.st_mode):
            extra = (os.readlink(path),)
        elif stat.S_ISREG(st.st_mode):
            extra = (path.read_bytes(),)
        xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}
        out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_rdev, st.st_nlink,
                                            st.st_mtime_ns, xattrs, *extra)
    return out


async def test_native_full_copy_preserves_everything(native: NativeSnapshotter, mounter: Mounter,
                                                     tmp_path: Path) -> None:
    await make_layer(native, mounter, "base", "", build_tree)
    snaps = tmp_path / "native" / "snapshots"
    [m] = await native.prepare("child", "base")
    assert (m.type, m.source, m.options) == ("bind", str(snaps / "2"), ("rbind", "rw"))
    parent, child = snaps / "1", snaps / "2"
    assert tree(child) == tree(parent)

    # Hardlinks keep their structure inside the copy and share nothing with the parent.
    links = {os.lstat(child / p).st_ino for p in ("d/f", "d/f-link", "f-link2")}
    assert len(links) == 1
    assert links.isdisjoint({os.lstat(parent / "d" / "f").st_ino})
    # The hole stays a hole.
    sparse = os.lstat(child / "sparse")
    assert sparse.st_size == 8 << 20
    assert sparse.st_blocks * 512 <= 64 * 1024
    data = (child / "sparse").read_bytes()
    assert data[(4 << 20) - 1:(4 << 20) + 4097] == b"\0" + b"x" * 4096 + b"\0"

    # The copy is writable and independent of the parent.
    target = mounter([m])
    write(target / "d" / "f", "changed")
    assert (parent / "d" / "f").read_text() == "content"
    assert (target / "d" / "f-link").read_text() == "changed"


async def test_native_view_binds_parent_readonly(native: NativeSnapshotter, mounter: Mounter,
                                                 tmp_path: Path) -> None:
    await make_layer(native, mounter, "base", "", lambda root: write(root / "f", "f"))
    snaps = tmp_path / "native" / "snapshots"
    [m] = await native.view("v", "base")
    assert (m.type, m.source, m.options) == ("bind", str(snaps / "1"), ("rbind", "ro"))
    assert sorted(os.listdir(snaps)) == ["1"]  # nothing copied
    view = mounter([m])
    assert (view / "f").read_text() == "f"
    assert_readonly(view / "g")
    [m] = await native.view("empty")
    assert (m.source, m.options) == (str(snaps / "3"), ("rbind", "ro"))


async def test_native_remove_and_cleanup(native: NativeSnapshotter, mounter: Mounter, tmp_path: Path) -> None:
    snaps = tmp_path / "native" / "snapshots"
    await make_layer(native, mounter, "base", "", lambda root: write(root / "f", "f"))
    await native.prepare("a", "base")
    await native.remove("a")
    assert os.listdir(snaps) == ["1"]  # removed at once
    for leftover in ("new-crashed", "rm-7", "99"):
        write(snaps / leftover / "file", "x")
    await native.cleanup()
    assert os.listdir(snaps) == ["1"]


# --------------------------------------------------------------------------------------- usage


def test_usage_value() -> None:
    assert Usage() == Usage(size=0, inodes=0)
    assert Usage(size=4096, inodes=2).to_wire() == {"size": 4096, "inodes": 2}


def test_disk_usage_counts_inodes_once(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / "f").write_bytes(b"x" * 10000)
    os.link(root / "f", root / "g")
    (root / "sub").mkdir()
    os.symlink("f", root / "sub" / "l")
    usage = disk_usage(root)
    assert usage.inodes == 4  # root, f (= g), sub, l
    expected = sum(os.lstat(p).st_blocks * 512 for p in (root, root / "f", root / "sub", root / "sub" / "l"))
    assert usage.size == expected
    assert usage.size >= 10000


@pytest.mark.parametrize("kind", ["overlay", "native"])
async def test_usage_after_commit(kind: str, overlay: OverlaySnapshotter, native: NativeSnapshotter,
                                  mounter: Mounter) -> None:
    sn = overlay if kind == "overlay" else native
    await make_layer(sn, mounter, "base", "", lambda root: write(root / "big", "x" * 100_000))
    base = await sn.usage("base")
    assert base.inodes == 2
    assert base.size >= 100_000

    target = mounter(await sn.prepare("top", "base"))
    (target / "more").write_bytes(b"y" * 50_000)
    live = await sn.usage("top")  # measured now, without the parent for overlay
    if kind == "overlay":
        assert live.inodes == 2
        assert 50_000 <= live.size < 100_000
    else:
        assert live.inodes == 3  # a full copy
        assert live.size >= 150_000
    unmount(target)
    await sn.commit("top-c", "top")
    assert await sn.usage("top-c") == live
    assert await sn.usage("base") == base


# ------------------------------------------------------------------------------------- plugins


def test_plugins_load_in_berthd(berthd_factory: BerthdFactory) -> None:
    daemon = berthd_factory.start()
    with daemon.client() as client:
        plugins = client.call("introspection.plugins", {"filters": ["type==io.berth.snapshotter.v1"]})["plugins"]
    by_id = {p["id"]: p for p in plugins}
    for name in ("overlayfs", "native"):
        assert by_id[name]["status"] == "ok", by_id[name]["error"]
        assert by_id[name]["exports"] == {"root": str(daemon.root / f"io.berth.snapshotter.v1.{name}")}


def test_overlay_plugin_error_when_unsupported(berthd_factory: BerthdFactory, mounter: Mounter,
                                              tmp_path: Path) -> None:
    for name in ("lower", "upper", "work"):
        (tmp_path / name).mkdir()
    merged = mounter([Mount(type="overlay", source="overlay",
                            options=(f"lowerdir={tmp_path / 'lower'}", f"upperdir={tmp_path / 'upper'}",
                                     f"workdir={tmp_path / 'work'}"))])
    # With overlayfs unusable, the snapshot service and the image unpacker must be pointed at another
    # snapshotter: naming a plugin that failed is a startup error.
    daemon = berthd_factory.start({"plugins": {
        "io.berth.snapshotter.v1.overlayfs": {"root_path": str(merged / "root")},
        "io.berth.rpc.v1.snapshots": {"default_snapshotter": "native"},
        "io.berth.transfer.v1.local": {"snapshotter": "native"}}})
    try:
        with daemon.client() as client:
            [plugin] = client.call("introspection.plugins",
                                   {"filters": ["id==overlayfs"]})["plugins"]
        assert plugin["status"] == "error"
        assert "overlayfs is not supported" in plugin["error"]["message"]
        assert plugin["error"]["code"] == "failed_precondition"
    finally:
        daemon.stop()


async def test_walk_allows_calls_while_iterating(overlay: OverlaySnapshotter) -> None:
    for key in ("a", "b", "c"):
        await overlay.prepare(key)
    seen = []
    async for info in overlay.walk():
        assert await overlay.stat(info.name) == info
        seen.append(info.name)
    assert seen == ["a", "b", "c"]
    assert [i.name async for i in overlay.walk(["name==b"])] == ["b"]


async def test_calls_after_close_are_refused(tmp_path: Path) -> None:
    sn = await NativeSnapshotter.open(tmp_path / "native")
    await sn.aclose()
    await sn.aclose()  # idempotent
    with pytest.raises(FailedPrecondition, match="closed"):
        await sn.prepare("after-close")
