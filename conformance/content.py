"""containerd's content store testsuite, case by case, for any :class:`berth.core.content.Store`.

A port of ``core/content/testsuite/testsuite.go``: the same 16 cases under the same names, with the
same checks. A third-party content plugin runs them against its store through a factory::

    from contextlib import asynccontextmanager
    from berth.conformance.content import check_content_store

    @asynccontextmanager
    async def open_store(root: Path) -> AsyncIterator[Store]:
        store = MyStore(root)               # a fresh, empty store under ``root``
        try:
            yield store
        finally:
            await store.aclose()

    async def test_my_store(tmp_path: Path) -> None:
        await check_content_store(open_store, tmp_path)

or, one pytest test per case, with :func:`berth.conformance.pytest_plugin.content_store_tests`.

**Plain cases** (``Writer`` ... ``CommitErrorState``, :data:`STORE_CASES`): each gets a fresh store
from ``open_store(root)`` (a new directory per case) and runs inside
``with_namespace("testsuite")``, so a namespaced store works unchanged and a store that ignores
namespaces does not notice.

**Cross-namespace cases** (``CrossNamespace*`` and ``SharedNamespaceIsolate``,
:data:`CROSS_NAMESPACE_CASES`) need a namespaced store built with a given sharing policy and a way
to label a namespace. Pass ``open_namespaced_store(root, policy)``, an async context manager factory
yielding a :class:`NamespacedStore`; each such case asks for the policy it tests (``shared`` or
``isolated``, :attr:`ContentCase.policy`) and works in the namespaces ``ns1`` and ``ns2``, labelling
``ns1`` ``berth.io/namespace.shareable=true`` where the case needs it. Without that factory the
cases are not applicable and raise :class:`CaseNotApplicable` (containerd skips them the same way:
"multiple contexts not supported").

Timing is checked only as containerd checks it: a timestamp must fall inside the window measured
around the operation that set it (``time.time()`` before and after), widened by ``time_slack``
seconds on both sides for clock granularity. Nothing here asserts how fast a store is.

Where berth differs from Go (documented per case): writes that containerd pushes through a 32-byte
buffer go in 32-byte writes for the 256-byte blobs and 1 MiB writes for the 32 MiB blob; errors are
berth's :mod:`~berth.core.errdefs` classes; there is no ``ErrReset``, so :func:`copy` does not retry.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

import trio

from berth.core.content import Info, ReaderAt, Status, Store, Writer, new_hasher
from berth.core.errdefs import AlreadyExists, FailedPrecondition, Unavailable
from berth.core.metadata.content import LABEL_SHAREABLE
from berth.core.metadata.gc import LABEL_GC_ROOT
from berth.core.namespaces import with_namespace

__all__ = [
    "CONTENT_CASES",
    "CROSS_NAMESPACE_CASES",
    "EMPTY_DIGEST",
    "NAMESPACE",
    "STORE_CASES",
    "TIME_SLACK",
    "CaseContext",
    "CaseNotApplicable",
    "ContentCase",
    "NamespacedStore",
    "OpenNamespacedStore",
    "OpenStore",
    "SharingPolicy",
    "check_content_store",
    "copy",
    "create_content",
    "open_writer",
    "read_blob",
    "read_section",
    "run_content_case",
    "write_blob",
]

SharingPolicy = Literal["shared", "isolated"]
#: ``open_store(root)``: a fresh store under the empty directory ``root``, closed on exit.
OpenStore = Callable[[Path], AbstractAsyncContextManager[Store]]

EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#: Seconds a timestamp may fall outside its window (clock granularity, not performance).
TIME_SLACK = 0.1
#: The namespace the plain cases run in.
NAMESPACE = "testsuite"
#: Buffer of :func:`copy` (containerd's pooled 1 MiB buffer).
COPY_BUFFER = 1 << 20
#: How long a case waits for a locked ref before failing.
LOCK_WAIT = 10.0


@dataclass(frozen=True, kw_only=True)
class NamespacedStore:
    """What ``open_namespaced_store`` yields: the store, and how to set labels on a namespace.

    ``label_namespace(name, labels)`` sets (creating the namespace if needed) the given labels on
    the namespace ``name``, keeping its other labels.
    """

    store: Store
    label_namespace: Callable[[str, Mapping[str, str]], Awaitable[None]]


#: ``open_namespaced_store(root, policy)``: a fresh namespaced store with that sharing policy.
OpenNamespacedStore = Callable[[Path, SharingPolicy], AbstractAsyncContextManager[NamespacedStore]]


class CaseNotApplicable(Exception):
    """The store under test cannot run this case (the message says why); report it as skipped."""


@dataclass(frozen=True, kw_only=True)
class CaseContext:
    """What a case gets: the store, the timing slack, and (cross-namespace cases) namespace labelling."""

    store: Store
    time_slack: float = TIME_SLACK
    label_namespace: Callable[[str, Mapping[str, str]], Awaitable[None]] | None = None


@dataclass(frozen=True, kw_only=True)
class ContentCase:
    """One case of the suite: its containerd name, its check, and the sharing policy it needs."""

    name: str
    check: Callable[[CaseContext], Awaitable[None]]
    #: ``None``: a plain case for any store; else the policy of the namespaced store it needs.
    policy: SharingPolicy | None = None

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.check) or ""


# --------------------------------------------------------------------------------------- helpers

_seeds = itertools.count(1)


def create_content(size: int) -> tuple[bytes, str]:
    """``size`` pseudo-random bytes, different on every call, and their sha256 digest."""
    data = random.Random(next(_seeds)).randbytes(size)
    return data, _digest_of(data)


def _digest_of(data: bytes) -> str:
    hasher = new_hasher()
    hasher.update(data)
    return f"sha256:{hasher.hexdigest()}"


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def open_writer(store: Store, ref: str, *, total: int = 0, expected: str = "") -> Writer:
    """``store.writer(...)``, retried while the ref is locked (containerd's ``content.OpenWriter``).

    Waits a random 0-16 ms, doubling the bound up to 2048 ms, between attempts, for as long as the
    caller lets it: bound it with ``trio.fail_after``.
    """
    bound = 16
    while True:
        try:
            return await store.writer(ref, total=total, expected=expected)
        except Unavailable:
            await trio.sleep(random.randrange(bound) / 1000)
            bound = min(bound * 2, 2048)


async def _open_writer(store: Store, ref: str, *, total: int = 0, expected: str = "") -> Writer:
    """:func:`open_writer` for the cases: a ref still locked after :data:`LOCK_WAIT` s fails the case."""
    with trio.move_on_after(LOCK_WAIT):
        return await open_writer(store, ref, total=total, expected=expected)
    raise AssertionError(f"ref {ref} is still locked after {LOCK_WAIT} s")


async def _read(source: Any, size: int) -> bytes:
    return bytes(await _maybe_await(source.read(size)))


async def _read_full(source: Any, size: int) -> bytes:
    """Up to ``size`` bytes, short only at the end of ``source`` (Go's ``io.ReadAtLeast``)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        chunk = await _read(source, size - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def _resume_source(source: Any, offset: int, size: int) -> Callable[[int], Awaitable[bytes]]:
    """A ``read(n)`` that continues ``source`` at ``offset``: seek it, read it at an offset, or discard."""
    seekable = getattr(source, "seekable", None)
    if hasattr(source, "seek") and (seekable is None or await _maybe_await(seekable())):
        position = await _maybe_await(source.seek(offset))
        if position is not None and position != offset:
            raise OSError(f"failed to seek to offset {offset}: at {position}")
        return partial(_read_full, source)
    if hasattr(source, "read_at") and (size > offset or not hasattr(source, "read")):
        position = offset
        end = size or None

        async def read_at(n: int) -> bytes:
            nonlocal position
            if end is not None:
                n = min(n, end - position)
            data = await read_section(source, position, n) if n > 0 else b""
            position += len(data)
            return data

        return read_at
    skipped = 0
    while skipped < offset:  # neither: discard the prefix
        chunk = await _read_full(source, min(COPY_BUFFER, offset - skipped))
        if not chunk:
            raise EOFError(f"unable to discard to offset {offset}: source ended at {skipped}")
        skipped += len(chunk)
    return partial(_read_full, source)


async def copy(writer: Writer, source: Any, size: int = 0, expected: str = "",
               labels: Mapping[str, str] | None = None) -> None:
    """Copy ``source`` into ``writer`` and commit it (containerd's ``content.Copy``).

    Resumes from ``writer.status().offset``: a seekable ``source`` (``seek``/``seekable``) is seeked;
    one with ``read_at(offset, n)`` is read from the offset; a plain ``read(n)`` stream has the
    prefix read and discarded. A blob's ``ReaderAt`` (``read_at`` only) works too. Methods may be
    sync or async. ``size``/``expected`` may be 0/"" when
    unknown. AlreadyExists on commit counts as success.

    Raises:
        EOFError: ``source`` ended before ``size`` bytes.
    """
    offset = writer.status().offset
    read: Callable[[int], Awaitable[bytes]]
    if offset == 0 and hasattr(source, "read"):
        read = partial(_read_full, source)
    else:
        read = await _resume_source(source, offset, size)
    copied = 0
    while True:
        chunk = await read(COPY_BUFFER)
        if not chunk:
            break
        await writer.write(chunk)
        copied += len(chunk)
        if len(chunk) < COPY_BUFFER:
            break
    if size and copied < size - offset:
        raise EOFError(f"short read: expected {size - offset} bytes but got {copied}")
    with contextlib.suppress(AlreadyExists):
        await writer.commit(size, expected, labels)


async def write_blob(store: Store, ref: str, source: Any, *, size: int = 0, expected: str = "",
                     labels: Mapping[str, str] | None = None) -> None:
    """Write ``source`` (bytes or a readable, see :func:`copy`) as the blob ``expected``
    (containerd's ``content.WriteBlob``): returns at once if the store already has it."""
    if isinstance(source, bytes | bytearray | memoryview):
        source = _Reader(bytes(source))
    try:
        writer = await open_writer(store, ref, total=size, expected=expected)
    except AlreadyExists:
        return
    try:
        await copy(writer, source, size, expected, labels)
    finally:
        await writer.close()


async def read_section(reader: ReaderAt, offset: int, size: int) -> bytes:
    """Up to ``size`` bytes from ``offset``, short only at the end of the blob (``io.SectionReader``)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        want = min(COPY_BUFFER, size - got)
        chunk = bytes(await _maybe_await(reader.read_at(offset + got, want)))
        parts.append(chunk)
        got += len(chunk)
        if len(chunk) < want:
            break
    return b"".join(parts)


async def read_blob(store: Store, digest: str) -> bytes:
    """The whole blob (containerd's ``content.ReadBlob``; for small blobs)."""
    reader = await store.reader_at(digest)
    try:
        data = await read_section(reader, 0, reader.size)
    finally:
        await reader.close()
    if len(data) != reader.size:
        raise EOFError(f"{digest}: read {len(data)} of {reader.size} bytes")
    return data


class _Reader:
    """A plain stream: ``read`` only (Go's ``struct{io.Reader}``)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._pos + size
        chunk = self._data[self._pos:end]
        self._pos += len(chunk)
        return chunk


class _ReaderAt(_Reader):
    """A stream that can also be read at an offset, but not seeked (Go's ``io.Reader + io.ReaderAt``)."""

    def read_at(self, offset: int, size: int) -> bytes:
        return self._data[offset:offset + size]


# ------------------------------------------------------------------------------------ assertions


def _fail(message: str) -> None:
    raise AssertionError(message)


def _equal(actual: Any, expected: Any, what: str) -> None:
    if actual != expected:
        _fail(f"unexpected {what} {actual!r}, expected {expected!r}")


def _stamp(value: float) -> str:
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="microseconds")


def _between(cx: CaseContext, value: float, start: float, end: float, what: str) -> None:
    if not start - cx.time_slack <= value <= end + cx.time_slack:
        _fail(f"unexpected {what} {_stamp(value)}, expected between {_stamp(start)} and {_stamp(end)} "
              f"(± {cx.time_slack} s)")


@contextlib.contextmanager
def _raises(error: type[BaseException], what: str) -> Iterator[None]:
    try:
        yield
    except error:
        return
    except Exception as err:
        raise AssertionError(f"{what}: expected {error.__name__}, got {type(err).__name__}: {err}") from err
    _fail(f"{what}: expected {error.__name__}, got no error")


async def _close_quietly(writer: Writer) -> None:
    """``defer w.Close()``: the error, if any, is not the case's concern."""
    with contextlib.suppress(Exception):
        await writer.close()


async def _write_in(writer: Writer, data: bytes, chunk: int) -> None:
    for start in range(0, len(data), chunk):
        await writer.write(data[start:start + chunk])


def _check_status(cx: CaseContext, writer: Writer, expected: Status, digest: str, pre_start: float,
                  post_start: float, pre_update: float, post_update: float) -> None:
    """containerd's ``checkStatus`` (``Expected`` is not compared, as there)."""
    status = writer.status()
    _equal(writer.digest(), digest, "digest")
    _equal(status.ref, expected.ref, "ref")
    _equal(status.offset, expected.offset, "offset")
    _equal(status.total, expected.total, "total")
    _between(cx, status.started_at, pre_start, post_start, "started at time")
    _between(cx, status.updated_at, pre_update, post_update, "updated at time")


def _check_newly_created(cx: CaseContext, writer: Writer, post_start: float, post_update: float) -> None:
    status = writer.status()
    _equal(writer.digest(), EMPTY_DIGEST, "digest")
    _equal(status.offset, 0, "offset")
    _between(cx, status.started_at, post_start, post_update, "started at time")


async def _check_info(cx: CaseContext, digest: str, *, size: int, labels: Mapping[str, str] | None,
                      created: tuple[float, float], updated: tuple[float, float]) -> None:
    info = await cx.store.info(digest)
    _equal(info.digest, digest, "info digest")
    _equal(info.size, size, "info size")
    _between(cx, info.created_at, *created, "created at time")
    _between(cx, info.updated_at, *updated, "updated at time")
    _equal(dict(info.labels), dict(labels or {}), "labels")


async def _check_content(cx: CaseContext, digest: str, *, size: int, created: tuple[float, float],
                         updated: tuple[float, float]) -> None:
    await _check_info(cx, digest, size=size, labels=None, created=created, updated=updated)
    data = await read_blob(cx.store, digest)
    _equal(len(data), size, "blob size")
    _equal(_digest_of(data), digest, "blob digest")


def _root_labels() -> dict[str, str]:
    return {LABEL_GC_ROOT: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _status(ref: str, offset: int = 0, total: int = 0) -> Status:
    return Status(ref=ref, offset=offset, total=total, expected="", started_at=0.0, updated_at=0.0)


def _info_with(digest: str, size: int, labels: Mapping[str, str]) -> Info:
    return Info(digest=digest, size=size, created_at=0.0, updated_at=0.0, labels=dict(labels))


# ----------------------------------------------------------------------------------------- cases


async def check_writer(cx: CaseContext) -> None:
    """Five writers open at once: no descriptor, size only, digest only, both, and a 32 MiB blob.

    Each is filled (32-byte writes; 1 MiB writes for the 32 MiB blob) and committed with a
    ``gc.root`` label; its digest and Info (size, labels, times in the commit window) must match.
    """
    labels = _root_labels()
    specs = [("c1", 256, False, False), ("c2", 256, True, False), ("c3", 256, False, True),
             ("c4", 256, True, True), ("c5", 32 << 20, True, True)]
    writers: list[tuple[Writer, bytes, str]] = []
    try:
        for ref, size, with_size, with_digest in specs:
            data, digest = create_content(size)
            writer = await _open_writer(cx.store, ref, total=size if with_size else 0,
                                       expected=digest if with_digest else "")
            writers.append((writer, data, digest))
        for writer, data, digest in writers:
            await _write_in(writer, data, 32 if len(data) <= 4096 else COPY_BUFFER)
            pre_commit = time.time()
            await writer.commit(0, "", labels)
            post_commit = time.time()
            _equal(writer.digest(), digest, "commit digest")
            await _check_info(cx, digest, size=len(data), labels=labels, created=(pre_commit, post_commit),
                              updated=(pre_commit, post_commit))
    finally:
        for writer, _, _ in writers:
            await _close_quietly(writer)


async def check_update_status(cx: CaseContext) -> None:
    """Status before writing (offset 0, total 256, empty digest) and after 64, 192 and 256 bytes;
    then commit with labels and check Info."""
    data, digest = create_content(256)
    pre_start = time.time()
    writer = await _open_writer(cx.store, "c1", total=256, expected=digest)
    try:
        post_start = time.time()
        expected = _status("c1", 0, 256)
        _check_status(cx, writer, expected, EMPTY_DIGEST, pre_start, post_start, pre_start, post_start)
        for end in (64, 192, 256):
            pre_update = time.time()
            await writer.write(data[expected.offset:end])
            post_update = time.time()
            expected = _status("c1", end, 256)
            _check_status(cx, writer, expected, _digest_of(data[:end]), pre_start, post_start, pre_update,
                          post_update)
        labels = _root_labels()
        pre_commit = time.time()
        await writer.commit(0, "", labels)
        post_commit = time.time()
        await _check_info(cx, digest, size=256, labels=labels, created=(pre_commit, post_commit),
                          updated=(pre_commit, post_commit))
    finally:
        await _close_quietly(writer)


async def check_commit_exists(cx: CaseContext) -> None:
    """With the blob present, a new writer of the same bytes gets AlreadyExists on commit, with the
    expected digest and with none."""
    data, digest = create_content(256)
    await write_blob(cx.store, "c1", data, expected=digest)
    for i, expected in enumerate((digest, "")):
        writer = await _open_writer(cx.store, f"c1-commitexists-{i}")
        try:
            await writer.write(data)
            with _raises(AlreadyExists, f"({i}) commit of existing content"):
                await writer.commit(len(data), expected)
        finally:
            await writer.close()


async def check_resume(cx: CaseContext) -> None:
    """Write 128 of 256 bytes and close; the reopened ref shows the same status (offset, times,
    digest); write the rest, commit, check Info."""
    ref = "cb"
    data, digest = create_content(256)
    first, second = data[:128], data[128:]
    pre_start = time.time()
    w1 = await _open_writer(cx.store, ref, total=256, expected=digest)
    try:
        post_start = pre_update = time.time()
        await w1.write(first)
        post_update = time.time()
        expected = _status(ref, len(first), len(data))
        _check_status(cx, w1, expected, _digest_of(first), pre_start, post_start, pre_update, post_update)
    finally:
        await w1.close()

    w2 = await _open_writer(cx.store, ref, total=256, expected=digest)
    try:
        _check_status(cx, w2, expected, _digest_of(first), pre_start, post_start, pre_update, post_update)
        pre_update = time.time()
        await w2.write(second)
        post_update = time.time()
        expected = _status(ref, len(data), len(data))
        _check_status(cx, w2, expected, digest, pre_start, post_start, pre_update, post_update)
        pre_commit = time.time()
        await w2.commit(0, "")
        post_commit = time.time()
    finally:
        await w2.close()
    await _check_info(cx, digest, size=256, labels=None, created=(pre_commit, post_commit),
                      updated=(pre_commit, post_commit))


ResumeFinish = Callable[[Writer, bytes, int, int, str], Awaitable[None]]


def _resume_case(finish: ResumeFinish, doc: str) -> Callable[[CaseContext], Awaitable[None]]:
    async def check(cx: CaseContext) -> None:
        for i, size in enumerate((500, 5000, 50000)):
            for j, fraction in enumerate((0.0, 0.1, 0.5, 0.9, 1.0)):
                data, digest = create_content(size)
                limit = int(size * fraction)
                ref = f"ref-{i}-{j}"
                writer = await _open_writer(cx.store, ref, total=size, expected=digest)
                try:
                    await writer.write(data[:limit])
                finally:
                    await writer.close()
                writer = await _open_writer(cx.store, ref, total=size, expected=digest)
                try:
                    _equal(writer.status().offset, limit, f"offset of resumed {ref}")
                    pre_commit = time.time()
                    await finish(writer, data, limit, size, digest)
                    post_commit = time.time()
                finally:
                    await writer.close()
                await _check_info(cx, digest, size=size, labels=None, created=(pre_commit, post_commit),
                                  updated=(pre_commit, post_commit))

    check.__doc__ = (f"Sizes 500/5000/50000 x truncation points 0/.1/.5/.9/1: write a prefix, close, reopen "
                     f"(offset == prefix), then {doc}; commit with (size, digest) and check Info.")
    return check


async def _resume_truncate(writer: Writer, data: bytes, written: int, size: int, digest: str) -> None:
    await writer.truncate(0)
    await _write_in(writer, data, 1024)
    await writer.commit(size, digest)


async def _resume_discard(writer: Writer, data: bytes, written: int, size: int, digest: str) -> None:
    await _write_in(writer, data[written:], 1024)
    await writer.commit(size, digest)


async def _resume_copy(writer: Writer, data: bytes, written: int, size: int, digest: str) -> None:
    await copy(writer, _Reader(data), size, digest)


async def _resume_copy_seeker(writer: Writer, data: bytes, written: int, size: int, digest: str) -> None:
    await copy(writer, io.BytesIO(data), size, digest)


async def _resume_copy_reader_at(writer: Writer, data: bytes, written: int, size: int, digest: str) -> None:
    await copy(writer, _ReaderAt(data), size, digest)


check_resume_truncate = _resume_case(_resume_truncate, "truncate(0) and write everything again")
check_resume_discard = _resume_case(_resume_discard, "write only the remainder")
check_resume_copy = _resume_case(_resume_copy, "copy() from a plain stream (the prefix is discarded)")
check_resume_copy_seeker = _resume_case(_resume_copy_seeker, "copy() from a seekable stream")
check_resume_copy_reader_at = _resume_case(_resume_copy_reader_at, "copy() from a stream with read_at")


async def check_small_blob(cx: CaseContext) -> None:
    """A 6-byte blob read through ``reader_at`` with a section one byte longer returns exactly the blob."""
    blob = b"foobar"
    digest = _digest_of(blob)
    writer = await cx.store.writer("SmallBlob", total=len(blob), expected=digest)
    try:
        await writer.write(blob)
        await writer.commit(len(blob), digest)
    finally:
        await writer.close()
    reader = await cx.store.reader_at(digest)
    try:
        data = await read_section(reader, 0, len(blob) + 1)
    finally:
        await reader.close()
    _equal(data, blob, "content read")


async def check_labels(cx: CaseContext) -> None:
    """Commit with labels (gc.root included); ``update(info)`` replaces them; ``update(info,
    "labels.k3", "labels.k1")`` removes k3 (absent from info) and changes k1. Updated moves, Created not."""
    data, digest = create_content(256)
    writer = await _open_writer(cx.store, "c1-checklabels", total=256, expected=digest)
    try:
        await writer.write(data)
        root_time = _root_labels()[LABEL_GC_ROOT]
        labels = {"k1": "v1", "k2": "v2", LABEL_GC_ROOT: root_time}
        pre_commit = time.time()
        await writer.commit(0, "", labels)
        post_commit = time.time()
    finally:
        await writer.close()
    committed = (pre_commit, post_commit)
    await _check_info(cx, digest, size=256, labels=labels, created=committed, updated=committed)

    labels = {"k1": "newvalue", "k3": "v3", LABEL_GC_ROOT: root_time}
    pre_update = time.time()
    await cx.store.update(_info_with(digest, 256, labels))
    post_update = time.time()
    await _check_info(cx, digest, size=256, labels=labels, created=committed, updated=(pre_update, post_update))

    labels = {"k1": "v1", LABEL_GC_ROOT: root_time}
    pre_update = time.time()
    await cx.store.update(_info_with(digest, 256, labels), ["labels.k3", "labels.k1"])
    post_update = time.time()
    await _check_info(cx, digest, size=256, labels=labels, created=committed, updated=(pre_update, post_update))


async def _check_ref_not_available(cx: CaseContext, ref: str) -> None:
    try:
        writer = await cx.store.writer(ref)
    except Unavailable:
        return
    except Exception as err:
        raise AssertionError(f"expected Unavailable for the locked ref {ref}, got {type(err).__name__}: "
                             f"{err}") from err
    await _close_quietly(writer)
    _fail(f"writer created with ref {ref}, expected it to be in use")


async def check_commit_error_state(cx: CaseContext) -> None:
    """While a writer is open its ref is Unavailable; committing existing content gives AlreadyExists
    (with or without the digest); a wrong digest, then a wrong size, give FailedPrecondition and
    leave the ingest resumable; a correct commit then succeeds; the ref is reusable after each."""
    store = cx.store
    c1, d1 = create_content(256)
    _, d2 = create_content(256)
    await write_blob(store, "c1", c1, expected=d1)
    ref = "c1-commiterror-state"

    writer = await _open_writer(store, ref)
    try:
        await writer.write(c1)
        await _check_ref_not_available(cx, ref)
        with _raises(AlreadyExists, "commit of existing content with its digest"):
            await writer.commit(len(c1), d1)
    finally:
        await _close_quietly(writer)

    writer = await _open_writer(store, ref)
    try:
        await _check_ref_not_available(cx, ref)
        await writer.write(c1)
        with _raises(AlreadyExists, "commit of existing content without a digest"):
            await writer.commit(len(c1), "")
    finally:
        await _close_quietly(writer)

    writer = await _open_writer(store, ref)
    try:
        await _check_ref_not_available(cx, ref)
        await writer.write(c1 + b"more")
        with _raises(FailedPrecondition, "commit with the wrong digest"):
            await writer.commit(len(c1) + 4, d2)
    finally:
        await _close_quietly(writer)

    writer = await _open_writer(store, ref)
    try:
        await _check_ref_not_available(cx, ref)
        with _raises(FailedPrecondition, "commit with the wrong size"):
            await writer.commit(len(c1), "")
    finally:
        await _close_quietly(writer)

    writer = await _open_writer(store, ref)
    try:
        await _check_ref_not_available(cx, ref)
        await writer.commit(len(c1) + 4, "")  # now it succeeds
    finally:
        await _close_quietly(writer)

    writer = await _open_writer(store, ref)  # a new ingest on the same ref
    try:
        await writer.write(c1)
        await _check_ref_not_available(cx, ref)
        with _raises(AlreadyExists, "commit of existing content on a reused ref"):
            await writer.commit(len(c1), d1)
    finally:
        await _close_quietly(writer)

    writer = await _open_writer(store, ref)
    await _check_ref_not_available(cx, ref)
    await writer.close()

    writer = await _open_writer(store, ref)  # the ref is available again
    await writer.close()


def _namespaced(cx: CaseContext) -> Callable[[str, Mapping[str, str]], Awaitable[None]]:
    if cx.label_namespace is None:
        raise CaseNotApplicable("multiple namespaces not supported")
    return cx.label_namespace


async def check_cross_namespace_append(cx: CaseContext) -> None:
    """(shared) A blob exists in ns1; in ns2 a writer for the same ref and descriptor starts complete,
    appends bytes and commits the new digest: ns1 sees the blob, ns2 the longer one."""
    _namespaced(cx)
    size = 1000
    data, digest = create_content(size)
    ref = f"ref-{size}"
    t1 = time.time()
    with with_namespace("ns1"):
        await write_blob(cx.store, ref, data, size=size, expected=digest)
    extra = b"appended bytes"
    data2 = data + extra
    digest2 = _digest_of(data2)
    with with_namespace("ns2"):
        writer = await _open_writer(cx.store, ref, total=size, expected=digest)
        try:
            t2 = time.time()
            _check_status(cx, writer, _status(ref, size, size), digest, t1, t2, t1, t2)
            await writer.write(extra)
            await writer.commit(len(data2), digest2)
            t3 = time.time()
        finally:
            await _close_quietly(writer)
    with with_namespace("ns1"):
        await _check_content(cx, digest, size=size, created=(t1, t3), updated=(t1, t3))
    with with_namespace("ns2"):
        await _check_content(cx, digest2, size=len(data2), created=(t1, t3), updated=(t1, t3))


async def check_cross_namespace_share(cx: CaseContext) -> None:
    """(shared) A blob exists in ns1; in ns2 a writer with its descriptor starts complete, and its
    commit makes the blob visible in both namespaces."""
    _namespaced(cx)
    await _check_shared_commit(cx)


async def _check_shared_commit(cx: CaseContext) -> None:
    size = 1000
    data, digest = create_content(size)
    ref = f"ref-{size}"
    t1 = time.time()
    with with_namespace("ns1"):
        await write_blob(cx.store, ref, data, size=size, expected=digest)
    with with_namespace("ns2"):
        writer = await _open_writer(cx.store, ref, total=size, expected=digest)
        try:
            t2 = time.time()
            _check_status(cx, writer, _status(ref, size, size), digest, t1, t2, t1, t2)
            await writer.commit(size, digest)
            t3 = time.time()
        finally:
            await _close_quietly(writer)
    for namespace in ("ns1", "ns2"):
        with with_namespace(namespace):
            await _check_content(cx, digest, size=size, created=(t1, t3), updated=(t1, t3))


async def check_cross_namespace_isolate(cx: CaseContext) -> None:
    """(isolated) A blob exists in ns1; in ns2 a writer for the same ref and descriptor starts fresh:
    offset 0, the empty digest, a new start time."""
    _namespaced(cx)
    size = 1000
    data, digest = create_content(size)
    ref = f"ref-{size}"
    with with_namespace("ns1"):
        await write_blob(cx.store, ref, data, size=size, expected=digest)
    t2 = time.time()
    with with_namespace("ns2"):
        writer = await _open_writer(cx.store, ref, total=size, expected=digest)
        try:
            t4 = time.time()
            _check_newly_created(cx, writer, t2, t4)
        finally:
            await _close_quietly(writer)


async def check_shared_namespace_isolate(cx: CaseContext) -> None:
    """(isolated) ns1 is labelled shareable, so a writer in ns2 sees its blob as complete; the commit
    succeeds and the blob is visible in both namespaces."""
    label_namespace = _namespaced(cx)
    await label_namespace("ns1", {LABEL_SHAREABLE: "true"})
    await _check_shared_commit(cx)


_CASES = [
    ContentCase(name="Writer", check=check_writer),
    ContentCase(name="UpdateStatus", check=check_update_status),
    ContentCase(name="CommitExists", check=check_commit_exists),
    ContentCase(name="Resume", check=check_resume),
    ContentCase(name="ResumeTruncate", check=check_resume_truncate),
    ContentCase(name="ResumeDiscard", check=check_resume_discard),
    ContentCase(name="ResumeCopy", check=check_resume_copy),
    ContentCase(name="ResumeCopySeeker", check=check_resume_copy_seeker),
    ContentCase(name="ResumeCopyReaderAt", check=check_resume_copy_reader_at),
    ContentCase(name="SmallBlob", check=check_small_blob),
    ContentCase(name="Labels", check=check_labels),
    ContentCase(name="CommitErrorState", check=check_commit_error_state),
    ContentCase(name="CrossNamespaceAppend", check=check_cross_namespace_append, policy="shared"),
    ContentCase(name="CrossNamespaceShare", check=check_cross_namespace_share, policy="shared"),
    ContentCase(name="CrossNamespaceIsolate", check=check_cross_namespace_isolate, policy="isolated"),
    ContentCase(name="SharedNamespaceIsolate", check=check_shared_namespace_isolate, policy="isolated"),
]

#: Every case by its containerd name, in containerd's order.
CONTENT_CASES: dict[str, ContentCase] = {case.name: case for case in _CASES}
#: containerd's ``ContentSuite``: the cases any store runs.
STORE_CASES: tuple[str, ...] = tuple(case.name for case in _CASES if case.policy is None)
#: ``ContentCrossNS{Shared,Isolated}Suite`` and ``ContentSharedNSIsolatedSuite``.
CROSS_NAMESPACE_CASES: tuple[str, ...] = tuple(case.name for case in _CASES if case.policy is not None)


# ---------------------------------------------------------------------------------------- runners


async def run_content_case(name: str, open_store: OpenStore | None, root: Path, *,
                           open_namespaced_store: OpenNamespacedStore | None = None,
                           time_slack: float = TIME_SLACK) -> None:
    """Run the case ``name`` on a fresh store under ``root`` (an empty directory).

    ``open_store`` may be ``None`` for a cross-namespace case, which uses ``open_namespaced_store``.

    Raises:
        KeyError: no case has that name.
        ValueError: a plain case without ``open_store``.
        CaseNotApplicable: a cross-namespace case without ``open_namespaced_store``.
        AssertionError: the store does not behave as containerd's does (the message says how).
    """
    case = CONTENT_CASES[name]
    if case.policy is None:
        if open_store is None:
            raise ValueError(f"case {name} needs open_store")
        async with open_store(root) as store:
            with with_namespace(NAMESPACE):
                await case.check(CaseContext(store=store, time_slack=time_slack))
        return
    if open_namespaced_store is None:
        raise CaseNotApplicable("multiple namespaces not supported (pass open_namespaced_store to run "
                                f"{name} with the {case.policy} sharing policy)")
    async with open_namespaced_store(root, case.policy) as namespaced:
        await case.check(CaseContext(store=namespaced.store, time_slack=time_slack,
                                     label_namespace=namespaced.label_namespace))


async def check_content_store(open_store: OpenStore, tmp_path: Path, cases: Iterable[str] | None = None, *,
                              open_namespaced_store: OpenNamespacedStore | None = None,
                              time_slack: float = TIME_SLACK) -> dict[str, str]:
    """Run ``cases`` (default: all, in containerd's order), each on a fresh store in ``tmp_path/<name>``.

    Returns each case's outcome, ``"passed"`` or ``"skipped: <reason>"``.

    Raises:
        ExceptionGroup: the failures, each noted with its case name, after running every case.
    """
    outcomes: dict[str, str] = {}
    failures: list[Exception] = []
    for name in list(cases) if cases is not None else list(CONTENT_CASES):
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        try:
            await run_content_case(name, open_store, root, open_namespaced_store=open_namespaced_store,
                                   time_slack=time_slack)
        except CaseNotApplicable as skip:
            outcomes[name] = f"skipped: {skip}"
        except Exception as err:
            err.add_note(f"content conformance case {name}")
            outcomes[name] = f"failed: {type(err).__name__}: {err}"
            failures.append(err)
        else:
            outcomes[name] = "passed"
    if failures:
        failed = [name for name, outcome in outcomes.items() if outcome.startswith("failed")]
        raise ExceptionGroup(f"content conformance: {len(failed)} case(s) failed: {', '.join(failed)}", failures)
    return outcomes
