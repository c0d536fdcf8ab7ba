"""Computing a layer from a snapshot: the tar of what changed from ``lower`` to ``upper``, with OCI whiteouts.

Two walks, both descriptor-based (``openat`` with ``O_NOFOLLOW``; nothing is ever followed):

* **upperdir**: when the upper snapshot is an overlay whose layers below are exactly the lower snapshot,
  the upperdir *is* the change set. Each entry is an addition or modification, a 0/0 character device
  is a deletion (``.wh.NAME``) and a directory with ``overlay.opaque=y`` gets ``.wh..wh..opq``.
* **double walk**: otherwise both trees are walked side by side (sorted names); a name only in the lower
  tree is a deletion, only in the upper an addition, and in both a modification when its type, mode,
  owner, size, mtime, device, link target or xattrs differ (file contents are not compared, as in
  containerd). Directories unchanged themselves are still descended into.

Entries come in a fixed order (names sorted bytewise, a directory before its contents), whiteouts carry
fixed metadata (mode 0, owner 0:0, mtime 0) and mtimes are exact PAX decimals, so the same change set
gives the same bytes. Files with several links in the upper tree become one file and hardlinks to it.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable
from typing import IO, cast

import zstandard
from isal import isal_zlib

from .stream import BytePipe, StreamDigests

__all__ = ["LayerWriter", "walk_double", "walk_upper"]

WHITEOUT_PREFIX = ".wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_BATCH = 1 << 20


class LayerWriter:
    """A write-only file object for :mod:`tarfile`: hashes the tar (the diff ID), compresses it, hashes the
    result (the blob digest) and hands it to ``sink`` in batches of about 1 MiB."""

    def __init__(self, compression: str, sink: BytePipe, digests: StreamDigests) -> None:
        self._sink = sink
        self._digests = digests
        self._position = 0
        self._batch: list[bytes] = []
        self._batched = 0
        self._compress: Callable[[bytes], bytes]
        self._flush: Callable[[], bytes]
        if compression == "gzip":
            compressor = isal_zlib.compressobj(2, isal_zlib.DEFLATED, 31)
            self._compress, self._flush = compressor.compress, compressor.flush
        elif compression == "zstd":
            zcompressor = zstandard.ZstdCompressor(level=3).compressobj()
            self._compress, self._flush = zcompressor.compress, zcompressor.flush
        else:
            self._compress, self._flush = bytes, bytes

    def write(self, data: bytes) -> int:
        self._digests.uncompressed.update(data)
        self._digests.uncompressed_size += len(data)
        self._position += len(data)
        self._emit(self._compress(data))
        return len(data)

    def tell(self) -> int:
        return self._position

    def check(self) -> None:
        """Raise PipeAborted when the reader is gone (the walk calls this once per directory)."""
        self._sink.check()

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self._digests.compressed.update(data)
        self._digests.size += len(data)
        self._batch.append(data)
        self._batched += len(data)
        if self._batched >= _BATCH:
            self._sink.put(b"".join(self._batch))
            self._batch.clear()
            self._batched = 0

    def finish(self) -> None:
        """Flush the compressor and the last batch, and close the sink."""
        self._emit(self._flush())
        if self._batch:
            self._sink.put(b"".join(self._batch))
            self._batch.clear()
        self._sink.close()


def _xattrs(target: int | str) -> dict[str, bytes]:
    """The xattrs of an open descriptor, or of a path whose last component is not followed."""
    if isinstance(target, int):
        return {key: os.getxattr(target, key) for key in os.listxattr(target)}
    return {key: os.getxattr(target, key, follow_symlinks=False)
            for key in os.listxattr(target, follow_symlinks=False)}


def _mtime(info: tarfile.TarInfo, st: os.stat_result, pax: dict[str, str]) -> None:
    """Whole seconds in the header; a PAX record with the exact decimal when there is a fraction."""
    seconds, nanos = divmod(st.st_mtime_ns, 1_000_000_000)
    info.mtime = seconds
    if nanos:
        pax["mtime"] = f"{seconds}.{nanos:09d}".rstrip("0")


class _Emitter:
    """Writes entries into the tar; remembers inodes with several links to turn later ones into hardlinks."""

    def __init__(self, out: LayerWriter, archive: tarfile.TarFile, skip_xattr: Callable[[str], bool]) -> None:
        self.out = out
        self.archive = archive
        self.skip_xattr = skip_xattr
        self.links: dict[tuple[int, int], str] = {}

    def whiteout(self, parts: tuple[str, ...], name: str) -> None:
        info = tarfile.TarInfo("/".join((*parts, name)))
        info.mode, info.mtime = 0, 0
        self.archive.addfile(info)

    def entry(self, dfd: int, parts: tuple[str, ...], st: os.stat_result, fd: int = -1) -> None:
        """Add ``parts`` (its stat ``st``; ``fd`` open on it for files and directories)."""
        name = "/".join(parts)
        info = tarfile.TarInfo(name)
        info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        pax: dict[str, str] = {}
        _mtime(info, st, pax)
        base = parts[-1]
        for key, value in sorted(_xattrs(fd if fd >= 0 else f"/proc/self/fd/{dfd}/{base}").items()):
            if not self.skip_xattr(key):
                pax[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = pax
        mode = st.st_mode
        if stat.S_ISREG(mode) and st.st_nlink > 1:
            first = self.links.get((st.st_dev, st.st_ino))
            if first is not None:
                info.type, info.linkname = tarfile.LNKTYPE, first
                self.archive.addfile(info)
                return
            self.links[(st.st_dev, st.st_ino)] = name
        if stat.S_ISREG(mode):
            info.size = st.st_size
            with os.fdopen(os.dup(fd), "rb") as data:
                self.archive.addfile(info, data)
            return
        if stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(base, dir_fd=dfd)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        else:
            return  # sockets are not carried in layers
        self.archive.addfile(info)


def _open_archive(out: LayerWriter) -> tarfile.TarFile:
    return tarfile.TarFile(fileobj=cast("IO[bytes]", out), mode="w", format=tarfile.PAX_FORMAT,
                           encoding="utf-8", errors="surrogateescape")


def _listing(fd: int) -> dict[str, os.stat_result]:
    with os.scandir(fd) as entries:
        return {entry.name: entry.stat(follow_symlinks=False) for entry in entries}


def _sorted(names: object) -> list[str]:
    return sorted(cast("list[str]", names), key=os.fsencode)


def walk_upper(upper: str, out: LayerWriter, opaque_xattr: str) -> None:
    """Write the change set of an overlay upperdir (see the module docstring). Blocks."""
    prefix = opaque_xattr.rsplit(".", 1)[0] + "."
    archive = _open_archive(out)
    emitter = _Emitter(out, archive, lambda key: key.startswith(prefix))
    root = os.open(upper, _DIR_FLAGS)
    try:
        _walk_upper(emitter, root, (), opaque_xattr)
    finally:
        os.close(root)
    archive.close()


def _walk_upper(emitter: _Emitter, dfd: int, parts: tuple[str, ...], opaque_xattr: str) -> None:
    emitter.out.check()
    listing = _listing(dfd)
    for name in _sorted(listing):
        st = listing[name]
        path = (*parts, name)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            emitter.whiteout(parts, WHITEOUT_PREFIX + name)
        elif stat.S_ISDIR(st.st_mode):
            fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            try:
                emitter.entry(dfd, path, st, fd)
                if opaque_xattr in os.listxattr(fd) and os.getxattr(fd, opaque_xattr) == b"y":
                    emitter.whiteout(path, WHITEOUT_OPAQUE)
                _walk_upper(emitter, fd, path, opaque_xattr)
            finally:
                os.close(fd)
        else:
            _emit_leaf(emitter, dfd, path, st)


def _emit_leaf(emitter: _Emitter, dfd: int, path: tuple[str, ...], st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        fd = os.open(path[-1], _FILE_FLAGS, dir_fd=dfd)
        try:
            emitter.entry(dfd, path, st, fd)
        finally:
            os.close(fd)
    else:
        emitter.entry(dfd, path, st)


def walk_double(lower: str | None, upper: str, out: LayerWriter) -> None:
    """Write the changes from the tree ``lower`` (None: empty) to the tree ``upper``. Blocks."""
    archive = _open_archive(out)
    emitter = _Emitter(out, archive, lambda key: False)
    lfd = os.open(lower, _DIR_FLAGS) if lower is not None else -1
    try:
        ufd = os.open(upper, _DIR_FLAGS)
        try:
            _walk_double(emitter, lfd, ufd, ())
        finally:
            os.close(ufd)
    finally:
        if lfd >= 0:
            os.close(lfd)
    archive.close()




def _changed(lfd: int, ufd: int, name: str, old: os.stat_result, new: os.stat_result) -> bool:
    if (stat.S_IFMT(old.st_mode), old.st_mode, old.st_uid, old.st_gid) != \
            (stat.S_IFMT(new.st_mode), new.st_mode, new.st_uid, new.st_gid):
        return True
    if not stat.S_ISDIR(new.st_mode) and (old.st_size, old.st_mtime_ns, old.st_rdev) != \
            (new.st_size, new.st_mtime_ns, new.st_rdev):
        return True
    if stat.S_ISDIR(new.st_mode) and old.st_mtime_ns != new.st_mtime_ns:
        return True
    if stat.S_ISLNK(new.st_mode) and os.readlink(name, dir_fd=lfd) != os.readlink(name, dir_fd=ufd):
        return True
    return _xattrs(f"/proc/self/fd/{lfd}/{name}") != _xattrs(f"/proc/self/fd/{ufd}/{name}")


def _walk_double(emitter: _Emitter, lfd: int, ufd: int, parts: tuple[str, ...]) -> None:
    emitter.out.check()
    lower = _listing(lfd) if lfd >= 0 else {}
    upper = _listing(ufd)
    for name in _sorted(set(lower) | set(upper)):
        path = (*parts, name)
        new = upper.get(name)
        if new is None:
            emitter.whiteout(parts, WHITEOUT_PREFIX + name)
            continue
        old = lower.get(name)
        changed = old is None or _changed(lfd, ufd, name, old, new)
        if not stat.S_ISDIR(new.st_mode):
            if changed:
                _emit_leaf(emitter, ufd, path, new)
            continue
        fd = os.open(name, _DIR_FLAGS, dir_fd=ufd)
        try:
            if changed:
                emitter.entry(ufd, path, new, fd)
            below = -1
            if old is not None and stat.S_ISDIR(old.st_mode):
                below = os.open(name, _DIR_FLAGS, dir_fd=lfd)
            try:
                _walk_double(emitter, below, fd, path)
            finally:
                if below >= 0:
                    os.close(below)
        finally:
            os.close(fd)
