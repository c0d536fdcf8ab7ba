"""berth's error classes, after containerd's errdefs.

Every error berth raises on purpose is a :class:`BerthError`. Each subclass carries a stable
``code``, the string that travels on the wire (``{"code": ..., "message": ...}``), so a client
raises the same class the daemon raised::

    BerthError
    ├── Unknown              unknown
    ├── InvalidArgument      invalid_argument
    ├── NotFound             not_found
    ├── AlreadyExists        already_exists
    ├── PermissionDenied     permission_denied
    ├── ResourceExhausted    resource_exhausted
    ├── FailedPrecondition   failed_precondition
    ├── Conflict             conflict
    ├── Aborted              aborted
    ├── OutOfRange           out_of_range
    ├── Unimplemented        not_implemented
    ├── Internal             internal
    ├── Unavailable          unavailable
    ├── DataLoss             data_loss
    ├── Unauthenticated      unauthenticated
    ├── Canceled             canceled
    └── DeadlineExceeded     deadline_exceeded

This module imports nothing but the standard library: the client loads it on its fast path.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs every CLI call and runtime ~5 ms
if TYPE_CHECKING:
    from typing import Any, ClassVar

__all__ = [
    "Aborted",
    "AlreadyExists",
    "BerthError",
    "Canceled",
    "Conflict",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_from_wire",
    "error_to_wire",
]


class BerthError(Exception):
    """The root of every error berth raises on purpose.

    ``code`` is the errdefs code that names the class on the wire; ``message`` is the text a
    person reads, and it says what was wrong (which key, which digest, which plugin).
    """

    code: ClassVar[str] = "unknown"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Unknown(BerthError):
    """An error whose class could not be told (also: an unrecognised code from the wire)."""

    code = "unknown"


class InvalidArgument(BerthError):
    """The caller passed something malformed: a bad name, a wrong type, a bad config value."""

    code = "invalid_argument"


class NotFound(BerthError):
    """The object named does not exist."""

    code = "not_found"


class AlreadyExists(BerthError):
    """The object being created exists already."""

    code = "already_exists"


class PermissionDenied(BerthError):
    """The caller may not do this (for example, a connection from a uid the daemon refuses)."""

    code = "permission_denied"


class ResourceExhausted(BerthError):
    """A limit was hit: a message too large, too many requests, a full queue, a full disk."""

    code = "resource_exhausted"


class FailedPrecondition(BerthError):
    """The system is not in a state that allows this (a namespace that is not empty, a digest mismatch)."""

    code = "failed_precondition"


class Conflict(BerthError):
    """The operation conflicts with the current state of the object."""

    code = "conflict"


class Aborted(BerthError):
    """The operation was aborted, usually by a concurrent one; retrying may succeed."""

    code = "aborted"


class OutOfRange(BerthError):
    """An offset or size lies outside the object."""

    code = "out_of_range"


class Unimplemented(BerthError):
    """The operation, method or feature is not implemented (containerd's ``ErrNotImplemented``)."""

    code = "not_implemented"


class Internal(BerthError):
    """A bug or broken invariant inside berth. The message says where."""

    code = "internal"


class Unavailable(BerthError):
    """The resource is busy or the daemon cannot be reached; retrying later may succeed."""

    code = "unavailable"


class DataLoss(BerthError):
    """Data was lost or corrupted beyond repair."""

    code = "data_loss"


class Unauthenticated(BerthError):
    """Credentials were missing or wrong (registries)."""

    code = "unauthenticated"


class Canceled(BerthError):
    """The operation was cancelled by its caller."""

    code = "canceled"


class DeadlineExceeded(BerthError):
    """The caller's deadline passed before the operation finished."""

    code = "deadline_exceeded"


_BY_CODE: dict[str, type[BerthError]] = {
    cls.code: cls
    for cls in (
        Unknown, InvalidArgument, NotFound, AlreadyExists, PermissionDenied, ResourceExhausted,
        FailedPrecondition, Conflict, Aborted, OutOfRange, Unimplemented, Internal, Unavailable,
        DataLoss, Unauthenticated, Canceled, DeadlineExceeded,
    )
}


def error_to_wire(exc: BerthError) -> dict[str, str]:
    """Return the wire form ``{"code", "message"}`` of a berth error."""
    return {"code": exc.code, "message": exc.message}


def error_from_wire(payload: Any) -> BerthError:
    """Turn a wire error back into the matching exception instance.

    An unrecognised code becomes :class:`Unknown` keeping the code in its message; a payload that is
    not a map becomes :class:`Unknown` too, so a bad peer can never crash the caller.
    """
    if not isinstance(payload, dict):
        return Unknown(f"malformed error from peer: {payload!r}")
    code = payload.get("code")
    message = payload.get("message")
    if not isinstance(message, str):
        message = repr(message)
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        return Unknown(f"{code}: {message}")
    return cls(message)
