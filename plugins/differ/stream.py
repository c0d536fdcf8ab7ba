"""Bounded byte pipes between the trio event loop and worker threads, and the decompressors.

A layer is applied by three parties joined by two :class:`BytePipe` objects: the trio task that reads
the blob (from the network or the content store) puts chunks into the first pipe; a *decompress* thread
hashes the compressed bytes, decompresses them, hashes the uncompressed bytes and puts them into the
second pipe; an *extract* thread reads the tar stream from it. Each pipe holds at most ``limit`` bytes,
so a fast reader never buffers a whole layer. :meth:`BytePipe.abort` wakes every party blocked on the
pipe with an error, which is how a failure on one side (or a cancellation) stops the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import deque
from collections.abc import Callable
from typing import IO, Any, cast

import trio
import zstandard
from isal import isal_zlib
from isal.igzip_lib import IsalError as _IsalError

from berth.core.errdefs import InvalidArgument

__all__ = ["BytePipe", "PipeAborted", "StreamDigests", "decompress_into"]

#: isal's stub declares its error as an instance, not a class.
IsalError = cast("type[Exception]", _IsalError)
#: Size of the pieces the decompressors produce.
_PIECE = 256 << 10


class PipeAborted(Exception):
    """The other side of a pipe failed or was cancelled; the real error is reported by that side."""


class BytePipe:
    """A bounded FIFO of byte chunks from one producer to one consumer.

    ``put`` (thread) and ``aput`` (trio) block while more than ``limit`` bytes are queued; ``read``
    (thread) and ``aread`` (trio) wait until data, end of stream or an abort arrives. The trio side is
    woken through ``token`` (needed when either side is async).
    """

    def __init__(self, limit: int, token: trio.lowlevel.TrioToken | None = None) -> None:
        self._limit = limit
        self._token = token
        self._cond = threading.Condition()
        self._chunks: deque[bytes | memoryview] = deque()
        self._size = 0
        self._closed = False
        self._aborted = False
        self._space: trio.Event | None = None
        self._data: trio.Event | None = None

    def put(self, data: bytes | memoryview) -> None:
        """Queue ``data`` from a thread, waiting for room. Raises PipeAborted after :meth:`abort`."""
        if not data:
            return
        with self._cond:
            while self._size >= self._limit and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise PipeAborted
            self._chunks.append(data)
            self._size += len(data)
            self._cond.notify_all()
            waiting, self._data = self._data, None
        if waiting is not None:
            self._wake(waiting)

    async def aput(self, data: bytes | memoryview) -> None:
        """Queue ``data`` from trio, waiting (without blocking the loop) for room.

        Raises PipeAborted after :meth:`abort`; cancellation leaves the pipe unchanged.
        """
        if not data:
            return
        while True:
            with self._cond:
                if self._aborted:
                    raise PipeAborted
                if self._size < self._limit:
                    self._chunks.append(data)
                    self._size += len(data)
                    self._cond.notify_all()
                    return
                space = self._space = trio.Event()
            await space.wait()

    def close(self) -> None:
        """End of stream: the reader gets ``b""`` once the queued data is read."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            waiting, self._data = self._data, None
        if waiting is not None:
            self._wake(waiting)

    def abort(self) -> None:
        """Wake every waiter with PipeAborted (idempotent)."""
        with self._cond:
            self._aborted = True
            self._chunks.clear()
            self._size = 0
            self._cond.notify_all()
            space, self._space = self._space, None
            waiting, self._data = self._data, None
        for event in (space, waiting):
            if event is not None and self._token is not None:
                self._wake(event)

    def read(self) -> bytes | memoryview:
        """The next chunk, or ``b""`` at end of stream. Blocks. Raises PipeAborted after :meth:`abort`."""
        with self._cond:
            while not self._chunks and not self._closed and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise PipeAborted
            if not self._chunks:
                return b""
            data = self._chunks.popleft()
            self._size -= len(data)
            self._cond.notify_all()
            space = None
            if self._space is not None and self._size < self._limit:
                space, self._space = self._space, None
        if space is not None:
            self._wake(space)
        return data

    async def aread(self) -> bytes | memoryview:
        """The next chunk, or ``b""`` at end of stream, waiting in trio. Raises PipeAborted after :meth:`abort`."""
        while True:
            with self._cond:
                if self._aborted:
                    raise PipeAborted
                if self._chunks:
                    data = self._chunks.popleft()
                    self._size -= len(data)
                    self._cond.notify_all()
                    return data
                if self._closed:
                    return b""
                waiting = self._data = trio.Event()
            await waiting.wait()

    def _wake(self, event: trio.Event) -> None:
        assert self._token is not None
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(event.set)


class StreamDigests:
    """What the decompress thread measured: the compressed digest and size, and the diff ID."""

    def __init__(self) -> None:
        self.compressed = hashlib.sha256()
        self.uncompressed = hashlib.sha256()
        self.size = 0
        self.uncompressed_size = 0

    @property
    def digest(self) -> str:
        return "sha256:" + self.compressed.hexdigest()

    @property
    def diff_id(self) -> str:
        return "sha256:" + self.uncompressed.hexdigest()


def _gzip_decompressor() -> Callable[[bytes | memoryview], list[bytes]]:
    """A gzip decompressor (isal) handling multi-member streams; returns pieces of at most ``_PIECE``."""
    state: dict[str, Any] = {"d": isal_zlib.decompressobj(wbits=31)}

    def feed(data: bytes | memoryview) -> list[bytes]:
        out: list[bytes] = []
        pending: bytes | memoryview = data
        while pending:
            d = state["d"]
            piece = d.decompress(pending, _PIECE)
            if piece:
                out.append(piece)
            if d.eof:
                rest: bytes = d.unused_data
                state["d"] = isal_zlib.decompressobj(wbits=31)
                if rest and not rest.lstrip(b"\0"):
                    break  # zero padding after the last member, as some writers add
                pending = rest
            else:
                pending = d.unconsumed_tail
        return out

    return feed


def decompress_into(compression: str, source: BytePipe, sink: BytePipe, digests: StreamDigests) -> None:
    """Read ``source`` to its end, hashing and decompressing into ``sink`` (closed at the end).

    Blocks (a worker thread). Raises InvalidArgument for corrupt compressed data, PipeAborted when
    either pipe is aborted.
    """
    try:
        if compression == "gzip":
            _run(source, sink, digests, _gzip_decompressor(), "gzip")
        elif compression == "zstd":
            _run_zstd(source, sink, digests)
        else:
            _run(source, sink, digests, lambda data: [bytes(data)] if data else [], "tar")
    finally:
        sink.close()


def _run(source: BytePipe, sink: BytePipe, digests: StreamDigests,
         feed: Callable[[bytes | memoryview], list[bytes]], what: str) -> None:
    while True:
        data = source.read()
        if not data:
            break
        digests.compressed.update(data)
        digests.size += len(data)
        try:
            pieces = feed(data)
        except IsalError as err:
            raise InvalidArgument(f"layer is not valid {what}: {err}") from None
        for piece in pieces:
            digests.uncompressed.update(piece)
            digests.uncompressed_size += len(piece)
            sink.put(piece)


class _HashingReader:
    """A file-like view of a pipe for ``zstandard.stream_reader``, hashing what it hands out."""

    def __init__(self, source: BytePipe, digests: StreamDigests) -> None:
        self._source = source
        self._digests = digests
        self._pending: bytes | memoryview = b""

    def read(self, size: int = -1) -> bytes:
        if not self._pending:
            self._pending = self._source.read()
            self._digests.compressed.update(self._pending)
            self._digests.size += len(self._pending)
        data = self._pending if size < 0 else self._pending[:size]
        self._pending = self._pending[len(data):]
        return bytes(data)


def _run_zstd(source: BytePipe, sink: BytePipe, digests: StreamDigests) -> None:
    # stream_reader bounds each output piece, so a small frame that inflates hugely cannot exhaust memory.
    raw = _HashingReader(source, digests)
    reader = zstandard.ZstdDecompressor().stream_reader(cast("IO[bytes]", raw), read_across_frames=True)
    while True:
        try:
            piece = reader.read(_PIECE)
        except zstandard.ZstdError as err:
            raise InvalidArgument(f"layer is not valid zstd: {err}") from None
        if not piece:
            break
        digests.uncompressed.update(piece)
        digests.uncompressed_size += len(piece)
        sink.put(piece)
    while raw.read():  # bytes after the last frame still count in the blob's digest
        pass
