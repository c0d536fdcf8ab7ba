"""A blocking msgpack-RPC client for berthd. Imports only the standard library, msgpack and core's
errors and wire protocol, so a CLI call starts fast.

::

    from berth.client.sync import Client

    with Client() as client:                 # $BERTH_ADDRESS or /run/berth/berth.sock
        print(client.version())
        for event in client.subscribe(['topic~="/namespaces/"']):
            print(event)

One client holds one connection and runs one call at a time (it is not thread-safe; use one client
per thread, or the trio client for concurrency). Errors from the daemon are raised as the matching
:mod:`berth.core.errdefs` class; a daemon that cannot be reached raises
:class:`~berth.core.errdefs.Unavailable` naming the socket.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from berth.core.errdefs import DeadlineExceeded, Unavailable, error_from_wire
from berth.core.rpc.protocol import (
    CANCEL,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_NAMESPACE,
    ERROR,
    MAX_MSGID,
    NOTIFICATION,
    REQUEST,
    RESPONSE,
    STREAM,
    CallMeta,
    new_unpacker,
    pack,
)

__all__ = ["DEFAULT_ADDRESS", "Client", "default_address", "default_namespace"]

DEFAULT_ADDRESS = "/run/berth/berth.sock"


def default_address() -> str:
    """``$BERTH_ADDRESS``, else ``/run/berth/berth.sock``."""
    return os.environ.get("BERTH_ADDRESS") or DEFAULT_ADDRESS


def default_namespace() -> str:
    """``$BERTH_NAMESPACE``, else ``default``."""
    return os.environ.get("BERTH_NAMESPACE") or DEFAULT_NAMESPACE


class Client:
    """A connection to berthd, opened on the first call.

    Args:
        address: the daemon's socket (default :func:`default_address`).
        namespace: the namespace calls run in unless a call names another (default
            :func:`default_namespace`).
        timeout: seconds each call may take (sent to the daemon as the call's deadline, and
            applied to the socket); ``None`` waits forever.
    """

    def __init__(self, address: str | None = None, *, namespace: str | None = None,
                 timeout: float | None = None, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.address = address or default_address()
        self.namespace = namespace or default_namespace()
        self.timeout = timeout
        self._max_message_size = max_message_size
        self._sock: socket.socket | None = None
        self._unpacker = new_unpacker(max_message_size)
        self._ids = itertools.count(1)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._unpacker = new_unpacker(self._max_message_size)

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.address)
            except OSError as err:
                sock.close()
                reason = err.strerror or str(err)
                raise Unavailable(f"cannot connect to berthd at {self.address}: {reason} "
                                  f"(is berthd running? set --address or BERTH_ADDRESS)") from None
            self._sock = sock
        return self._sock

    def _send(self, message: Any) -> None:
        sock = self._connect()
        try:
            sock.sendall(pack(message))
        except OSError as err:
            self.close()
            raise Unavailable(f"connection to berthd at {self.address} lost: {err}") from None

    def _receive(self) -> Any:
        assert self._sock is not None
        while True:
            for message in self._unpacker:
                return message
            try:
                data = self._sock.recv(256 * 1024)
            except TimeoutError:
                self.close()
                raise DeadlineExceeded(f"no answer from berthd at {self.address} in time") from None
            except OSError as err:
                self.close()
                raise Unavailable(f"connection to berthd at {self.address} lost: {err}") from None
            if not data:
                self.close()
                raise Unavailable(f"berthd at {self.address} closed the connection")
            self._unpacker.feed(data)

    def _start(self, method: str, args: dict[str, Any] | None, namespace: str | None,
               lease: str | None, timeout: float | None) -> int:
        msgid = next(self._ids) & MAX_MSGID
        timeout = self.timeout if timeout is None else timeout
        meta = CallMeta(namespace or self.namespace, lease,
                        None if timeout is None else time.time() + timeout)
        sock_timeout = None if timeout is None else timeout + 1.0
        sock = self._connect()
        if sock.gettimeout() != sock_timeout:
            sock.settimeout(sock_timeout)
        self._send([REQUEST, msgid, method, [meta.to_wire(), args or {}]])
        return msgid

    def _messages(self, msgid: int) -> Iterator[tuple[bool, Any]]:
        """Yield ``(False, item)`` for stream items, then ``(True, result)``; raise the call's error."""
        while True:
            message = self._receive()
            if not isinstance(message, list) or not message:
                continue
            if message[0] == RESPONSE and len(message) == 4 and message[1] == msgid:
                if message[2] is not None:
                    raise error_from_wire(message[2])
                yield True, message[3]
                return
            if message[0] == NOTIFICATION and len(message) == 3:
                _, method, params = message
                if method == STREAM and isinstance(params, list) and len(params) == 2 and params[0] == msgid:
                    yield False, params[1]
                elif method == ERROR and isinstance(params, list) and params:
                    self.close()
                    raise error_from_wire(params[0])

    def call(self, method: str, args: dict[str, Any] | None = None, *, namespace: str | None = None,
             lease: str | None = None, timeout: float | None = None) -> Any:
        """Call ``method`` with ``args`` and return its result.

        Raises:
            BerthError: the daemon's error, as its class; Unavailable when it cannot be reached.
        """
        msgid = self._start(method, args, namespace, lease, timeout)
        for final, value in self._messages(msgid):
            if final:
                return value
        raise AssertionError("unreachable")  # pragma: no cover

    def stream(self, method: str, args: dict[str, Any] | None = None, *, namespace: str | None = None,
               lease: str | None = None, timeout: float | None = None) -> Iterator[Any]:
        """Call a streaming method and yield its items until the daemon ends the stream.

        Closing the iterator early (``break``, or garbage collection) cancels the call.
        """
        msgid = self._start(method, args, namespace, lease, timeout)
        finished = False
        try:
            for final, value in self._messages(msgid):
                if final:
                    finished = True
                    return
                yield value
        finally:
            if not finished and self._sock is not None:
                self._cancel(msgid)

    def _cancel(self, msgid: int) -> None:
        try:
            self._send([NOTIFICATION, CANCEL, [msgid]])
            for _ in self._messages(msgid):
                pass
        except Exception:  # the call ends one way or another; a broken connection is closed
            self.close()

    # ------------------------------------------------------------------ typed calls

    def version(self) -> dict[str, Any]:
        """``{version, revision}`` of the daemon."""
        return self.call("version.get")  # type: ignore[no-any-return]

    def server(self) -> dict[str, Any]:
        """``{uuid, pid, started_at, uptime, version, revision}`` of the daemon."""
        return self.call("introspection.server")  # type: ignore[no-any-return]

    def plugins(self, filters: list[str] | None = None) -> list[dict[str, Any]]:
        """Every plugin with its type, id, status (ok/skip/error), error, exports and capabilities."""
        return self.call("introspection.plugins", {"filters": filters or []})["plugins"]  # type: ignore[no-any-return]

    def subscribe(self, filters: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Yield event envelopes ``{timestamp, namespace, topic, event[, dropped]}`` as they happen."""
        return self.stream("events.subscribe", {"filters": filters or []})

    def publish(self, topic: str, event: dict[str, Any] | None = None, *, namespace: str | None = None) -> None:
        self.call("events.publish", {"topic": topic, "event": event or {}}, namespace=namespace)

    def namespace_create(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        return self.call("namespaces.create", {"name": name, "labels": labels or {}})["namespace"]  # type: ignore[no-any-return]

    def namespace_get(self, name: str) -> dict[str, Any]:
        return self.call("namespaces.get", {"name": name})["namespace"]  # type: ignore[no-any-return]

    def namespace_list(self, filters: list[str] | None = None) -> list[dict[str, Any]]:
        return self.call("namespaces.list", {"filters": filters or []})["namespaces"]  # type: ignore[no-any-return]

    def namespace_update(self, name: str, labels: dict[str, str],
                         update_mask: list[str] | None = None) -> dict[str, Any]:
        args = {"name": name, "labels": labels, "update_mask": update_mask or []}
        return self.call("namespaces.update", args)["namespace"]  # type: ignore[no-any-return]

    def namespace_delete(self, name: str) -> None:
        self.call("namespaces.delete", {"name": name})
