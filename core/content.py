"""The content store interface: immutable blobs addressed by digest, written through resumable ingests.

Terms (containerd's): a **blob** is committed content, read-only, named by its digest
(``sha256:<hex>``); an **ingest** is content being written under a client-chosen **ref**; a
**writer** owns one ingest at a time (a second writer on a locked ref is
:class:`~berth.core.errdefs.Unavailable`); closing a writer without committing keeps the ingest so a
later writer on the same ref resumes where it stopped; **commit** verifies size and digest and makes
the blob visible atomically.

Namespaced stores (the metadata layer) take the namespace from :mod:`berth.core.namespaces`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from berth.core.errdefs import DataLoss, InvalidArgument

__all__ = [
    "DIGEST_ALGORITHMS",
    "Info",
    "ReaderAt",
    "Status",
    "Store",
    "Writer",
    "new_hasher",
    "read_blob",
    "validate_digest",
]

#: Digest algorithms berth accepts, as the OCI image spec registers them.
DIGEST_ALGORITHMS = ("sha256", "sha384", "sha512")
_ENCODED_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}
_DIGEST = re.compile(r"(sha256|sha384|sha512):([a-f0-9]+)\Z")


def validate_digest(value: Any) -> str:
    """Return ``value`` if it is a digest berth can verify (``sha256:`` + 64 lowercase hex, ...).

    Raises:
        InvalidArgument: naming the value and what is wrong with it.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"digest must be a string, got {type(value).__name__}")
    match = _DIGEST.match(value)
    if match is None:
        raise InvalidArgument(f"invalid digest {value[:80]!r}: expected <algorithm>:<lowercase hex> "
                              f"with algorithm one of {', '.join(DIGEST_ALGORITHMS)}")
    algorithm, encoded = match.groups()
    if len(encoded) != _ENCODED_LENGTH[algorithm]:
        raise InvalidArgument(f"invalid digest {value[:80]!r}: {algorithm} needs "
                              f"{_ENCODED_LENGTH[algorithm]} hex characters")
    return value


def new_hasher(expected: str = "") -> Any:
    """A hashlib object for the algorithm of ``expected`` (sha256 when empty)."""
    algorithm = validate_digest(expected).partition(":")[0] if expected else "sha256"
    return hashlib.new(algorithm)


@dataclass(frozen=True, slots=True, kw_only=True)
class Info:
    """A committed blob. Times are UNIX seconds."""

    digest: str
    size: int
    created_at: float
    updated_at: float
    labels: dict[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "created_at": self.created_at,
                "updated_at": self.updated_at, "labels": dict(self.labels)}

    def filter_target(self) -> dict[str, Any]:
        """The fields list filters match on: ``digest``, ``size``, ``labels.<key>``."""
        return {"digest": self.digest, "size": self.size, "labels": self.labels}


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """An ingest in progress: ``offset`` bytes written of ``total`` (0: unknown)."""

    ref: str
    offset: int
    total: int
    expected: str
    started_at: float
    updated_at: float

    def to_wire(self) -> dict[str, Any]:
        return {"ref": self.ref, "offset": self.offset, "total": self.total, "expected": self.expected,
                "started_at": self.started_at, "updated_at": self.updated_at}


class Writer(Protocol):
    """One open ingest. Not safe for concurrent use; every method but ``digest``/``status`` awaits I/O."""

    @property
    def ref(self) -> str: ...

    async def write(self, data: bytes) -> None:
        """Append ``data`` and update the running digest."""

    def digest(self) -> str:
        """The digest of everything written so far."""

    def status(self) -> Status: ...

    async def truncate(self, size: int) -> None:
        """Discard the content (only ``size == 0`` is supported) to start over."""

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> None:
        """Verify and publish the blob, then close the writer (whatever the outcome).

        Raises:
            FailedPrecondition: ``size`` (when not 0) or ``expected`` (when set) does not match;
                the ingest stays and can be resumed.
            AlreadyExists: the blob exists already; the ingest is removed.
        """

    async def close(self) -> None:
        """Release the ref, keeping what was written for a later writer to resume. Idempotent."""


class ReaderAt(Protocol):
    """Random access to a committed blob."""

    @property
    def size(self) -> int: ...

    async def read_at(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer at the end of the blob)."""

    async def close(self) -> None: ...


class Store(Protocol):
    """A content store (see the module docstring for the terms)."""

    async def info(self, digest: str) -> Info:
        """Raises: NotFound."""

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change labels: no fieldpaths (or ``labels``) replaces them all; ``labels.<key>`` sets or (when
        absent from ``info``) removes one key.

        Raises: NotFound; InvalidArgument for any other field path.
        """

    def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[Info]:
        """Every blob matching any filter (fields ``digest``, ``size``, ``labels.<key>``)."""

    async def delete(self, digest: str) -> None:
        """Raises: NotFound."""

    async def reader_at(self, digest: str) -> ReaderAt:
        """Raises: NotFound."""

    async def writer(self, ref: str, *, total: int = 0, expected: str = "") -> Writer:
        """Open (or resume) the ingest ``ref``.

        Raises:
            Unavailable: another writer holds ``ref``.
            AlreadyExists: ``expected`` names a blob that exists already.
            InvalidArgument: ``total`` conflicts with the resumed ingest's, or a bad ref/digest.
        """

    async def status(self, ref: str) -> Status:
        """Raises: NotFound."""

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[Status]:
        """Every ingest matching any filter (field ``ref``)."""

    async def abort(self, ref: str) -> None:
        """Remove the ingest ``ref`` and its data.

        Raises: NotFound.
        """


async def read_blob(store: Store, digest: str, *, chunk_size: int = 1 << 20) -> AsyncGenerator[bytes, None]:
    """The bytes of the committed blob ``digest``, in chunks of up to ``chunk_size``.

    Raises:
        NotFound: no such blob.
        DataLoss: the blob ended before its recorded size (the file was cut under the store).
    Closing the iterator early (or cancelling) closes the reader.
    """
    reader = await store.reader_at(digest)
    try:
        offset = 0
        while offset < reader.size:
            data = await reader.read_at(offset, min(chunk_size, reader.size - offset))
            if not data:
                raise DataLoss(f"blob {digest} ended at {offset} of its {reader.size} bytes")
            offset += len(data)
            yield data
    finally:
        await reader.close()
