"""The differ refuses every layer in the malicious corpus, naming the entry, with nothing outside the snapshot
touched: in overlay mode (straight into an upperdir) and in plain mode (a bind source)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_corpus import CONTAINED, MALICIOUS, Contained, Entry, Malicious, build_layer

from berth.core.errdefs import InvalidArgument
from berth.core.oci import OCI_LAYER
from berth.core.snapshots.snapshotter import Mount
from berth.plugins.differ.walking import WalkingDiffer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ownership, overlay whiteouts)")

#: Places an escape could reach that are outside tmp_path.
_OUTSIDE = [Path("/x"), Path("/abs"), Path("/etc/x"), Path("/tmp/x"), Path("/canary-dir")]


def _tree(top: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Everything below ``top`` except ``skip``: type, mode, owner, size, mtime, content hash, link."""
    seen: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in [*dirnames, *filenames]:
            path = here / name
            info = path.lstat()
            content: object = None
            if stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            seen[str(path.relative_to(top))] = (info.st_mode, info.st_uid, info.st_gid, info.st_size,
                                                info.st_mtime_ns, content)
    return seen


def _outside_state() -> dict[str, object]:
    state: dict[str, object] = {str(p): p.exists() for p in _OUTSIDE}
    passwd = Path("/etc/passwd")
    state["passwd"] = (passwd.stat().st_nlink, hashlib.sha256(passwd.read_bytes()).hexdigest())
    return state


async def _chunks(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset:offset + size]


def _workspace(tmp_path: Path, overlay: bool) -> tuple[Path, list[Mount]]:
    """A snapshot root three levels below ``tmp_path`` with a canary directory next to it."""
    base = tmp_path / "w1" / "w2"
    root = base / "root"
    root.mkdir(parents=True)
    canary = base / "canary"
    canary.mkdir()
    (canary / "keep").write_bytes(b"canary")
    (tmp_path / "w1" / "outside").write_bytes(b"outside")
    if overlay:
        (base / "lower").mkdir()
        (base / "lower" / "x").write_bytes(b"lower")
        (base / "work").mkdir()
        return root, [Mount(type="overlay", source="overlay",
                            options=(f"lowerdir={base / 'lower'}", f"upperdir={root}", f"workdir={base / 'work'}"))]
    return root, [Mount(type="bind", source=str(root), options=("rbind", "rw"))]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("overlay", [True, False], ids=["overlay", "plain"])
@pytest.mark.parametrize("case", MALICIOUS, ids=[case.id for case in MALICIOUS])
async def test_malicious_layer_refused(tmp_path: Path, case: Malicious, overlay: bool) -> None:
    root, mounts = _workspace(tmp_path, overlay)
    before, outside, fds = _tree(tmp_path, root), _outside_state(), _open_fds()
    differ = WalkingDiffer()
    with pytest.raises(InvalidArgument) as caught:
        await differ.apply_stream(mounts, OCI_LAYER, _chunks(build_layer(case.entries)))
    assert f"layer entry {case.offender!r}" in str(caught.value)
    assert _tree(tmp_path, root) == before
    assert _outside_state() == outside
    assert _open_fds() == fds


@pytest.mark.parametrize("overlay", [True, False], ids=["overlay", "plain"])
@pytest.mark.parametrize("case", CONTAINED, ids=[c.id for c in CONTAINED])
async def test_absolute_symlinks_are_followed_inside_the_root(tmp_path: Path, case: Contained,
                                                             overlay: bool) -> None:
    root, mounts = _workspace(tmp_path, overlay)
    outside, fds = _outside_state(), _open_fds()
    await WalkingDiffer().apply_stream(mounts, OCI_LAYER, _chunks(build_layer(case.entries)))
    assert (root / case.lands).exists()
    assert _outside_state() == outside
    assert _open_fds() == fds


async def test_devices_allowed_when_configured(tmp_path: Path) -> None:
    root, mounts = _workspace(tmp_path, overlay=False)
    differ = WalkingDiffer(allow_devices=True)
    layer = build_layer([Entry("null", "char", major=1, minor=3, mode=0o666), Entry("sda", "block", major=8)])
    await differ.apply_stream(mounts, OCI_LAYER, _chunks(layer))
    info = (root / "null").lstat()
    assert stat.S_ISCHR(info.st_mode)
    assert (os.major(info.st_rdev), os.minor(info.st_rdev)) == (1, 3)
    assert stat.S_IMODE(info.st_mode) == 0o666
    assert stat.S_ISBLK((root / "sda").lstat().st_mode)


async def test_symlinks_inside_are_followed_for_parents(tmp_path: Path) -> None:
    """A relative symlink that stays inside (merged /usr: ``lib -> usr/lib``) is a valid parent."""
    root, mounts = _workspace(tmp_path, overlay=False)
    layer = build_layer([Entry("usr", "dir"), Entry("usr/lib", "dir"), Entry("lib", "symlink", link="usr/lib"),
                         Entry("lib/libc.so", data=b"elf"), Entry("usr/l2", "symlink", link="../lib"),
                         Entry("usr/l2/x", data=b"x"), Entry("h", "hardlink", link="lib/libc.so")])
    differ = WalkingDiffer()
    await differ.apply_stream(mounts, OCI_LAYER, _chunks(layer))
    assert (root / "usr/lib/libc.so").read_bytes() == b"elf"
    assert (root / "usr/lib/x").read_bytes() == b"x"
    assert (root / "h").stat().st_ino == (root / "usr/lib/libc.so").stat().st_ino
    assert (root / "lib").is_symlink()


_names = st.lists(st.sampled_from(["a", "b", "..", ".", "", "l", ".wh.a", ".wh..wh..opq", "/"]), min_size=1,
                  max_size=5).map("/".join)
_entries = st.builds(
    Entry, name=_names, kind=st.sampled_from(["file", "dir", "symlink", "hardlink"]),
    data=st.just(b"data"), link=st.sampled_from(["/", "..", "../..", "a", "b/..", "/etc/passwd", "../outside", "l"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(_entries, min_size=1, max_size=8), overlay=st.booleans())
async def test_random_layers_never_write_outside(tmp_path_factory: pytest.TempPathFactory, entries: list[Entry],
                                                 overlay: bool) -> None:
    """Whatever a layer holds, applying it either succeeds or fails with InvalidArgument, and nothing
    outside the snapshot root changes."""
    tmp_path = tmp_path_factory.mktemp("prop")
    root, mounts = _workspace(tmp_path, overlay)
    before, outside = _tree(tmp_path, root), _outside_state()
    differ = WalkingDiffer()
    with contextlib.suppress(InvalidArgument):
        await differ.apply_stream(mounts, OCI_LAYER, _chunks(build_layer(entries)))
    assert _tree(tmp_path, root) == before
    assert _outside_state() == outside
