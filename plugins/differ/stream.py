"""Bounded byte pipes between the trio event loop and worker threads, and the decompressors.

Applying a layer: the trio task that reads the blob (from the network or the content store) puts chunks
into a :class:`BytePipe`; the worker thread reads them (small chunks joined up to 1 MiB), and
:func:`decompressed` hashes them (the blob digest), decompresses and hashes the result (the diff ID) for
the tar reader. Computing a layer runs the other way: a thread puts compressed tar into a pipe that a trio
task reads into a content writer. A pipe holds at most ``limit`` bytes, so a fast producer never buffers a
whole layer; :meth:`BytePipe.abort` wakes both sides with an error, which is how a failure on one side (or
a cancellation) stops the other.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

import trio
import zstandard
from isal import isal_zlib
from isal.igzip_lib import IsalError as _IsalError

from berth.core.errdefs import InvalidArgument

__all__ = ["BytePipe", "PipeAborted", "StreamDigests", "decompressed"]

#: isal's stub declares its error as an instance, not a class.
IsalError = cast("type[Exception]", _IsalError)
#: Size of the pieces the decompressors produce.
_PIECE = 1 << 20
#: Small queued chunks are joined up to this size when read (fewer hand-offs between threads).
_COALESCE = 1 << 20


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

    def check(self) -> None:
        """Raise PipeAborted if the pipe was aborted (for producers with long stretches between puts)."""
        if self._aborted:
            raise PipeAborted

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
            if self._chunks and len(data) < _COALESCE:
                parts = [data]
                total = len(data)
                while self._chunks and total < _COALESCE:
                    parts.append(self._chunks.popleft())
                    total += len(parts[-1])
                self._size -= total
                data = b"".join(parts)
            else:
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


def decompressed(compression: str, source: BytePipe, digests: StreamDigests) -> Iterator[bytes | memoryview]:
    """The uncompressed stream of ``source`` in pieces, hashing both sides into ``digests``; ``source`` is
    read to its end (bytes after the last gzip member or zstd frame count in the blob digest).

    Blocks. Raises InvalidArgument for corrupt compressed data, PipeAborted when ``source`` is aborted.
    """
    pieces: Iterator[bytes | memoryview]
    if compression == "zstd":
        pieces = _zstd_pieces(source, digests)
    else:
        pieces = _pieces(source, digests, _gzip_decompressor() if compression == "gzip" else None, compression)
    for piece in pieces:
        digests.uncompressed.update(piece)
        digests.uncompressed_size += len(piece)
        yield piece


def _pieces(source: BytePipe, digests: StreamDigests, feed: Callable[[bytes | memoryview], list[bytes]] | None,
            what: str) -> Iterator[bytes | memoryview]:
    while True:
        data = source.read()
        if not data:
            return
        digests.compressed.update(data)
        digests.size += len(data)
        if feed is None:
            yield data
            continue
        try:
            pieces = feed(data)
        except IsalError as err:
            raise InvalidArgument(f"layer is not valid {what}: {err}") from None
        yield from pieces


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


def _zstd_pieces(source: BytePipe, digests: StreamDigests) -> Iterator[bytes]:
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
        yield piece
    while raw.read():  # bytes after the last frame still count in the blob's digest
        pass
