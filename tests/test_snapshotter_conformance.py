"""containerd's snapshotter testsuite (berth.conformance.snapshotter) on every built-in snapshotter,
mounting for real, and once through the namespaced metadata layer; then checks of the harness itself
(the tree comparison, and that broken or leaking snapshotters are caught and cleaned up after)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
from btrfs_fixture import btrfs_root  # noqa: F401 (a fixture)

from berth.conformance import fstest
from berth.conformance.pytest_plugin import snapshotter_tests
from berth.conformance.snapshotter import check_snapshotter, overlay_renames_lower_dirs
from berth.core.metadata.db import MetadataDB
from berth.core.metadata.snapshots import NamespacedSnapshotter
from berth.core.snapshots.mount import mount, unmount_all
from berth.core.snapshots.snapshotter import Info, Mount, Snapshotter, Usage
from berth.snapshotters.btrfs.btrfs import BtrfsSnapshotter
from berth.snapshotters.native.native import NativeSnapshotter
from berth.snapshotters.overlayfs.overlayfs import OverlaySnapshotter

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the snapshotter cases mount filesystems: run as root")
OpenSnapshotter = Callable[[Path], AbstractAsyncContextManager[Snapshotter]]


@contextlib.asynccontextmanager
async def open_native(root: Path) -> AsyncIterator[Snapshotter]:
    sn = await NativeSnapshotter.open(root)
    try:
        yield sn
    finally:
        await sn.aclose()


def _open_overlayfs(mount_options: Sequence[str] = ()) -> OpenSnapshotter:
    @contextlib.asynccontextmanager
    async def open_overlayfs(root: Path) -> AsyncIterator[Snapshotter]:
        sn = await OverlaySnapshotter.open(root, mount_options=mount_options)
        try:
            yield sn
        finally:
            await sn.aclose()

    return open_overlayfs


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
def open_btrfs(btrfs_root: Path) -> OpenSnapshotter:  # noqa: F811
    """A factory putting the snapshotter on a fresh btrfs loop filesystem (the case's root is on ext4)."""

    @contextlib.asynccontextmanager
    async def open_snapshotter(root: Path) -> AsyncIterator[Snapshotter]:
        sn = await BtrfsSnapshotter.open(btrfs_root / root.parent.name)
        try:
            yield sn
        finally:
            await sn.aclose()

    return open_snapshotter


def overlay_renames(sn: Snapshotter) -> bool:
    """The Rename case's predicate for overlay snapshotters, plain or behind the metadata layer."""
    backend = sn.backend if isinstance(sn, NamespacedSnapshotter) else sn
    assert isinstance(backend, OverlaySnapshotter)
    return overlay_renames_lower_dirs(backend.options)


test_native = snapshotter_tests(open_native)
test_overlayfs = snapshotter_tests(_open_overlayfs(), can_rename_lower_dirs=overlay_renames)
test_metadata_overlayfs = snapshotter_tests(open_namespaced_overlayfs, can_rename_lower_dirs=overlay_renames)
test_btrfs = snapshotter_tests("open_btrfs")
# With redirect_dir=on overlayfs can rename a lower directory: Rename runs in full there.
test_overlayfs_redirect_dir = snapshotter_tests(_open_overlayfs(["redirect_dir=on"]), cases=["Rename"],
                                                can_rename_lower_dirs=overlay_renames)


# ------------------------------------------------------------------------------ the harness itself


def test_overlay_renames_lower_dirs(tmp_path: Path) -> None:
    on, off, absent = tmp_path / "on", tmp_path / "off", tmp_path / "absent"
    on.write_text("Y\n")
    off.write_text("N\n")
    assert overlay_renames_lower_dirs(parameter=on)
    assert not overlay_renames_lower_dirs(parameter=off)
    assert not overlay_renames_lower_dirs(parameter=absent)
    assert overlay_renames_lower_dirs(["index=off", "redirect_dir=on"], parameter=off)
    assert not overlay_renames_lower_dirs(["redirect_dir=follow"], parameter=on)
    assert not overlay_renames_lower_dirs(["userxattr"], parameter=on)


def _tree(root: Path, *appliers: fstest.Applier) -> Path:
    root.mkdir()
    fstest.apply(
        fstest.create_dir("/d/e", 0o750),
        fstest.create_file("/d/e/f", b"content", 0o640),
        fstest.create_file("/g", b"gee", 0o644),
        fstest.symlink("d/e/f", "/s"),
        *appliers,
    )(root)
    return root


@pytest.mark.parametrize(("change", "message"), [
    (fstest.chmod("/d/e/f", 0o600), "/d/e/f (file): mode differs: expected 0640, got 0600"),
    (fstest.chmod("/d", 0o2750), "/d (directory): mode differs: expected 0750, got 2750"),
    (fstest.create_file("/g", b"gee!", 0o644), "/g (file): content differs: expected 3 bytes b'gee', got 4 bytes"),
    (fstest.remove("/g"), "/g (file) is missing"),
    (fstest.create_file("/d/new", b"", 0o644), "/d/new (file) is there but not expected"),
    (fstest.apply(fstest.remove("/s"), fstest.symlink("g", "/s")), "/s (symlink): content differs: expected 'd/e/f'"),
    (fstest.set_xattr("/g", "user.k", b"v"), "/g (file): xattrs differs: expected {}, got {'user.k': b'v'}"),
    (fstest.link("/g", "/d/g2"), "/d/g2 (file) is there but not expected"),
    (fstest.apply(fstest.remove("/s"), fstest.create_dir("/s", 0o755)), "/s (symlink): type differs"),
])
def test_check_directory_equal_reports_the_first_difference(tmp_path: Path, change: fstest.Applier,
                                                            message: str) -> None:
    expected = _tree(tmp_path / "a")
    fstest.check_directory_equal(expected, _tree(tmp_path / "same"))
    with pytest.raises(fstest.TreeMismatch) as caught:
        fstest.check_directory_equal(expected, _tree(tmp_path / "b", change))
    assert message in str(caught.value)


@needs_root
def test_check_directory_equal_owner_and_links(tmp_path: Path) -> None:
    expected = _tree(tmp_path / "a", fstest.link("/g", "/h"), fstest.create_file("/i", b"gee", 0o644))
    owned = _tree(tmp_path / "b", fstest.link("/g", "/h"), fstest.create_file("/i", b"gee", 0o644),
                  fstest.chown("/d/e", 1, 2))
    with pytest.raises(fstest.TreeMismatch, match=r"/d/e \(directory\): uid differs: expected 0, got 1"):
        fstest.check_directory_equal(expected, owned)
    relinked = _tree(tmp_path / "c", fstest.create_file("/h", b"gee", 0o644), fstest.link("/g", "/i"))
    with pytest.raises(fstest.TreeMismatch, match=r"hard links differ: expected \[\['/g', '/h'\]\], "
                                                  r"got \[\['/g', '/i'\]\]"):
        fstest.check_directory_equal(expected, relinked)


def test_create_dir_is_mkdir_all(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        fstest.create_dir("/x/y/z", 0o701)(tmp_path)
    finally:
        os.umask(previous)
    for path in ("x", "x/y", "x/y/z"):
        assert (tmp_path / path).stat().st_mode & 0o7777 == 0o701
    fstest.create_dir("/x/y/z", 0o755)(tmp_path)  # exists: only the mode changes
    assert (tmp_path / "x/y/z").stat().st_mode & 0o7777 == 0o755


class _Delegate:
    """A snapshotter forwarding everything to ``inner``; subclasses break one thing."""

    def __init__(self, inner: Snapshotter) -> None:
        self.inner = inner

    async def stat(self, key: str) -> Info:
        return await self.inner.stat(key)

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        return await self.inner.update(info, fieldpaths)

    async def usage(self, key: str) -> Usage:
        return await self.inner.usage(key)

    async def mounts(self, key: str) -> list[Mount]:
        return await self.inner.mounts(key)

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await self.inner.prepare(key, parent, labels)

    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await self.inner.view(key, parent, labels)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        await self.inner.commit(name, key, labels)

    async def remove(self, key: str) -> None:
        await self.inner.remove(key)

    def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[Info]:
        return self.inner.walk(filters)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _LosesWrites(_Delegate):
    """Active snapshots are mounted on a tmpfs: what is written never reaches the snapshot."""

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        await self.inner.prepare(key, parent, labels)
        return [Mount(type="tmpfs", source="tmpfs", options=("mode=755",))]


class _WritableViews(_Delegate):
    async def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        mounts = await self.inner.view(key, parent, labels)
        return [Mount(type=m.type, source=m.source, target=m.target,
                      options=tuple("rw" if o == "ro" else o for o in m.options)) for m in mounts]


def _wrapped(wrapper: Callable[[Snapshotter], Snapshotter], *, leak: bool = False) -> OpenSnapshotter:
    """Native, wrapped; ``leak``: a tmpfs is mounted in its root and never unmounted."""

    @contextlib.asynccontextmanager
    async def open_snapshotter(root: Path) -> AsyncIterator[Snapshotter]:
        async with open_native(root) as sn:
            if leak:
                (root / "leak").mkdir()
                await trio.to_thread.run_sync(mount, Mount(type="tmpfs", source="tmpfs"), root / "leak")
            yield wrapper(sn)

    return open_snapshotter


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


@needs_root
async def test_failures_are_caught_and_cleaned_up(tmp_path: Path) -> None:
    with pytest.raises(ExceptionGroup) as caught:
        await check_snapshotter(_wrapped(_LosesWrites), tmp_path, ["Chown", "ViewReadonly", "RootPermission"])
    assert "1 case(s) failed: Chown" in str(caught.value)
    (failure,) = caught.value.exceptions
    assert isinstance(failure, AssertionError)
    assert "failed to create snapshot 1" not in str(failure)
    assert "snapshot check failed on snapshot 1" in str(failure)
    assert "/opt (directory) is missing" in str(failure)
    assert "snapshotter conformance case Chown" in failure.__notes__
    assert _mounts_below(tmp_path) == []
    assert os.listdir(tmp_path) == []

    with pytest.raises(ExceptionGroup) as caught:
        await check_snapshotter(_wrapped(_WritableViews), tmp_path, ["ViewReadonly"])
    assert "writing to a view succeeded (expected EROFS)" in str(caught.value.exceptions[0])
    assert _mounts_below(tmp_path) == []
    assert os.listdir(tmp_path) == []


@needs_root
async def test_a_leaked_mount_fails_the_case_and_is_unmounted(tmp_path: Path) -> None:
    try:
        with pytest.raises(ExceptionGroup) as caught:
            await check_snapshotter(_wrapped(_Delegate, leak=True), tmp_path, ["StatActive"])
        assert "the case left" in str(caught.value.exceptions[0])
        assert "/StatActive/root/leak mounted" in str(caught.value.exceptions[0])
        assert _mounts_below(tmp_path) == []
    finally:
        for point in _mounts_below(tmp_path):
            unmount_all(Path(point))


@needs_root
async def test_outcomes_and_notes(tmp_path: Path) -> None:
    outcomes = await check_snapshotter(_open_overlayfs(), tmp_path, ["StatActive", "Rename"],
                                       can_rename_lower_dirs=False)
    assert outcomes["StatActive"] == "passed"
    assert outcomes["Rename"].startswith("passed; left out the rename of /dir1")
    with pytest.raises(KeyError, match="no snapshotter case 'Nope'"):
        await check_snapshotter(open_native, tmp_path, ["Nope"])


@needs_root
async def test_rename_of_a_lower_dir_without_redirect_dir_is_exdev(tmp_path: Path) -> None:
    """Why the Rename case leaves the directory rename out for overlayfs without redirect_dir: the
    full case fails there with EXDEV (and passes with ``redirect_dir=on``, see above)."""
    options = ["redirect_dir=off"]
    with pytest.raises(ExceptionGroup) as caught:
        await check_snapshotter(_open_overlayfs(options), tmp_path, ["Rename"], can_rename_lower_dirs=True)
    failure = caught.value.exceptions[0]
    cause = failure.__cause__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    assert isinstance(cause, OSError), failure
    assert cause.errno == errno.EXDEV, failure
    assert (await check_snapshotter(_open_overlayfs(options), tmp_path, ["Rename"],
                                    can_rename_lower_dirs=overlay_renames))["Rename"].startswith("passed; left out")
