"""The walking differ against real snapshotters (overlayfs, native, btrfs on a loop device) and a real
content store: layers applied and read back through real mounts, whiteouts, metadata, compressions, digest
checks, streaming and cancellation, and apply/compare round trips. Root only.

Every mount a test makes goes through ``mounter``, undone at teardown whether the test passed or not.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import stat
import tarfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import trio
from btrfs_fixture import btrfs_root  # noqa: F401 (a fixture)
from conftest import Mounter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_corpus import Entry, build_layer, compress, generated_tree

from berth.core.content import Store
from berth.core.errdefs import FailedPrecondition, InvalidArgument
from berth.core.oci import OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Descriptor, chain_ids
from berth.core.snapshots.snapshotter import Mount, Snapshotter
from berth.plugins.content.local.store import LocalStore, MemoryLabelStore
from berth.plugins.differ.walking import UNCOMPRESSED_LABEL, WalkingDiffer
from berth.snapshotters.btrfs.btrfs import BtrfsSnapshotter
from berth.snapshotters.native.native import NativeSnapshotter
from berth.snapshotters.overlayfs.overlayfs import OverlaySnapshotter

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount and chown"),
]

MEDIA = {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, "": OCI_LAYER}


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "content", labels=MemoryLabelStore())


@pytest.fixture(params=["overlayfs", "native"])
async def snapshotter(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Snapshotter]:
    sn: Snapshotter
    if request.param == "overlayfs":
        sn = await OverlaySnapshotter.open(tmp_path / "snapshots")
    else:
        sn = await NativeSnapshotter.open(tmp_path / "snapshots")
    try:
        yield sn
    finally:
        await sn.aclose()


async def put_blob(store: Store, data: bytes, media_type: str) -> Descriptor:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    writer = await store.writer(f"test-{digest}")
    await writer.write(data)
    await writer.commit(len(data), expected=digest)
    return Descriptor(media_type=media_type, digest=digest, size=len(data))


def diff_id(tar: bytes) -> str:
    return "sha256:" + hashlib.sha256(tar).hexdigest()


async def unpack(sn: Snapshotter, differ: WalkingDiffer, store: Store, layers: Sequence[bytes],
                 compression: str = "gzip") -> str:
    """Apply tar ``layers`` as an image unpack does; returns the top chain ID."""
    ids = chain_ids([diff_id(layer) for layer in layers])
    parent = ""
    for layer, chain in zip(layers, ids, strict=True):
        desc = await put_blob(store, compress(layer, compression), MEDIA[compression])
        key = f"extract-{chain}"
        mounts = await sn.prepare(key, parent)
        assert await differ.apply(desc, mounts, expected_diff_id=diff_id(layer)) == diff_id(layer)
        await sn.commit(chain, key)
        parent = chain
    return parent


async def chunked(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset:offset + size]


MTIME_NS = 1_600_000_000_123_456_789
METADATA_LAYER = [
    Entry("etc", "dir", mode=0o755, uid=0, gid=0),
    Entry("etc/secret", data=b"s3cret", mode=0o600, uid=1000, gid=1001, mtime=1_600_000_000),
    Entry("bin", "dir", mode=0o755),
    Entry("bin/su", data=b"\x7fELF", mode=0o4755),
    Entry("bin/sh", "symlink", link="su", uid=7, gid=8, mtime=1_500_000_000),
    Entry("bin/ash", "hardlink", link="bin/su"),
    Entry("tmp", "dir", mode=0o1777),
    Entry("run", "dir", mode=0o700, uid=33, gid=34),
    Entry("run/fifo", "fifo", mode=0o620, uid=5, gid=6),
    Entry("x", "file", data=b"xattr", xattrs={"user.note": b"hello", "trusted.bin": b"\x00\xff\x01"}),
    Entry("ns", "file", data=b"nanoseconds"),
    Entry("sg", "dir", mode=0o2775, gid=50),
    Entry("sg/f", data=b"owned by 0:0 despite the set-group-ID directory", mode=0o664),
    Entry("w", data=b"group and other writable", mode=0o666),
]


def metadata_layer() -> bytes:
    """METADATA_LAYER with an exact nanosecond mtime on ``ns`` (a PAX record tarfile would round)."""
    raw = build_layer(METADATA_LAYER)
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as src, tarfile.open(fileobj=out, mode="w",
                                                                     format=tarfile.PAX_FORMAT) as dst:
        for member in src:
            if member.name == "ns":
                member.pax_headers = {**member.pax_headers, "mtime": "1600000000.123456789"}
            dst.addfile(member, src.extractfile(member) if member.isreg() else None)
    return out.getvalue()


def check_metadata(root: Path) -> None:
    secret = (root / "etc/secret").stat()
    assert (stat.S_IMODE(secret.st_mode), secret.st_uid, secret.st_gid) == (0o600, 1000, 1001)
    assert secret.st_mtime_ns == 1_600_000_000 * 10**9
    assert (root / "etc/secret").read_bytes() == b"s3cret"
    assert stat.S_IMODE((root / "bin/su").stat().st_mode) == 0o4755
    sh = (root / "bin/sh").lstat()
    assert stat.S_ISLNK(sh.st_mode)
    assert os.readlink(root / "bin/sh") == "su"
    assert (sh.st_uid, sh.st_gid, sh.st_mtime_ns) == (7, 8, 1_500_000_000 * 10**9)
    assert (root / "bin/ash").stat().st_ino == (root / "bin/su").stat().st_ino
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    run = (root / "run").stat()
    assert (stat.S_IMODE(run.st_mode), run.st_uid, run.st_gid) == (0o700, 33, 34)
    fifo = (root / "run/fifo").lstat()
    assert stat.S_ISFIFO(fifo.st_mode)
    assert (stat.S_IMODE(fifo.st_mode), fifo.st_uid, fifo.st_gid) == (0o620, 5, 6)
    assert os.getxattr(root / "x", "user.note") == b"hello"
    assert os.getxattr(root / "x", "trusted.bin") == b"\x00\xff\x01"
    assert (root / "ns").stat().st_mtime_ns == MTIME_NS
    assert (root / "etc").stat().st_mtime_ns == 1_700_000_000 * 10**9
    assert (root / "sg").stat().st_gid == 50
    assert stat.S_IMODE((root / "sg").stat().st_mode) == 0o2775
    assert (root / "sg/f").stat().st_gid == 0
    assert stat.S_IMODE((root / "w").stat().st_mode) == 0o666


@pytest.mark.parametrize("compression", ["gzip", "zstd", ""], ids=["gzip", "zstd", "plain"])
async def test_apply_preserves_metadata(snapshotter: Snapshotter, store: LocalStore, mounter: Mounter,
                                        compression: str) -> None:
    differ = WalkingDiffer(store)
    top = await unpack(snapshotter, differ, store, [metadata_layer()], compression)
    check_metadata(mounter(await snapshotter.view("v", top)))


async def test_modes_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        await WalkingDiffer().apply_stream([Mount(type="bind", source=str(tmp_path), options=("rbind",))],
                                           OCI_LAYER, chunked(metadata_layer()))
    finally:
        os.umask(old)
    check_metadata(tmp_path)


async def test_whiteouts_and_opaque_dirs_through_a_real_mount(snapshotter: Snapshotter, store: LocalStore,
                                                              mounter: Mounter) -> None:
    base = build_layer([Entry("a", "dir"), Entry("a/f1", data=b"1"), Entry("a/f2", data=b"2"), Entry("b", "dir"),
                        Entry("b/x", data=b"x"), Entry("c", "dir"), Entry("c/old", data=b"o"), Entry("c/d", "dir"),
                        Entry("c/d/deep", data=b"d"), Entry("keep", data=b"k")])
    change = build_layer([Entry("a/.wh.f1"), Entry(".wh.b"), Entry("c", "dir", mode=0o750),
                          Entry("c/.wh..wh..opq"), Entry("c/new", data=b"n"), Entry("e", "dir"), Entry("e/.wh.never"),
                          Entry(".wh..wh.plnk"), Entry("a/.wh.f3"), Entry("a/f3", data=b"3"),
                          Entry("a/f4", data=b"4"), Entry("a/.wh.f4")])
    differ = WalkingDiffer(store)
    top = await unpack(snapshotter, differ, store, [base, change])
    root = mounter(await snapshotter.view("v", top))
    assert sorted(os.listdir(root)) == ["a", "c", "e", "keep"]
    assert sorted(os.listdir(root / "a")) == ["f2", "f3", "f4"]  # a layer's whiteouts never hide its own files
    assert os.listdir(root / "c") == ["new"]
    assert stat.S_IMODE((root / "c").stat().st_mode) == 0o750
    assert os.listdir(root / "e") == []


async def test_parents_missing_from_a_layer_keep_the_lower_attributes(snapshotter: Snapshotter, store: LocalStore,
                                                                      mounter: Mounter) -> None:
    """A layer listing ``p/new`` without ``p`` must not reset ``p``: in an overlay upperdir the directory
    is created like the lower layer's one, times included (in a full copy, as tar does, adding ``new``
    updates the directory's mtime)."""
    base = build_layer([Entry("p", "dir", mode=0o700, uid=5, gid=6, mtime=1_650_000_000), Entry("p/old", data=b"o")])
    differ = WalkingDiffer(store)
    top = await unpack(snapshotter, differ, store, [base, build_layer([Entry("p/new", data=b"n")])])
    root = mounter(await snapshotter.view("v", top))
    info = (root / "p").stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o700, 5, 6)
    if isinstance(snapshotter, OverlaySnapshotter):
        assert info.st_mtime_ns == 1_650_000_000 * 10**9
    assert sorted(os.listdir(root / "p")) == ["new", "old"]


async def test_round_trip_apply_compare_apply(snapshotter: Snapshotter, store: LocalStore,
                                              mounter: Mounter) -> None:
    """compare() of an applied layer, applied again onto the same parent, gives the same tree; comparing
    twice gives the same blob."""
    base = build_layer([*generated_tree(1, files=60), *METADATA_LAYER[:6], Entry("gone", "dir"),
                        Entry("gone/f", data=b"f"), Entry("opq", "dir"), Entry("opq/old", data=b"o")])
    change = build_layer([*generated_tree(2, files=30, prefix="n"), Entry(".wh.gone"), Entry("opq", "dir"),
                          Entry("opq/.wh..wh..opq"), Entry("opq/new", data=b"n"), Entry("bin/.wh.sh"),
                          Entry("etc/secret", data=b"changed", mode=0o640, uid=3, gid=4),
                          Entry("x", data=b"x", xattrs={"user.a": b"b"})])
    differ = WalkingDiffer(store)
    parent = await unpack(snapshotter, differ, store, [base])
    mounts = await snapshotter.prepare("work", parent)
    await differ.apply(await put_blob(store, compress(change, "gzip"), OCI_LAYER_GZIP), mounts)
    lower = await snapshotter.view("lower", parent)
    first = await differ.compare(lower, mounts)
    second = await differ.compare(lower, mounts)
    assert first == second
    assert (await store.info(first.descriptor.digest)).labels[UNCOMPRESSED_LABEL] == first.diff_id
    blob = (store.blob_path(first.descriptor.digest)).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as archive:
        names = archive.getnames()
    # overlay: the upperdir's opaque directory; native: both trees walked, so the old file's whiteout
    opaque = "opq/.wh..wh..opq" if isinstance(snapshotter, OverlaySnapshotter) else "opq/.wh.old"
    assert {".wh.gone", opaque, "bin/.wh.sh", "etc/secret", "opq/new"} <= set(names)
    assert not any(name.startswith("gone/") for name in names)

    again = await snapshotter.prepare("again", parent)
    assert await differ.apply(first.descriptor, again, expected_diff_id=first.diff_id) == first.diff_id
    await snapshotter.commit("one", "work")
    await snapshotter.commit("two", "again")
    assert tree(mounter(await snapshotter.view("v1", "one"))) == tree(mounter(await snapshotter.view("v2", "two")))


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    seen: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            body: object = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
            if stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            xattrs = {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path, follow_symlinks=False)}
            seen[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, mtime, body, xattrs)
    return seen


async def test_compare_of_a_first_layer(snapshotter: Snapshotter, store: LocalStore, tmp_path: Path) -> None:
    """A snapshot without parent compares as all additions, and applies back identically."""
    layer = build_layer(METADATA_LAYER)
    differ = WalkingDiffer(store)
    mounts = await snapshotter.prepare("first")
    await differ.apply_stream(mounts, OCI_LAYER, chunked(layer))
    result = await differ.compare([], mounts, media_type=OCI_LAYER_ZSTD)
    assert result.descriptor.media_type == OCI_LAYER_ZSTD
    out = tmp_path / "out"
    out.mkdir()
    await differ.apply(result.descriptor, [Mount(type="bind", source=str(out), options=("rbind",))],
                       expected_diff_id=result.diff_id)
    assert tree(out) == tree(Path(mounts[0].source))


async def test_wrong_diff_id_aborts(store: LocalStore, tmp_path: Path) -> None:
    layer = build_layer([Entry("f", data=b"f")])
    desc = await put_blob(store, compress(layer, "gzip"), OCI_LAYER_GZIP)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(FailedPrecondition) as caught:
        await WalkingDiffer(store).apply(desc, [Mount(type="bind", source=str(tmp_path), options=("rbind",))],
                                         expected_diff_id=wrong)
    assert wrong in str(caught.value)
    assert diff_id(layer) in str(caught.value)


async def test_wrong_blob_digest_refused(tmp_path: Path) -> None:
    blob = compress(build_layer([Entry("f", data=b"f")]), "gzip")
    wrong = "sha256:" + "1" * 64
    with pytest.raises(FailedPrecondition, match=wrong):
        await WalkingDiffer().apply_stream([Mount(type="bind", source=str(tmp_path), options=("rbind",))],
                                           OCI_LAYER_GZIP, chunked(blob), expected_digest=wrong)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
async def test_corrupt_compressed_stream_refused(tmp_path: Path, compression: str) -> None:
    blob = bytearray(compress(build_layer(generated_tree(3, files=20)), compression))
    blob[len(blob) // 2:len(blob) // 2 + 64] = bytes(64)
    with pytest.raises(InvalidArgument):
        await WalkingDiffer().apply_stream([Mount(type="bind", source=str(tmp_path), options=("rbind",))],
                                           MEDIA[compression], chunked(bytes(blob), 1000))


async def test_truncated_layer_refused(tmp_path: Path) -> None:
    layer = build_layer([Entry("big", data=b"x" * 100_000)])
    with pytest.raises(InvalidArgument, match="ends inside"):
        await WalkingDiffer().apply_stream([Mount(type="bind", source=str(tmp_path), options=("rbind",))],
                                           OCI_LAYER, chunked(layer[:50_000]))


async def test_source_error_propagates(tmp_path: Path) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield build_layer([Entry("f", data=b"f" * 10_000)])[:4096]
        raise ConnectionResetError("registry went away")

    with pytest.raises(ConnectionResetError, match="went away"):
        await WalkingDiffer().apply_stream([Mount(type="bind", source=str(tmp_path), options=("rbind",))],
                                           OCI_LAYER, failing())


async def test_read_only_mounts_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="read-only"):
        await WalkingDiffer().apply_stream([Mount(type="bind", source=str(tmp_path), options=("rbind", "ro"))],
                                           OCI_LAYER, chunked(build_layer([])))


async def test_cancellation_mid_stream_stops_cleanly(tmp_path: Path) -> None:
    """Cancelling while the source stalls ends the apply promptly: threads stop, no descriptor leaks,
    and a temporary mount (generic path) is gone."""
    layer = build_layer(generated_tree(4, files=40))
    started = trio.Event()

    async def stalling() -> AsyncIterator[bytes]:
        yield layer[:len(layer) // 2]
        started.set()
        await trio.sleep_forever()

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (tmp_path / "t" / "sub").mkdir(parents=True)
    mounts = [Mount(type="bind", source=str(tmp_path / "t"), options=("rbind",)),
              Mount(type="tmpfs", source="tmpfs", target="sub")]
    fds = len(os.listdir("/proc/self/fd"))
    async with trio.open_nursery() as nursery:
        async def run() -> None:
            await WalkingDiffer(scratch=scratch).apply_stream(mounts, OCI_LAYER, stalling())
        nursery.start_soon(run)
        await started.wait()
        nursery.cancel_scope.cancel()
    assert os.listdir(scratch) == []
    assert len(os.listdir("/proc/self/fd")) == fds


async def test_generic_path_mounts_and_unmounts(tmp_path: Path) -> None:
    """Mounts that cannot be written directly are mounted on a scratch directory, applied into with
    whiteouts as deletions, and unmounted, also when the layer is refused."""
    target, scratch = tmp_path / "t", tmp_path / "scratch"
    target.mkdir()
    scratch.mkdir()
    (target / "old").write_bytes(b"old")
    (target / "dir").mkdir()
    (target / "dir" / "stale").write_bytes(b"stale")
    mounts = [Mount(type="bind", source=str(target), options=("rbind",)),
              Mount(type="tmpfs", source="tmpfs", target="dir")]
    differ = WalkingDiffer(scratch=scratch)
    layer = build_layer([Entry(".wh.old"), Entry("new", data=b"new"), Entry("dir", "dir"), Entry("dir/f", data=b"f")])
    await differ.apply_stream(mounts, OCI_LAYER, chunked(layer))
    assert sorted(os.listdir(target)) == ["dir", "new"]
    assert os.listdir(target / "dir") == ["stale"]  # "dir/f" went into the tmpfs, gone with it
    assert os.listdir(scratch) == []
    with pytest.raises(InvalidArgument, match=re.escape("'../x'")):
        await differ.apply_stream(mounts, OCI_LAYER, chunked(build_layer([Entry("../x")])))
    assert os.listdir(scratch) == []


async def test_btrfs_round_trip(btrfs_root: Path, store: LocalStore, mounter: Mounter) -> None:  # noqa: F811
    """btrfs mounts are applied into through a temporary mount; compare walks both trees."""
    sn = await BtrfsSnapshotter.open(btrfs_root / "snapshots")
    try:
        differ = WalkingDiffer(store, scratch=btrfs_root)
        base = build_layer([Entry("a", "dir"), Entry("a/f", data=b"1"), Entry("b", data=b"b")])
        change = build_layer([Entry("a/.wh.f"), Entry("c", data=b"c", mode=0o700, uid=9)])
        parent = await unpack(sn, differ, store, [base])
        mounts = await sn.prepare("work", parent)
        await differ.apply_stream(mounts, OCI_LAYER, chunked(change))
        result = await differ.compare(await sn.view("lower", parent), mounts, media_type=OCI_LAYER)
        with tarfile.open(store.blob_path(result.descriptor.digest)) as archive:
            assert archive.getnames() == ["a", "a/.wh.f", "c"]
        await sn.commit("top", "work")
        root = mounter(await sn.view("v", "top"))
        assert sorted(os.listdir(root)) == ["a", "b", "c"]
        assert os.listdir(root / "a") == []
        assert not any(name.startswith("berth-") for name in os.listdir(btrfs_root))
    finally:
        await sn.aclose()


def _tar(format_: int, members: Sequence[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=format_) as archive:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


@pytest.mark.parametrize("format_", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT],
                         ids=["gnu", "ustar", "pax"])
async def test_tar_formats(tmp_path: Path, format_: int) -> None:
    """Long names (GNU ``L``/``K`` records, the ustar prefix, PAX paths), big ids (base-256 or PAX) and
    long link targets read alike in every format tarfile writes."""
    deep = "/".join(["directory-with-a-long-name"] * 5)  # 134 bytes: prefix, L or PAX path
    big_id = 2_000_000 if format_ == tarfile.USTAR_FORMAT else 3_000_000_000
    target = "d/f" if format_ == tarfile.USTAR_FORMAT else f"{deep}/file"  # ustar: links of 100 bytes at most
    members = [(_info("d", tarfile.DIRTYPE), b""), (_info("d/f"), b"deep"), (_info(deep, tarfile.DIRTYPE), b""),
               (_info(f"{deep}/file", uid=big_id, gid=big_id), b"deep"),
               (_info("link", tarfile.SYMTYPE, linkname=target), b""),
               (_info("hard", tarfile.LNKTYPE, linkname=target), b""),
               (_info("ünïcode-ñame"), b"u")]
    await WalkingDiffer().apply_stream([Mount(type="bind", source=str(tmp_path), options=("rbind",))],
                                       OCI_LAYER, chunked(_tar(format_, members), 1000))
    assert (tmp_path / deep / "file").read_bytes() == b"deep"
    assert (tmp_path / deep / "file").stat().st_uid == big_id
    assert os.readlink(tmp_path / "link") == target
    assert (tmp_path / "hard").stat().st_ino == (tmp_path / target).stat().st_ino
    assert (tmp_path / "ünïcode-ñame").read_bytes() == b"u"


async def test_global_pax_header_and_trailing_data(tmp_path: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"uid": "42"}) as archive:
        archive.addfile(_info("f", size=1), io.BytesIO(b"f"))
    layer = out.getvalue() + b"garbage after the end marker is hashed, not parsed"
    result = await WalkingDiffer().apply_stream([Mount(type="bind", source=str(tmp_path), options=("rbind",))],
                                                OCI_LAYER, chunked(layer))
    assert result.diff_id == diff_id(layer)
    assert (tmp_path / "f").stat().st_uid == 42


@pytest.mark.parametrize("damage", ["checksum", "sparse", "type", "pax", "nul"])
async def test_malformed_tar_refused(tmp_path: Path, damage: str) -> None:
    layer = bytearray(_tar(tarfile.PAX_FORMAT if damage == "pax" else tarfile.GNU_FORMAT,
                           [(_info("victim"), b"data")]))
    if damage == "checksum":
        layer[0] ^= 1
    elif damage in ("sparse", "type"):
        layer[156:157] = b"S" if damage == "sparse" else b"Z"
        checksum = sum(layer[:148]) + 8 * 32 + sum(layer[156:512])
        layer[148:156] = b"%06o\0 " % checksum
    elif damage == "pax":
        layer = bytearray(_tar(tarfile.PAX_FORMAT, [(_info("victim", pax_headers={"path": "x" * 10}), b"")]))
        layer[512:514] = b"99"  # a record length past the header's end
    else:
        layer = bytearray(_tar(tarfile.PAX_FORMAT, [(_info("victim", pax_headers={"path": "a\0b"}), b"")]))
    with pytest.raises(InvalidArgument):
        await WalkingDiffer().apply_stream([Mount(type="bind", source=str(tmp_path), options=("rbind",))],
                                           OCI_LAYER, chunked(bytes(layer)))


_names = st.text(alphabet="abé-", min_size=1, max_size=3)
_tree_entries = st.lists(st.tuples(st.lists(_names, min_size=1, max_size=3),
                                   st.sampled_from(["file", "dir", "symlink", "fifo"]),
                                   st.binary(max_size=300), st.integers(0, 0o7777), st.integers(0, 70_000),
                                   st.integers(0, 2_000_000_000)), max_size=12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_tree_entries)
async def test_round_trip_property(tmp_path_factory: pytest.TempPathFactory, raw: list[tuple[list[str], str, bytes,
                                                                                              int, int, int]]) -> None:
    """Any tree a layer makes compares back to a layer that rebuilds the same tree."""
    work = tmp_path_factory.mktemp("rt")
    first, second = work / "a", work / "b"
    first.mkdir()
    second.mkdir()
    entries = [Entry("/".join(parts), kind, data=data if kind == "file" else b"", mode=mode, uid=owner, gid=owner,
                     mtime=mtime, link="x/../y" if kind == "symlink" else "") for parts, kind, data, mode, owner, mtime
               in raw]
    differ = WalkingDiffer(LocalStore(work / "content", labels=MemoryLabelStore()))
    try:
        await differ.apply_stream([Mount(type="bind", source=str(first), options=("rbind",))], OCI_LAYER,
                                  chunked(build_layer(entries)))
    except InvalidArgument:
        return  # e.g. a file where a later entry needs a directory
    result = await differ.compare([], [Mount(type="bind", source=str(first), options=("rbind",))])
    await differ.apply(result.descriptor, [Mount(type="bind", source=str(second), options=("rbind",))],
                       expected_diff_id=result.diff_id)
    assert tree(second) == tree(first)
