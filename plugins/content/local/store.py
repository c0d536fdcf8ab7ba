"""A content store on a local filesystem, with containerd's local store semantics case for case.

Layout under ``root``::

    blobs/<algorithm>/<hex>            committed blobs, read-only (mode 0444)
    ingest/<sha256(ref)>/ref           the ref, to map a directory back to it
    ingest/<sha256(ref)>/data          the bytes written so far
    ingest/<sha256(ref)>/total         the expected total size, if known
    ingest/<sha256(ref)>/startedat     UNIX time the ingest started
    ingest/<sha256(ref)>/updatedat     UNIX time of the last write, recorded on close

A blob only appears under ``blobs/`` by an atomic rename after its size and digest were checked and
its data fsynced, so a crash never leaves a half-written blob visible. All file work runs in worker
threads (``trio.to_thread``); the event loop never blocks on the disk.

Labels are not kept by this store on its own (the metadata layer keeps them per namespace); pass a
:class:`MemoryLabelStore` to keep them in memory, as containerd's tests do.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import trio

from berth.core.content import Info, Status, new_hasher, validate_digest
from berth.core.directories import make_spread_directory
from berth.core.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from berth.core.filters import parse_filters
from berth.core.identifiers import validate_labels

__all__ = ["LabelStore", "LocalStore", "MemoryLabelStore"]

_HASH_CHUNK = 1 << 20


class LabelStore(Protocol):
    def get(self, digest: str) -> dict[str, str]: ...

    def set(self, digest: str, labels: Mapping[str, str]) -> None: ...


class MemoryLabelStore:
    """Labels kept in memory (lost on restart): for a store used without the metadata layer."""

    def __init__(self) -> None:
        self._labels: dict[str, dict[str, str]] = {}

    def get(self, digest: str) -> dict[str, str]:
        return dict(self._labels.get(digest, {}))

    def set(self, digest: str, labels: Mapping[str, str]) -> None:
        self._labels[digest] = dict(labels)


def _read_text(path: Path, default: str = "") -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return default


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _validate_ref(ref: Any) -> str:
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("ref must be a non-empty string")
    if len(ref) > 4096 or "\0" in ref:
        raise InvalidArgument(f"ref {ref[:60]!r} is too long or contains NUL")
    return ref


class LocalStore:
    """The store; see the module docstring. ``root`` is created if missing."""

    def __init__(self, root: Path, *, labels: LabelStore | None = None) -> None:
        self.root = Path(root)
        self.labels = labels
        self._locks: dict[str, float] = {}
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        make_spread_directory(self.root / "ingest")  # one directory per ingest; its data becomes the blob

    # ---------------------------------------------------------------- paths

    def blob_path(self, digest: str) -> Path:
        algorithm, _, encoded = validate_digest(digest).partition(":")
        return self.root / "blobs" / algorithm / encoded

    def ingest_path(self, ref: str) -> Path:
        return self.root / "ingest" / hashlib.sha256(ref.encode()).hexdigest()

    # ---------------------------------------------------------------- locks

    def _lock(self, ref: str) -> None:
        if ref in self._locks:
            held = time.monotonic() - self._locks[ref]
            raise Unavailable(f"ref {ref} locked for {held:.3f}s")
        self._locks[ref] = time.monotonic()

    def _unlock(self, ref: str) -> None:
        self._locks.pop(ref, None)

    # ---------------------------------------------------------------- blobs

    def _info_sync(self, digest: str) -> Info:
        path = self.blob_path(digest)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise NotFound(f"content {digest} not found") from None
        labels = self.labels.get(digest) if self.labels is not None else {}
        return Info(digest=digest, size=stat.st_size, created_at=stat.st_mtime, updated_at=stat.st_atime,
                    labels=labels)

    async def info(self, digest: str) -> Info:
        return await trio.to_thread.run_sync(self._info_sync, digest)

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        if self.labels is None:
            raise FailedPrecondition("this content store keeps no labels (use the metadata store)")
        current = await self.info(info.digest)
        labels = _apply_label_update(current.labels, info.labels, fieldpaths)
        self.labels.set(info.digest, labels)
        path = self.blob_path(info.digest)
        now = time.time()
        await trio.to_thread.run_sync(lambda: os.utime(path, (now, current.created_at)))
        return await self.info(info.digest)

    def _list_blobs(self) -> list[Info]:
        out = []
        blobs = self.root / "blobs"
        for algorithm_dir in sorted(blobs.iterdir()) if blobs.exists() else []:
            for entry in sorted(algorithm_dir.iterdir()):
                digest = f"{algorithm_dir.name}:{entry.name}"
                try:
                    validate_digest(digest)
                    out.append(self._info_sync(digest))
                except (InvalidArgument, NotFound):
                    continue  # a stray file, or removed meanwhile
        return out

    async def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[Info]:
        matcher = parse_filters(filters)
        for info in await trio.to_thread.run_sync(self._list_blobs):
            if matcher.match_mapping(info.filter_target()):
                yield info

    async def delete(self, digest: str) -> None:
        path = self.blob_path(digest)

        def remove() -> None:
            try:
                path.unlink()
            except FileNotFoundError:
                raise NotFound(f"content {digest} not found") from None

        await trio.to_thread.run_sync(remove)
        if self.labels is not None:
            self.labels.set(digest, {})

    async def reader_at(self, digest: str) -> _FileReaderAt:
        path = self.blob_path(digest)

        def open_blob() -> _FileReaderAt:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFound(f"content {digest} not found") from None
            return _FileReaderAt(fd, os.fstat(fd).st_size)

        return await trio.to_thread.run_sync(open_blob)

    # ---------------------------------------------------------------- ingests

    def _status_sync(self, ref: str) -> Status:
        path = self.ingest_path(ref)
        try:
            offset = (path / "data").stat().st_size
        except FileNotFoundError:
            raise NotFound(f"no ingest for ref {ref}") from None
        started = float(_read_text(path / "startedat", "0") or 0)
        updated = float(_read_text(path / "updatedat", "0") or 0) or started
        total = int(_read_text(path / "total", "0") or 0)
        return Status(ref=ref, offset=offset, total=total, expected="", started_at=started, updated_at=updated)

    async def status(self, ref: str) -> Status:
        return await trio.to_thread.run_sync(self._status_sync, _validate_ref(ref))

    def _list_statuses_sync(self) -> list[Status]:
        out = []
        for entry in sorted((self.root / "ingest").iterdir()):
            ref = _read_text(entry / "ref")
            if not ref:
                continue
            with contextlib.suppress(NotFound):
                out.append(self._status_sync(ref))
        return out

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[Status]:
        matcher = parse_filters(filters)
        statuses = await trio.to_thread.run_sync(self._list_statuses_sync)
        return [s for s in statuses if matcher.match_mapping({"ref": s.ref})]

    async def abort(self, ref: str) -> None:
        path = self.ingest_path(_validate_ref(ref))

        def remove() -> None:
            if not path.exists():
                raise NotFound(f"no ingest for ref {ref}")
            shutil.rmtree(path)

        await trio.to_thread.run_sync(remove)

    async def writer(self, ref: str, *, total: int = 0, expected: str = "") -> LocalWriter:
        _validate_ref(ref)
        if expected:
            validate_digest(expected)
            if await trio.to_thread.run_sync(self.blob_path(expected).exists):
                raise AlreadyExists(f"content {expected} already exists")
        if total < 0:
            raise InvalidArgument(f"total must not be negative, got {total}")
        self._lock(ref)
        try:
            return await trio.to_thread.run_sync(self._open_writer, ref, total, expected)
        except BaseException:
            self._unlock(ref)
            raise

    def _open_writer(self, ref: str, total: int, expected: str) -> LocalWriter:
        path = self.ingest_path(ref)
        hasher = new_hasher(expected)
        data = path / "data"
        if path.exists():
            stored_ref = _read_text(path / "ref")
            if stored_ref != ref:
                raise FailedPrecondition(f"ingest directory {path.name} belongs to ref {stored_ref!r}, not {ref!r}")
            stored_total = int(_read_text(path / "total", "0") or 0)
            if total and stored_total and total != stored_total:
                raise InvalidArgument(f"ref {ref}: provided total {total} differs from the ingest's {stored_total}")
            total = total or stored_total
            started = float(_read_text(path / "startedat", "0") or 0) or time.time()
            updated = float(_read_text(path / "updatedat", "0") or 0) or started
            offset = 0
            with data.open("rb") as f:  # resume: re-hash what is on disk
                while chunk := f.read(_HASH_CHUNK):
                    hasher.update(chunk)
                    offset += len(chunk)
        else:
            temporary = path.with_name(path.name + ".new")
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
            started = updated = time.time()
            _write_text(temporary / "ref", ref)
            _write_text(temporary / "startedat", repr(started))
            _write_text(temporary / "updatedat", repr(updated))
            if total:
                _write_text(temporary / "total", str(total))
            (temporary / "data").touch()
            os.rename(temporary, path)  # the ingest appears whole, ref file included
            offset = 0
        if total and not (path / "total").exists():
            _write_text(path / "total", str(total))
        fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
        os.lseek(fd, 0, os.SEEK_END)
        return LocalWriter(self, ref=ref, path=path, fd=fd, hasher=hasher, offset=offset, total=total,
                           expected=expected, started_at=started, updated_at=updated)


def _apply_label_update(current: Mapping[str, str], new: Mapping[str, str],
                        fieldpaths: Sequence[str]) -> dict[str, str]:
    """containerd's label update rules (see :meth:`berth.core.content.Store.update`)."""
    validate_labels(new)
    if not fieldpaths or "labels" in fieldpaths:
        return dict(new)
    labels = dict(current)
    for path in fieldpaths:
        if not path.startswith("labels."):
            raise InvalidArgument(f"cannot update field {path!r} of content (only labels)")
        key = path.removeprefix("labels.")
        if key in new:
            labels[key] = new[key]
        else:
            labels.pop(key, None)
    return labels


class _FileReaderAt:
    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise InvalidArgument("offset and size must not be negative")
        if self._fd < 0:
            raise FailedPrecondition("reader is closed")
        return await trio.to_thread.run_sync(os.pread, self._fd, size, offset)

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalWriter:
    """A writer on one ingest of a :class:`LocalStore`."""

    def __init__(self, store: LocalStore, *, ref: str, path: Path, fd: int, hasher: Any, offset: int,
                 total: int, expected: str, started_at: float, updated_at: float) -> None:
        self._store = store
        self._ref = ref
        self._path = path
        self._fd: int | None = fd
        self._hasher = hasher
        self._offset = offset
        self._total = total
        self._expected = expected
        self._started_at = started_at
        self._updated_at = updated_at

    @property
    def ref(self) -> str:
        return self._ref

    def _require_open(self) -> int:
        if self._fd is None:
            raise FailedPrecondition(f"writer for ref {self._ref} is closed")
        return self._fd

    async def write(self, data: bytes) -> None:
        fd = self._require_open()
        if not data:
            return

        def write_and_hash() -> None:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            self._hasher.update(data)

        await trio.to_thread.run_sync(write_and_hash)
        self._offset += len(data)
        self._updated_at = time.time()

    def digest(self) -> str:
        return f"{self._hasher.name}:{self._hasher.hexdigest()}"

    def status(self) -> Status:
        return Status(ref=self._ref, offset=self._offset, total=self._total, expected=self._expected,
                      started_at=self._started_at, updated_at=self._updated_at)

    async def truncate(self, size: int) -> None:
        fd = self._require_open()
        if size != 0:
            raise InvalidArgument("truncate supports only size 0")

        def reset() -> None:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)

        await trio.to_thread.run_sync(reset)
        self._hasher = new_hasher(self._expected)
        self._offset = 0
        self._updated_at = time.time()

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> None:
        fd = self._require_open()
        if labels:
            validate_labels(labels)
        if expected:
            validate_digest(expected)
        self._fd = None
        try:
            await trio.to_thread.run_sync(self._commit_sync, fd, size, expected)
        finally:
            self._store._unlock(self._ref)
        if labels and self._store.labels is not None:
            self._store.labels.set(self.digest(), labels)

    def _commit_sync(self, fd: int, size: int, expected: str) -> None:
        try:
            os.fsync(fd)
            on_disk = os.fstat(fd).st_size
        finally:
            os.close(fd)
            _write_text(self._path / "updatedat", repr(self._updated_at))
        if size and size != on_disk:
            raise FailedPrecondition(f"unexpected commit size {on_disk}, expected {size}")
        digest = self.digest()
        if expected and expected != digest:
            raise FailedPrecondition(f"unexpected commit digest {digest}, expected {expected}")
        target = self._store.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(self._path, ignore_errors=True)
            raise AlreadyExists(f"content {digest} already exists")
        os.rename(self._path / "data", target)
        _fsync_dir(target.parent)
        now = time.time()
        os.utime(target, (now, now))
        shutil.rmtree(self._path, ignore_errors=True)
        os.chmod(target, 0o444)

    async def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return

        def close_file() -> None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
                _write_text(self._path / "updatedat", repr(self._updated_at))

        try:
            await trio.to_thread.run_sync(close_file)
        finally:
            self._store._unlock(self._ref)
