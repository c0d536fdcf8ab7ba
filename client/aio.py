"""The trio client for berthd: many concurrent calls over one connection.

::

    from berth.client.aio import open_client

    async with open_client() as client:            # $BERTH_ADDRESS or /run/berth/berth.sock
        print(await client.version())
        async with client.stream("events.subscribe", {"filters": []}) as events:
            async for envelope in events:
                ...

A call's deadline is the caller's: the effective trio deadline at the call (``trio.fail_after``
around it) is sent to the daemon, and cancelling a call sends ``$cancel``. Daemon errors are raised as
the matching :mod:`berth.core.errdefs` class. Stream items are buffered per stream
(``stream_buffer``); a consumer that stops reading blocks the connection's other calls once its
buffer is full, so read streams promptly or give them their own client.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from berth.client.sync import default_address, default_namespace
from berth.core.errdefs import BerthError, Unavailable, error_from_wire
from berth.core.rpc.protocol import (
    CANCEL,
    DEFAULT_MAX_MESSAGE_SIZE,
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

__all__ = ["AsyncClient", "open_client"]

_Item = tuple[bool, Any]  # (final, value): stream items then the response
_Failure = BerthError


class AsyncClient:
    """A connection to berthd shared by any number of concurrent calls; make it with :func:`open_client`."""

    def __init__(self, stream: trio.SocketStream, *, namespace: str, address: str,
                 max_message_size: int, stream_buffer: int) -> None:
        self.namespace = namespace
        self.address = address
        self._stream = stream
        self._max_message_size = max_message_size
        self._stream_buffer = stream_buffer
        self._ids = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel[_Item | _Failure]] = {}
        self._send_lock = trio.Lock()
        self._broken: BerthError | None = None

    async def _send(self, message: Any) -> None:
        data = pack(message)
        try:
            async with self._send_lock:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            raise Unavailable(f"connection to berthd at {self.address} lost: {err}") from None

    async def _read_loop(self) -> None:
        unpacker = new_unpacker(self._max_message_size)
        failure: BerthError = Unavailable(f"berthd at {self.address} closed the connection")
        try:
            while True:
                data = await self._stream.receive_some(256 * 1024)
                if not data:
                    break
                unpacker.feed(data)
                for message in unpacker:
                    error = await self._dispatch(message)
                    if error is not None:
                        failure = error
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            failure = Unavailable(f"connection to berthd at {self.address} lost: {err}")
        finally:
            self._broken = failure
            for channel in self._pending.values():
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                    channel.send_nowait(failure)  # a full stream buffer sees the end as closure
                channel.close()
            self._pending.clear()

    async def _dispatch(self, message: Any) -> BerthError | None:
        if not isinstance(message, list) or not message:
            return None
        if message[0] == RESPONSE and len(message) == 4:
            channel = self._pending.pop(message[1], None) if isinstance(message[1], int) else None
            if channel is not None:
                item: _Item | _Failure = (error_from_wire(message[2]) if message[2] is not None
                                          else (True, message[3]))
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await channel.send(item)
                channel.close()
        elif message[0] == NOTIFICATION and len(message) == 3 and isinstance(message[2], list):
            _, method, params = message
            if method == STREAM and len(params) == 2:
                channel = self._pending.get(params[0]) if isinstance(params[0], int) else None
                if channel is not None:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await channel.send((False, params[1]))
            elif method == ERROR and params:
                return error_from_wire(params[0])
        return None

    async def _start(self, method: str, args: dict[str, Any] | None, namespace: str | None,
                     lease: str | None, buffer: int) -> tuple[int, trio.MemoryReceiveChannel[_Item | _Failure]]:
        if self._broken is not None:
            raise type(self._broken)(self._broken.message)
        msgid = next(self._ids) & MAX_MSGID
        deadline = trio.current_effective_deadline()
        absolute = None if math.isinf(deadline) else time.time() + (deadline - trio.current_time())
        send, receive = trio.open_memory_channel[_Item | _Failure](buffer)
        self._pending[msgid] = send
        meta = CallMeta(namespace or self.namespace, lease, absolute)
        try:
            await self._send([REQUEST, msgid, method, [meta.to_wire(), args or {}]])
        except BaseException:
            self._pending.pop(msgid, None)
            raise
        return msgid, receive

    async def _cancel(self, msgid: int) -> None:
        if self._pending.pop(msgid, None) is None or self._broken is not None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(Unavailable):
            await self._send([NOTIFICATION, CANCEL, [msgid]])

    async def call(self, method: str, args: dict[str, Any] | None = None, *, namespace: str | None = None,
                   lease: str | None = None) -> Any:
        """Call ``method`` and return its result; stream items, if any, are discarded.

        Raises:
            BerthError: the daemon's error as its class; Unavailable if the connection is gone.
        """
        msgid, receive = await self._start(method, args, namespace, lease, 1)
        done = False
        try:
            async for item in receive:
                if isinstance(item, BerthError):
                    done = True
                    raise item
                final, value = item
                if final:
                    done = True
                    return value
            done = True
            raise self._broken or Unavailable(f"berthd at {self.address} closed the connection")
        finally:
            if not done:
                await self._cancel(msgid)

    @asynccontextmanager
    async def stream(self, method: str, args: dict[str, Any] | None = None, *, namespace: str | None = None,
                     lease: str | None = None) -> AsyncIterator[AsyncIterator[Any]]:
        """Call a streaming method; iterate the yielded object for its items.

        Leaving the block before the stream ends cancels the call. Iteration ends when the daemon
        ends the stream, and raises the call's error if it ended with one.
        """
        msgid, receive = await self._start(method, args, namespace, lease, self._stream_buffer)
        finished = False

        async def items() -> AsyncIterator[Any]:
            nonlocal finished
            async for item in receive:
                if isinstance(item, BerthError):
                    finished = True
                    raise item
                final, value = item
                if final:
                    finished = True
                    return
                yield value

        try:
            yield items()
        finally:
            if not finished:
                await self._cancel(msgid)
            receive.close()

    # ------------------------------------------------------------------ typed calls

    async def version(self) -> dict[str, Any]:
        return await self.call("version.get")  # type: ignore[no-any-return]

    async def server(self) -> dict[str, Any]:
        return await self.call("introspection.server")  # type: ignore[no-any-return]

    async def plugins(self, filters: list[str] | None = None) -> list[dict[str, Any]]:
        result = await self.call("introspection.plugins", {"filters": filters or []})
        return result["plugins"]  # type: ignore[no-any-return]

    async def publish(self, topic: str, event: dict[str, Any] | None = None, *,
                      namespace: str | None = None) -> None:
        await self.call("events.publish", {"topic": topic, "event": event or {}}, namespace=namespace)

    # ------------------------------------------------------------------ images (as the sync client's)

    async def images_get(self, name: str) -> dict[str, Any]:
        return (await self.call("images.get", {"name": name}))["image"]  # type: ignore[no-any-return]

    async def images_list(self, filters: list[str] | None = None) -> list[dict[str, Any]]:
        return (await self.call("images.list", {"filters": filters or []}))["images"]  # type: ignore[no-any-return]

    async def images_create(self, name: str, target: dict[str, Any], labels: dict[str, str] | None = None, *,
                            lease: str | None = None) -> dict[str, Any]:
        args = {"name": name, "target": target, "labels": labels or {}}
        return (await self.call("images.create", args, lease=lease))["image"]  # type: ignore[no-any-return]

    async def images_update(self, name: str, *, labels: dict[str, str] | None = None,
                            target: dict[str, Any] | None = None,
                            update_mask: list[str] | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"name": name, "labels": labels or {}, "update_mask": update_mask or []}
        if target is not None:
            args["target"] = target
        return (await self.call("images.update", args))["image"]  # type: ignore[no-any-return]

    async def images_delete(self, name: str, *, sync: bool = False, target: str = "") -> None:
        await self.call("images.delete", {"name": name, "sync": sync, "target": target})

    # ------------------------------------------------------------------ containers (as the sync client's)

    async def containers_get(self, container_id: str, *, namespace: str | None = None) -> dict[str, Any]:
        result = await self.call("containers.get", {"id": container_id}, namespace=namespace)
        return result["container"]  # type: ignore[no-any-return]

    async def containers_list(self, filters: list[str] | None = None, *,
                              namespace: str | None = None) -> list[dict[str, Any]]:
        result = await self.call("containers.list", {"filters": filters or []}, namespace=namespace)
        return result["containers"]  # type: ignore[no-any-return]

    async def containers_create(self, container: dict[str, Any], *,
                                namespace: str | None = None) -> dict[str, Any]:
        result = await self.call("containers.create", {"container": container}, namespace=namespace)
        return result["container"]  # type: ignore[no-any-return]

    async def containers_update(self, container: dict[str, Any], update_mask: list[str] | None = None, *,
                                namespace: str | None = None) -> dict[str, Any]:
        args = {"container": container, "update_mask": update_mask or []}
        return (await self.call("containers.update", args, namespace=namespace))["container"]  # type: ignore[no-any-return]

    async def containers_delete(self, container_id: str, *, snapshot_cleanup: bool = False,
                                namespace: str | None = None) -> None:
        await self.call("containers.delete", {"id": container_id, "snapshot_cleanup": snapshot_cleanup},
                        namespace=namespace)


@asynccontextmanager
async def open_client(
    address: str | None = None,
    *,
    namespace: str | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    stream_buffer: int = 256,
) -> AsyncIterator[AsyncClient]:
    """Connect to berthd and yield a client; the connection closes when the block exits.

    Raises:
        Unavailable: the daemon cannot be reached (the message names the socket).
    """
    address = address or default_address()
    try:
        stream = await trio.open_unix_socket(address)
    except OSError as err:
        raise Unavailable(f"cannot connect to berthd at {address}: {err.strerror or err} "
                          f"(is berthd running? set BERTH_ADDRESS)") from None
    async with stream, trio.open_nursery() as nursery:
        client = AsyncClient(stream, namespace=namespace or default_namespace(), address=address,
                             max_message_size=max_message_size, stream_buffer=stream_buffer)
        nursery.start_soon(client._read_loop)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
