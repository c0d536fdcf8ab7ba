"""The msgpack-RPC wire format berth speaks, shared by the server and every client.

A connection carries a stream of msgpack arrays, back to back, with no other framing:

* request ``[0, msgid, method, [meta, args]]``
* response ``[1, msgid, error, result]`` where exactly one of ``error``/``result`` is nil
* notification ``[2, method, params]``

Server streams are notifications ``[2, "$stream", [msgid, item]]`` sent before the response that
ends them. A client cancels a request with ``[2, "$cancel", [msgid]]``. A frame that cannot be
answered with a response (no usable msgid) is answered with ``[2, "$error", [error]]``.

This module imports only msgpack and the standard library (the CLI loads it on its fast path).
"""

from __future__ import annotations

import reprlib  # a client's value may nest 1000 deep: plain repr() would overflow the stack
from typing import TYPE_CHECKING

import msgpack

from berth.core.errdefs import InvalidArgument

if TYPE_CHECKING:
    from typing import Any

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2

STREAM = "$stream"
CANCEL = "$cancel"
ERROR = "$error"

MAX_MSGID = 2**32 - 1
DEFAULT_NAMESPACE = "default"
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

__all__ = [
    "CANCEL",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_NAMESPACE",
    "ERROR",
    "MAX_MSGID",
    "NOTIFICATION",
    "REQUEST",
    "RESPONSE",
    "STREAM",
    "CallMeta",
    "CancelFrame",
    "FrameError",
    "RequestFrame",
    "new_unpacker",
    "pack",
    "parse_client_frame",
]


def pack(obj: Any) -> bytes:
    """Encode one message (str as msgpack str, bytes as msgpack bin)."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def new_unpacker(max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> msgpack.Unpacker:
    """A streaming decoder that refuses any message larger than ``max_message_size`` bytes.

    Feeding it more than ``max_message_size`` buffered bytes raises ``msgpack.BufferFull``; map
    keys must be str or bytes.
    """
    return msgpack.Unpacker(raw=False, max_buffer_size=max_message_size, strict_map_key=True)


class CallMeta:
    """Per-call metadata: the namespace, an optional lease, an optional absolute deadline.

    ``deadline`` is a UNIX time in seconds (client and daemon share a clock: the socket is local).
    (Plain classes here, not dataclasses: this module is on the CLI's start-up path.)
    """

    __slots__ = ("deadline", "lease", "namespace")

    def __init__(self, namespace: str = DEFAULT_NAMESPACE, lease: str | None = None,
                 deadline: float | None = None) -> None:
        self.namespace = namespace
        self.lease = lease
        self.deadline = deadline

    def __repr__(self) -> str:
        return f"CallMeta(namespace={self.namespace!r}, lease={self.lease!r}, deadline={self.deadline!r})"

    def to_wire(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"namespace": self.namespace}
        if self.lease is not None:
            meta["lease"] = self.lease
        if self.deadline is not None:
            meta["deadline"] = self.deadline
        return meta


class RequestFrame:
    __slots__ = ("args", "meta", "method", "msgid")

    def __init__(self, msgid: int, method: str, meta: CallMeta, args: dict[str, Any]) -> None:
        self.msgid = msgid
        self.method = method
        self.meta = meta
        self.args = args


class CancelFrame:
    __slots__ = ("msgid",)

    def __init__(self, msgid: int) -> None:
        self.msgid = msgid


class FrameError(InvalidArgument):
    """A frame that is valid msgpack but not a valid berth request.

    ``msgid`` is set when the frame had a usable one, so the error can go back as that request's
    response; otherwise it goes back as a ``$error`` notification.
    """

    def __init__(self, message: str, msgid: int | None = None) -> None:
        super().__init__(message)
        self.msgid = msgid


def _valid_msgid(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_MSGID


def _parse_meta(raw: Any, msgid: int) -> CallMeta:
    if not isinstance(raw, dict):
        raise FrameError(f"meta must be a map, got {type(raw).__name__}", msgid)
    namespace = raw.get("namespace", DEFAULT_NAMESPACE)
    if not isinstance(namespace, str):
        raise FrameError(f"meta.namespace must be a string, got {type(namespace).__name__}", msgid)
    lease = raw.get("lease")
    if lease is not None and not isinstance(lease, str):
        raise FrameError(f"meta.lease must be a string, got {type(lease).__name__}", msgid)
    deadline = raw.get("deadline")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, int | float)):
        raise FrameError(f"meta.deadline must be a number, got {type(deadline).__name__}", msgid)
    if deadline is not None and deadline != deadline:  # NaN is no point in time (trio refuses it)
        raise FrameError("meta.deadline must be a number, got NaN", msgid)
    return CallMeta(namespace=namespace, lease=lease, deadline=None if deadline is None else float(deadline))


def parse_client_frame(frame: Any) -> RequestFrame | CancelFrame:
    """Validate one decoded frame sent by a client.

    Raises:
        FrameError: the frame is not a request ``[0, msgid, method, [meta, args]]`` or a cancel
            notification; ``msgid`` is set on the error when the frame had a usable one.
    """
    if not isinstance(frame, list) or not frame:
        what = "an empty array" if isinstance(frame, list) else type(frame).__name__
        raise FrameError(f"a frame must be a non-empty msgpack array, got {what}")
    kind = frame[0]
    if kind == REQUEST and type(kind) is int:
        if len(frame) != 4:
            raise FrameError(f"a request has 4 elements, got {len(frame)}")
        _, msgid, method, params = frame
        if not _valid_msgid(msgid):
            raise FrameError(f"msgid must be an integer in [0, 2^32), got {reprlib.repr(msgid):.40}")
        if not isinstance(method, str) or not method:
            raise FrameError("method must be a non-empty string", msgid)
        if not isinstance(params, list) or len(params) != 2:
            raise FrameError("params must be an array [meta, args]", msgid)
        meta = _parse_meta(params[0], msgid)
        args = params[1]
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise FrameError(f"args must be a map, got {type(args).__name__}", msgid)
        return RequestFrame(msgid, method, meta, args)
    if kind == NOTIFICATION and type(kind) is int:
        if len(frame) != 3:
            raise FrameError(f"a notification has 3 elements, got {len(frame)}")
        _, method, params = frame
        if method == CANCEL:
            if not isinstance(params, list) or len(params) != 1 or not _valid_msgid(params[0]):
                raise FrameError("$cancel takes [msgid]")
            return CancelFrame(params[0])
        raise FrameError(f"unknown notification {reprlib.repr(method):.60}")
    raise FrameError(f"a frame must start with 0 (request) or 2 (notification), got {reprlib.repr(kind):.40}")

