"""containerd's snapshotter testsuite (``core/snapshots/testsuite``), case by case under its names.

Any :class:`~berth.core.snapshots.snapshotter.Snapshotter` can run it. Give a factory::

    def open_snapshotter(root: Path) -> AbstractAsyncContextManager[Snapshotter]: ...

and call :func:`check_snapshotter` (or use :func:`berth.conformance.pytest_plugin.snapshotter_tests`
for one pytest test per case). Each case gets a fresh directory holding ``root/`` (given to the
factory) and ``work/`` (mount points), runs in namespace ``testsuite`` with the umask cleared, labels
every snapshot ``berth.io/gc.root``, and **mounts for real** (root is needed): the trees it builds
through the snapshotter are compared with the same changes applied to a plain directory, by
content, mode, owner, xattrs and links. Every mount a case makes is unmounted even when it fails.

Rename: containerd always drops the rename of a directory that lives in a lower layer for
``overlayfs`` (and fuse-overlayfs), since without the kernel's ``redirect_dir`` overlayfs answers
such a rename with EXDEV. Here it is dropped only when the snapshotter cannot do it, which the
factory's owner says with ``can_rename_lower_dirs``: ``True`` (the default), ``False``, or a
predicate on the opened snapshotter; :func:`overlay_renames_lower_dirs` tells, from an overlay
snapshotter's mount options and the kernel's default, whether its mounts can. A dropped step is
reported as a note (see :func:`run_snapshotter_case`).

After a case everything left mounted below its directory is unmounted and the directory removed;
a case that leaves a mount behind fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import trio

from berth.conformance import fstest
from berth.core.errdefs import InvalidArgument
from berth.core.namespaces import with_namespace
from berth.core.snapshots.mount import mount_all, unmount_all
from berth.core.snapshots.snapshotter import Info, Kind, Mount, Snapshotter

__all__ = [
    "SNAPSHOTTER_CASES",
    "OpenSnapshotter",
    "RenameSupport",
    "SnapshotterCase",
    "check_snapshotter",
    "overlay_renames_lower_dirs",
    "run_snapshotter_case",
]

OpenSnapshotter = Callable[[Path], AbstractAsyncContextManager[Snapshotter]]
#: Whether a snapshotter's mounts can rename a directory of a lower layer, or a predicate telling it.
RenameSupport = bool | Callable[[Snapshotter], bool]
NAMESPACE = "testsuite"
GC_ROOT = "berth.io/gc.root"
#: Clock granularity allowed when checking that a time lies inside a window.
TIME_SLACK = 0.05


_REDIRECT_DIR_PARAMETER = Path("/sys/module/overlay/parameters/redirect_dir")


def overlay_renames_lower_dirs(mount_options: Sequence[str] = (), *,
                               parameter: Path = _REDIRECT_DIR_PARAMETER) -> bool:
    """Whether overlay mounts with ``mount_options`` can rename a directory of a lower layer.

    That takes ``redirect_dir=on``: set in the options, or the kernel's default (the ``overlay``
    module's ``redirect_dir`` parameter, from ``CONFIG_OVERLAY_FS_REDIRECT_DIR``) when the options
    say nothing. ``userxattr`` turns it off (unprivileged overlay), as do ``redirect_dir=off``,
    ``follow`` and ``nofollow``.
    """
    redirect: str | None = None
    for option in mount_options:
        if option == "userxattr":
            return False
        if option.startswith("redirect_dir="):
            redirect = option.partition("=")[2]
    if redirect is not None:
        return redirect == "on"
    try:
        return parameter.read_text().strip() in ("Y", "on")
    except OSError:
        return False


@dataclass(frozen=True)
class Ctx:
    """What a case gets: the snapshotter, the work directory and the suite's options."""

    sn: Snapshotter
    work: Path
    can_rename_lower_dirs: bool
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SnapshotterCase:
    name: str
    check: Callable[[Ctx], Awaitable[None]]


def _labels() -> dict[str, str]:
    return {GC_ROOT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _fail(message: str) -> NoReturn:
    raise AssertionError(message)


def _equal(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        _fail(f"{what}: expected {expected!r}, got {actual!r}")


async def _mkdir(path: Path) -> Path:
    await trio.to_thread.run_sync(lambda: path.mkdir(parents=True, exist_ok=True))
    return path


@contextlib.asynccontextmanager
async def mounted(mounts: Sequence[Mount], target: Path) -> AsyncIterator[Path]:
    """Mount on ``target`` for the block; always unmounted after."""
    await trio.to_thread.run_sync(mount_all, mounts, target)
    try:
        yield target
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(unmount_all, target)


@contextlib.asynccontextmanager
async def _temp_mounted(mounts: Sequence[Mount], work: Path, prefix: str) -> AsyncIterator[Path]:
    """Mount on a new temporary directory of ``work`` for the block; unmounted and removed after.

    The directory is removed with rmdir, never recursively: should the unmount have failed, the
    snapshot's files stay where they are.
    """
    where = Path(await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix=prefix, dir=work)))
    try:
        async with mounted(mounts, where):
            yield where
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_rmdir, where)


def _rmdir(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


async def _apply(applier: fstest.Applier, root: Path) -> None:
    await trio.to_thread.run_sync(applier, root)


async def _check_equal(expected: Path, actual: Path) -> None:
    await trio.to_thread.run_sync(fstest.check_directory_equal, expected, actual)


async def _check_equal_with_applier(cx: Ctx, actual: Path, applier: fstest.Applier) -> None:
    await trio.to_thread.run_sync(fstest.check_directory_equal_with_applier, actual, applier, cx.work)


@contextlib.asynccontextmanager
async def _prepare_mount(cx: Ctx, name: str, parent: str) -> AsyncIterator[tuple[str, Path]]:
    """containerd's snapshotterPrepareMount: Prepare the key ``work/<name>`` on ``parent`` and mount it
    on that directory for the block (unmounted after). Yields the key and the mount point."""
    target = await _mkdir(cx.work / name)
    key = str(target)
    mounts = await cx.sn.prepare(key, parent, _labels())
    if not mounts:
        _fail("expected mounts to have entries")
    async with mounted(mounts, target):
        yield key, target


async def _create_snapshot(cx: Ctx, parent: str, applier: fstest.Applier, index: int) -> str:
    """Prepare on ``parent``, apply through a real mount, commit; return the committed name."""
    name = f"layer-{index}-{os.urandom(4).hex()}"
    prepare = f"{name}-prepare"
    mounts = await cx.sn.prepare(prepare, parent, _labels())
    async with _temp_mounted(mounts, cx.work, "prepare") as where:
        await _apply(applier, where)
    await cx.sn.commit(name, prepare, _labels())
    return name


async def _check_snapshot(cx: Ctx, name: str, flat: Path) -> None:
    """A view of ``name`` must equal ``flat``."""
    view = f"{name}-view"
    mounts = await cx.sn.view(view, name, _labels())
    try:
        async with _temp_mounted(mounts, cx.work, "check") as where:
            await _check_equal(flat, where)
    except BaseException:
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await cx.sn.remove(view)
        raise
    await cx.sn.remove(view)


async def check_snapshots(cx: Ctx, *appliers: fstest.Applier) -> None:
    """containerd's checkSnapshots: a chain, one applier per layer, each checked through a view."""
    flat = Path(await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="flat", dir=cx.work)))
    try:
        parent = ""
        for index, applier in enumerate(appliers, 1):
            try:
                name = await _create_snapshot(cx, parent, applier, index)
            except Exception as err:
                raise AssertionError(f"failed to create snapshot {index}: {err}") from err
            await _apply(applier, flat)
            try:
                await _check_snapshot(cx, name, flat)
            except AssertionError as err:
                raise AssertionError(f"snapshot check failed on snapshot {index}: {err}") from err
            parent = name
    finally:
        await trio.to_thread.run_sync(shutil.rmtree, flat, True)


# ------------------------------------------------------------------------------------------ cases


async def check_basic(cx: Ctx) -> None:
    initial = fstest.apply(fstest.create_file("/foo", b"foo\n", 0o777), fstest.create_dir("/a", 0o755),
                           fstest.create_dir("/a/b", 0o755), fstest.create_dir("/a/b/c", 0o755))
    diff = fstest.apply(fstest.create_file("/bar", b"bar\n", 0o777),  # and /foo now says bar
                        fstest.create_file("/foo", b"bar\n", 0o777), fstest.remove_all("/a/b"))
    async with _prepare_mount(cx, "preparing", "") as (preparing, target):
        await _apply(initial, target)
    committed = str(cx.work / "committed")
    await cx.sn.commit(committed, preparing, _labels())
    si = await cx.sn.stat(committed)
    _equal(si.parent, "", "parent of the first commit")
    _equal(si.kind, Kind.COMMITTED, "kind after commit")
    await _must_fail(cx.sn.stat(preparing), f"Stat of {preparing} after its Commit")

    async with _prepare_mount(cx, "nextlayer", committed) as (nxt, target):
        await _check_equal_with_applier(cx, target, initial)
        await _apply(diff, target)
    ni = await cx.sn.stat(nxt)
    _equal(ni.parent, committed, "parent of the next layer")
    _equal(ni.kind, Kind.ACTIVE, "kind of the next layer")
    next_committed = str(cx.work / "committed-next")
    await cx.sn.commit(next_committed, nxt, _labels())
    si2 = await cx.sn.stat(next_committed)
    _equal(si2.parent, committed, "parent of the second commit")
    _equal(si2.kind, Kind.COMMITTED, "kind of the second commit")
    await _must_fail(cx.sn.stat(nxt), f"Stat of {nxt} after its Commit")
    walked = {info.name: info async for info in cx.sn.walk()}  # a walk is not ordered
    for expected in (si, si2):
        if expected.name not in walked:
            _fail(f"walk is missing {expected.name}")
        _equal(walked[expected.name], expected, f"walk's info of {expected.name}")

    view_key = str(cx.work / "nextnextlayer")
    target = await _mkdir(cx.work / "nextnextlayer")
    async with mounted(await cx.sn.view(view_key, next_committed, _labels()), target):
        await _check_equal_with_applier(cx, target, fstest.apply(initial, diff))
    await cx.sn.remove(view_key)
    try:
        await cx.sn.remove(committed)
    except Exception as err:
        if "remove" not in str(err):
            _fail(f"removing a parent failed without mentioning 'remove': {err}")
    else:
        _fail("removing a snapshot with children succeeded")
    await cx.sn.remove(next_committed)
    await cx.sn.remove(committed)


async def check_stat_active(cx: Ctx) -> None:
    async with _prepare_mount(cx, "preparing", "") as (preparing, target):
        await trio.to_thread.run_sync((target / "foo").write_bytes, b"foo\n")
        si = await cx.sn.stat(preparing)
        _equal(si.name, preparing, "name")
        _equal(si.kind, Kind.ACTIVE, "kind")
        _equal(si.parent, "", "parent")


async def check_stat_committed(cx: Ctx) -> None:
    async with _prepare_mount(cx, "preparing", "") as (preparing, target):
        await trio.to_thread.run_sync((target / "foo").write_bytes, b"foo\n")
        committed = str(cx.work / "committed")
        await cx.sn.commit(committed, preparing, _labels())  # still mounted, as in containerd's case
        si = await cx.sn.stat(committed)
        _equal(si.name, committed, "name")
        _equal(si.kind, Kind.COMMITTED, "kind")
        _equal(si.parent, "", "parent")


async def check_transitivity(cx: Ctx) -> None:
    async with _prepare_mount(cx, "preparing", "") as (preparing, target):
        await trio.to_thread.run_sync((target / "foo").write_bytes, b"foo\n")
    snap_a = str(cx.work / "snapA")
    await cx.sn.commit(snap_a, preparing, _labels())
    async with _prepare_mount(cx, "next", snap_a) as (nxt, target):
        await trio.to_thread.run_sync((target / "foo").write_bytes, b"foo bar\n")
    snap_b = str(cx.work / "snapB")
    await cx.sn.commit(snap_b, nxt, _labels())
    si_a = await cx.sn.stat(snap_a)
    si_b = await cx.sn.stat(snap_b)
    si_parent_b = await cx.sn.stat(si_b.parent)
    _equal(si_a.parent, "", "parent of A")
    _equal(si_b.parent, snap_a, "parent of B")
    _equal(si_parent_b.parent, "", "parent of B's parent")


async def _must_fail(action: Awaitable[object], what: str) -> None:
    try:
        await action
    except Exception:
        return
    _fail(f"{what} succeeded")


async def check_prepare_view(cx: Ctx) -> None:
    async with _prepare_mount(cx, "preparing", "") as (preparing, _):
        pass
    snap_a = str(cx.work / "snapA")
    await cx.sn.commit(snap_a, preparing, _labels())
    new_layer = str(cx.work / "newlayer")
    await cx.sn.prepare(new_layer, snap_a, _labels())
    await _must_fail(cx.sn.view(new_layer, snap_a, _labels()), "a View with the key of a Prepare")
    prep_layer = str(cx.work / "prepLayer")
    await cx.sn.prepare(prep_layer, snap_a, _labels())
    await _must_fail(cx.sn.prepare(prep_layer, snap_a, _labels()), "a second Prepare with the same key")
    view_layer = str(cx.work / "viewLayer")
    await cx.sn.view(view_layer, snap_a, _labels())
    await _must_fail(cx.sn.view(view_layer, snap_a, _labels()), "a second View with the same key")


async def _base_snapshots(cx: Ctx) -> None:
    await cx.sn.prepare("c1-a", "", _labels())
    await cx.sn.commit("c1", "c1-a", _labels())
    await cx.sn.prepare("c2-a", "c1", _labels())
    await cx.sn.commit("c2", "c2-a", _labels())
    await cx.sn.prepare("a1", "c2", _labels())
    await cx.sn.prepare("a2", "", _labels())
    await cx.sn.view("v1", "c2", _labels())
    await cx.sn.view("v2", "", _labels())


def _with(info: Info, *, labels: Mapping[str, str], parent: str | None = None) -> Info:
    return Info(name=info.name, kind=info.kind, parent=info.parent if parent is None else parent,
                labels=dict(labels), created_at=info.created_at, updated_at=info.updated_at)


async def check_update(cx: Ctx) -> None:
    t1 = time.time() - TIME_SLACK
    await _base_snapshots(cx)
    t2 = time.time() + TIME_SLACK
    cases = [("c1", Kind.COMMITTED, ""), ("c2", Kind.COMMITTED, "c1"), ("a1", Kind.ACTIVE, "c2"),
             ("a2", Kind.ACTIVE, ""), ("v1", Kind.VIEW, "c2"), ("v2", Kind.VIEW, "")]
    for name, kind, parent in cases:
        st = await cx.sn.stat(name)
        if not t1 <= st.created_at <= t2:
            _fail(f"({name}) created {st.created_at} outside [{t1}, {t2}]")
        _equal(st.updated_at, st.created_at, f"({name}) updated == created")
        _equal((st.kind, st.parent, st.name), (kind, parent, name), f"({name}) kind, parent, name")
        created = st.created_at
        root_time = _labels()[GC_ROOT]
        expected = {"l1": "v1", "l2": "v2", "l3": "v3", GC_ROOT: root_time}
        u1 = time.time() - TIME_SLACK
        st = await cx.sn.update(_with(st, labels=expected, parent="doesnotexist"))
        u2 = time.time() + TIME_SLACK
        _equal(st.created_at, created, f"({name}) created after update")
        if not u1 <= st.updated_at <= u2:
            _fail(f"({name}) updated {st.updated_at} outside [{u1}, {u2}]")
        _equal((st.kind, st.parent, st.name), (kind, parent, name), f"({name}) after update")
        _equal(st.labels, expected, f"({name}) labels")
        st = await cx.sn.update(_with(st, labels={"l1": "updated", "l4": "v4"}), ["labels.l1", "labels.l2"])
        _equal(st.labels, {"l1": "updated", "l3": "v3", GC_ROOT: root_time}, f"({name}) labels by field path")
        expected = {"l4": "v4", GC_ROOT: root_time}
        st = await cx.sn.update(_with(st, labels=expected), ["labels"])
        _equal(st.labels, expected, f"({name}) labels replaced")
        try:
            await cx.sn.update(_with(st, labels=expected, parent="doesnotexist"), ["parent"])
        except InvalidArgument:
            pass
        else:
            _fail(f"({name}) updating the immutable field parent succeeded")


async def check_remove(cx: Ctx) -> None:
    await cx.sn.prepare("committed-a", "", _labels())
    await cx.sn.commit("committed-1", "committed-a", _labels())
    await cx.sn.prepare("reuse-1", "committed-1", _labels())
    await cx.sn.remove("reuse-1")
    await cx.sn.view("reuse-1", "committed-1", _labels())
    await cx.sn.remove("reuse-1")
    await cx.sn.prepare("reuse-1", "", _labels())
    await cx.sn.remove("committed-1")
    await cx.sn.commit("committed-1", "reuse-1", _labels())


async def check_walk(cx: Ctx) -> None:
    root = {GC_ROOT: "check-walk"}
    await cx.sn.prepare("a-np", "", root)
    await cx.sn.prepare("p-tmp", "", root)
    await cx.sn.commit("p", "p-tmp", root)
    await cx.sn.prepare("a", "p", root)
    await cx.sn.view("v", "p", root)
    await cx.sn.prepare("p-wl-tmp", "", root)
    await cx.sn.commit("p-wl", "p-wl-tmp", {"l": "1", **root})
    await cx.sn.prepare("a-wl", "p-wl", {"l": "2", **root})
    await cx.sn.view("v-wl", "p-wl", {"l": "3", **root})
    await cx.sn.prepare("a-np-wl", "", {"l": "2", **root})
    gc = f'labels."{GC_ROOT}"==check-walk'
    table = [
        (["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"], [gc]),
        (["a-np", "a", "a-wl", "a-np-wl"], [f"kind==active,{gc}"]),
        (["v", "v-wl"], [f"kind==view,{gc}"]),
        (["p", "p-wl"], [f"kind==committed,{gc}"]),
        (["p", "a-np-wl"], ["name==p", "name==a-np-wl"]),
        (["a-wl"], ["name==a-wl,labels.l"]),
        (["a", "v"], ["parent==p"]),
        (["a", "v", "a-wl", "v-wl"], [f'parent!="",{gc}']),
        (["p-wl", "a-wl", "v-wl", "a-np-wl"], ["labels.l"]),
        (["a-wl", "a-np-wl"], ["labels.l==2"]),
    ]
    for index, (matches, filters) in enumerate(table):
        actual = sorted([info.name async for info in cx.sn.walk(filters)])
        _equal(actual, sorted(matches), f"[{index}] walk {filters}")


async def check_layer_file_update(cx: Ctx) -> None:
    l1 = fstest.apply(fstest.create_dir("/etc", 0o700), fstest.create_file("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
                      fstest.create_file("/etc/profile", b"PATH=/usr/bin", 0o644))
    l2 = fstest.apply(fstest.create_file("/etc/hosts", b"mydomain 10.0.0.2", 0o644),
                      fstest.create_file("/etc/profile", b"PATH=/usr/bin", 0o666), fstest.create_dir("/root", 0o700),
                      fstest.create_file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644))
    for round_ in range(5):  # containerd runs it 5 times, across second boundaries, for sporadic failures
        if round_:
            await trio.sleep(1 - time.time() % 1)
        await check_snapshots(cx, l1, l2)


async def check_remove_directory_in_lower_layer(cx: Ctx) -> None:
    await check_snapshots(
        cx,
        fstest.apply(fstest.create_dir("/lib", 0o700), fstest.create_file("/lib/hidden", b"", 0o644)),
        fstest.apply(fstest.remove_all("/lib"), fstest.create_dir("/lib", 0o700),
                     fstest.create_file("/lib/not-hidden", b"", 0o644)),
        fstest.apply(fstest.create_file("/lib/newfile", b"", 0o644)),
    )


async def check_chown(cx: Ctx) -> None:
    await check_snapshots(
        cx,
        fstest.apply(fstest.create_dir("/opt", 0o700), fstest.create_dir("/opt/a", 0o700),
                     fstest.create_dir("/opt/a/b", 0o700), fstest.create_file("/opt/a/b/file.txt", b"hello", 0o644)),
        fstest.apply(fstest.chown("/opt", 1, 1), fstest.chown("/opt/a", 1, 1), fstest.chown("/opt/a/b", 1, 1),
                     fstest.chown("/opt/a/b/file.txt", 1, 1)),
    )


async def check_directory_permission_on_commit(cx: Ctx) -> None:
    await check_snapshots(
        cx,
        fstest.apply(*[fstest.create_dir(f"/dir{i}", 0o700) for i in range(1, 6)],
                     fstest.create_file("/dir4/f1", b"...", 0o644), fstest.create_file("/dir5/f1", b"...", 0o644),
                     fstest.chown("/dir1", 1, 1), fstest.chown("/dir2", 1, 1), fstest.chown("/dir3", 1, 1),
                     fstest.chown("/dir5", 1, 1), fstest.chown("/dir5/f1", 1, 1)),
        fstest.apply(fstest.chown("/dir2", 0, 0), fstest.remove_all("/dir3"), fstest.chown("/dir4", 1, 1),
                     fstest.chown("/dir4/f1", 1, 1)),
        fstest.apply(fstest.create_dir("/dir3", 0o700), fstest.chown("/dir3", 1, 1), fstest.remove_all("/dir5"),
                     fstest.create_dir("/dir5", 0o700), fstest.chown("/dir5", 1, 1)),
    )


async def check_remove_intermediate_snapshot(cx: Ctx) -> None:
    async with _prepare_mount(cx, "base", "") as (base, _):
        pass
    committed_base = str(cx.work / "committed-base")
    await cx.sn.commit(committed_base, base, _labels())
    intermediate = str(cx.work / "intermediate")
    await cx.sn.prepare(intermediate, committed_base, _labels())
    committed_inter = str(cx.work / "committed-inter")
    await cx.sn.commit(committed_inter, intermediate, _labels())
    top = str(cx.work / "toplayer")
    await cx.sn.prepare(top, committed_inter, _labels())
    await _must_fail(cx.sn.remove(committed_inter), "removing the intermediate layer")
    await cx.sn.remove(top)
    await cx.sn.remove(committed_inter)
    await cx.sn.remove(committed_base)


async def check_deleted_files_in_child_snapshot(cx: Ctx) -> None:
    await check_snapshots(
        cx,
        fstest.apply(fstest.create_file("/foo", b"foo\n", 0o777), fstest.create_file("/foobar", b"foobar\n", 0o777)),
        fstest.apply(fstest.remove_all("/foobar")),
        fstest.apply(),
    )


async def check_move_file_from_lower_layer(cx: Ctx) -> None:
    await check_snapshots(
        cx,
        fstest.apply(fstest.create_dir("/dir1", 0o700), fstest.create_file("/dir1/f1", b"Hello", 0o644),
                     fstest.create_dir("dir2", 0o700), fstest.create_file("dir2/f2", b"...", 0o644)),
        fstest.apply(fstest.create_dir("/dir3", 0o700), fstest.create_file("/dir3/f1", b"Hello", 0o644),
                     fstest.remove_all("/dir1"), fstest.link("dir2/f2", "dir3/f2"), fstest.remove_all("dir2/f2")),
    )


async def check_view_readonly(cx: Ctx) -> None:
    preparing = str(cx.work / "preparing")
    await cx.sn.prepare(preparing, "", _labels())
    committed = str(cx.work / "committed")
    await cx.sn.commit(committed, preparing, _labels())
    view = str(cx.work / "view")
    mounts = await cx.sn.view(view, committed, _labels())
    target = await _mkdir(cx.work / "view-mount")
    async with mounted(mounts, target):
        try:
            await trio.to_thread.run_sync((target / "testfile").write_bytes, b"testcontent")
        except OSError as err:
            if err.errno != errno.EROFS:
                _fail(f"writing to a view failed with {err}, expected EROFS")
        else:
            _fail("writing to a view succeeded (expected EROFS)")
    await cx.sn.remove(view)
    await cx.sn.remove(committed)


async def check_stat_in_walk(cx: Ctx) -> None:
    prefix = "stats-in-walk-"
    await cx.sn.prepare(f"{prefix}c1-a", "", _labels())
    await cx.sn.commit(f"{prefix}c1", f"{prefix}c1-a", _labels())
    await cx.sn.prepare(f"{prefix}c2-a", f"{prefix}c1", _labels())
    await cx.sn.commit(f"{prefix}c2", f"{prefix}c2-a", _labels())
    await cx.sn.prepare(f"{prefix}a1", f"{prefix}c2", _labels())
    await cx.sn.view(f"{prefix}v1", f"{prefix}c2", _labels())
    seen = 0
    async for info in cx.sn.walk():
        if info.name.startswith(prefix):
            _equal(await cx.sn.stat(info.name), info, f"stat of {info.name} during walk")
            seen += 1
    _equal(seen, 4, "snapshots of this case seen by walk")


async def check_close_twice(cx: Ctx) -> None:
    name = f"closeTwice-{os.urandom(4).hex()}"
    await cx.sn.prepare(f"{name}-prepare", "", _labels())
    await cx.sn.commit(name, f"{name}-prepare", _labels())
    await cx.sn.remove(name)
    await cx.sn.aclose()
    await cx.sn.aclose()


async def check_root_permission(cx: Ctx) -> None:
    async with _prepare_mount(cx, "preparing", "") as (_, target):
        mode = (await trio.to_thread.run_sync(os.stat, target)).st_mode & 0o777
        _equal(oct(mode), oct(0o755), "mode of a new snapshot's root")


async def check_rename(cx: Ctx) -> None:
    l1 = fstest.apply(fstest.create_dir("/dir1", 0o700), fstest.create_dir("/somefiles", 0o700),
                      fstest.create_file("/somefiles/f1", b"was here first!", 0o644),
                      fstest.create_file("/somefiles/f2", b"nothing interesting", 0o644))
    steps = [fstest.rename("/dir1", "/dir2")]
    if not cx.can_rename_lower_dirs:  # as containerd does for overlayfs: it needs redirect_dir
        steps = []
        cx.notes.append("left out the rename of /dir1, a directory of the lower layer: "
                        "the snapshotter's mounts cannot rename lower directories (overlayfs without redirect_dir)")
    steps += [fstest.create_file("/somefiles/f1-overwrite", b"new content 1", 0o644),
              fstest.rename("/somefiles/f1-overwrite", "/somefiles/f1"),
              fstest.rename("/somefiles/f2", "/somefiles/f3")]
    await check_snapshots(cx, l1, fstest.apply(*steps))


async def check_128_layers_mount(cx: Ctx) -> None:
    appliers = [fstest.apply(fstest.create_file("/bottom", b"way at the bottom\n", 0o777),
                             fstest.create_file("/overwriteme", b"FIRST!\n", 0o777),
                             fstest.create_dir("/addhere", 0o755), fstest.create_dir("/onlyme", 0o755),
                             fstest.create_file("/onlyme/bottom", b"bye!\n", 0o777))]
    for i in range(1, 128):
        appliers.append(fstest.apply(
            fstest.create_file("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
            fstest.create_file(f"/addhere/file-{i}", b"same\n", 0o755),
            fstest.remove_all("/onlyme"), fstest.create_dir("/onlyme", 0o755),
            fstest.create_file(f"/onlyme/file-{i}", b"only me!\n", 0o777)))
    flat = await _mkdir(cx.work / "flat")
    parent = ""
    for i, applier in enumerate(appliers):
        preparing = str(cx.work / f"prepare-layer-{i}")
        target = await _mkdir(cx.work / f"prepare-layer-{i}")
        mounts = await cx.sn.prepare(preparing, parent, _labels())
        async with mounted(mounts, target):
            try:
                await _check_equal(flat, target)
            except AssertionError as err:
                raise AssertionError(f"[layer {i}] preparing differs from flat before apply: {err}") from None
            await _apply(applier, flat)
            await _apply(applier, target)
            try:
                await _check_equal(flat, target)
            except AssertionError as err:
                raise AssertionError(f"[layer {i}] preparing differs from flat after apply: {err}") from None
        parent = str(cx.work / f"committed-{i}")
        await cx.sn.commit(parent, preparing, _labels())
    view = str(cx.work / "fullview")
    target = await _mkdir(cx.work / "fullview")
    async with mounted(await cx.sn.view(view, parent, _labels()), target):
        try:
            await _check_equal(flat, target)
        except AssertionError as err:
            raise AssertionError(f"fullview differs from flat: {err}") from None


#: Every case, in containerd's order, under containerd's names (typos included).
SNAPSHOTTER_CASES: dict[str, SnapshotterCase] = {case.name: case for case in (
    SnapshotterCase("Basic", check_basic),
    SnapshotterCase("StatActive", check_stat_active),
    SnapshotterCase("StatComitted", check_stat_committed),
    SnapshotterCase("TransitivityTest", check_transitivity),
    SnapshotterCase("PreareViewFailingtest", check_prepare_view),
    SnapshotterCase("Update", check_update),
    SnapshotterCase("Remove", check_remove),
    SnapshotterCase("Walk", check_walk),
    SnapshotterCase("LayerFileupdate", check_layer_file_update),
    SnapshotterCase("RemoveDirectoryInLowerLayer", check_remove_directory_in_lower_layer),
    SnapshotterCase("Chown", check_chown),
    SnapshotterCase("DirectoryPermissionOnCommit", check_directory_permission_on_commit),
    SnapshotterCase("RemoveIntermediateSnapshot", check_remove_intermediate_snapshot),
    SnapshotterCase("DeletedFilesInChildSnapshot", check_deleted_files_in_child_snapshot),
    SnapshotterCase("MoveFileFromLowerLayer", check_move_file_from_lower_layer),
    SnapshotterCase("ViewReadonly", check_view_readonly),
    SnapshotterCase("StatInWalk", check_stat_in_walk),
    SnapshotterCase("CloseTwice", check_close_twice),
    SnapshotterCase("RootPermission", check_root_permission),
    SnapshotterCase("Rename", check_rename),
    SnapshotterCase("128LayersMount", check_128_layers_mount),
)}


async def run_snapshotter_case(name: str, open_snapshotter: OpenSnapshotter, tmp_path: Path, *,
                               can_rename_lower_dirs: RenameSupport = True) -> list[str]:
    """Run one case in ``tmp_path/<name>/{root,work}``, then unmount what it left and remove that directory.

    Returns notes on what the case left out (the Rename case's lower-directory rename, say).

    Raises:
        AssertionError: the case failed, or it passed but left something mounted.
        KeyError: an unknown case. Any error of the snapshotter or the factory propagates.
    """
    case = SNAPSHOTTER_CASES[name]
    base = tmp_path / name
    previous = os.umask(0)
    passed = False
    notes: list[str] = []
    try:
        root = await _mkdir(base / "root")
        work = await _mkdir(base / "work")
        with with_namespace(NAMESPACE):
            async with open_snapshotter(root) as sn:
                renames = can_rename_lower_dirs(sn) if callable(can_rename_lower_dirs) else can_rename_lower_dirs
                await case.check(Ctx(sn, work, renames, notes))
        passed = True
    finally:
        os.umask(previous)
        with trio.CancelScope(shield=True):
            leftover = await trio.to_thread.run_sync(_clean_up, base)
    if passed and leftover:
        _fail(f"the case left {', '.join(leftover)} mounted (unmounted since)")
    return notes


def _mounts_below(base: Path) -> list[str]:
    prefix = str(base.resolve()) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        points = [line.split()[4].encode("utf-8", "surrogateescape").decode("unicode_escape") for line in f]
    return sorted({p for p in points if p.startswith(prefix)}, key=len, reverse=True)


def _clean_up(base: Path) -> list[str]:
    """Unmount whatever is mounted below ``base`` (deepest first), then remove ``base`` unless a mount
    remains. Returns the mount points found."""
    found = _mounts_below(base)
    for point in found:
        with contextlib.suppress(OSError):
            unmount_all(Path(point))
    if not _mounts_below(base):
        shutil.rmtree(base, ignore_errors=True)
    return found


async def check_snapshotter(open_snapshotter: OpenSnapshotter, tmp_path: Path, cases: Sequence[str] | None = None,
                            *, can_rename_lower_dirs: RenameSupport = True) -> dict[str, str]:
    """Run ``cases`` (default: all 21, in containerd's order), each on a fresh snapshotter.

    Returns each case's outcome: ``"passed"``, followed by ``"; "`` and notes if the case left
    something out.

    Raises:
        ExceptionGroup: the failures, each noted with its case name, after running every case.
        KeyError: an unknown case name (before running any).
    """
    names = list(cases) if cases is not None else list(SNAPSHOTTER_CASES)
    for name in names:
        if name not in SNAPSHOTTER_CASES:
            raise KeyError(f"no snapshotter case {name!r}; the cases are {', '.join(SNAPSHOTTER_CASES)}")
    outcomes: dict[str, str] = {}
    failures: list[Exception] = []
    for name in names:
        try:
            notes = await run_snapshotter_case(name, open_snapshotter, tmp_path,
                                               can_rename_lower_dirs=can_rename_lower_dirs)
        except Exception as err:
            err.add_note(f"snapshotter conformance case {name}")
            failures.append(err)
            outcomes[name] = f"failed: {type(err).__name__}: {err}"
        else:
            outcomes[name] = "; ".join(["passed", *notes])
    if failures:
        failed = [name for name, outcome in outcomes.items() if outcome.startswith("failed")]
        raise ExceptionGroup(f"snapshotter conformance: {len(failed)} case(s) failed: {', '.join(failed)}", failures)
    return outcomes
