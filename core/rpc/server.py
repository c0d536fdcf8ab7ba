"""The msgpack-RPC server: one unix socket, many connections, many requests per connection.

Per connection, a reader task decodes frames and starts one task per request, up to
``max_concurrent_requests``; past that it stops reading, so a client that floods the socket is slowed
by the kernel's socket buffer rather than by the daemon's memory (back-pressure). Responses and stream
items go out through one writer lock per connection; a client that stops reading blocks only its own
requests. A bad frame is answered to that client and to nobody else:

* valid msgpack that is not a valid request: an error response (or a ``$error`` notification when the
  frame has no usable msgid); the connection stays open;
* bytes that are not msgpack, or a message over ``max_message_size``: a ``$error`` notification,
  then the connection is closed (the stream cannot be resynchronised).

When a client disconnects, its in-flight requests are cancelled.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgpack
import structlog
import trio

from berth.core.errdefs import (
    AlreadyExists,
    BerthError,
    Canceled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    error_to_wire,
)
from berth.core.namespaces import with_lease, with_namespace
from berth.core.rpc.protocol import (
    ERROR,
    NOTIFICATION,
    RESPONSE,
    STREAM,
    CallMeta,
    CancelFrame,
    FrameError,
    new_unpacker,
    pack,
    parse_client_frame,
)

__all__ = [
    "Call",
    "Handler",
    "PeerCredentials",
    "RPCServer",
    "RPCService",
    "check_socket_free",
    "current_call",
    "inline",
    "serve_unix",
    "streaming",
]

log = structlog.get_logger("berth.rpc")

#: ``async def handler(call, args) -> result`` (a bound method counts: it is called the same way).
Handler = Callable[..., Awaitable[Any]]
H = TypeVar("H", bound=Handler)

#: The call being served by the current task (set for the handler's whole run).
current_call: contextvars.ContextVar[Call] = contextvars.ContextVar("berth_current_call")

_RECEIVE_SIZE = 256 * 1024
#: How long a message cut short by cancellation may take to finish going out (see ``_Connection.send``).
_SEND_GRACE = 5.0


def first_berth_error(err: BaseException) -> BerthError | None:
    """The error a caller should see when a handler's nurseries wrapped berth errors in exception groups:
    the first :class:`BerthError` of a group whose every leaf is one (several tasks failing for the same
    cause, say), else ``None`` (a bug: reported as Internal)."""
    if isinstance(err, BerthError):
        return err
    if not isinstance(err, BaseExceptionGroup):
        return None
    leaves = [first_berth_error(inner) for inner in err.exceptions]
    if not leaves or any(leaf is None for leaf in leaves):
        return None
    return leaves[0]


def streaming(handler: H) -> H:
    """Mark a handler as a server stream (it sends items with :meth:`Call.send` until it returns).

    A graceful shutdown waits for ordinary requests to finish but cancels streams at once.
    """
    handler.berth_streaming = True  # type: ignore[attr-defined]
    return handler


def is_streaming(handler: Handler) -> bool:
    return getattr(handler, "berth_streaming", False) is True


def inline(handler: H) -> H:
    """Mark a handler as one that answers from memory without waiting on anything.

    An inline handler runs in its connection's reader task instead of a task of its own, which
    saves a task spawn per call; while it runs, that connection's next frames wait. Use it only for
    handlers that never block (no I/O, no threads, no locks that may be held).
    """
    handler.berth_inline = True  # type: ignore[attr-defined]
    return handler


def is_inline(handler: Handler | None) -> bool:
    return getattr(handler, "berth_inline", False) is True


class RPCService(Protocol):
    """What an ``io.berth.rpc.v1`` plugin's ``init`` returns: methods by full name (``images.list``)."""

    def rpc_methods(self) -> Mapping[str, Handler]: ...


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The connecting process as the kernel reports it (``SO_PEERCRED``); ``-1`` when unknown."""

    pid: int = -1
    uid: int = -1
    gid: int = -1

    @classmethod
    def of(cls, sock: socket.socket) -> PeerCredentials:
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", data)
        return cls(pid, uid, gid)


@dataclass(eq=False, slots=True)
class Call:
    """One request being served: its metadata, its caller, and a way to stream items back."""

    method: str
    msgid: int
    meta: CallMeta
    peer: PeerCredentials
    _connection: _Connection

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    async def send(self, item: Any) -> None:
        """Stream one item to the caller ahead of the response. Blocks while the caller is not reading.

        Raises:
            trio.BrokenResourceError: the caller has gone (the request is being cancelled).
        """
        await self._connection.send([NOTIFICATION, STREAM, [self.msgid, item]])

    @property
    def session(self) -> dict[str, Any]:
        """State that lives as long as the caller's connection (shared by all its calls)."""
        return self._connection.session

    def on_disconnect(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        """Run ``cleanup`` when the caller's connection ends (shielded, at most 10 s each)."""
        self._connection.cleanups.append(cleanup)


@dataclass(eq=False)
class _Connection:
    """One client connection.

    On a real socket, sends and receives first try the non-blocking system call directly and only
    go through trio's stream (which parks the task until the socket is ready) when it would block:
    a request/response round trip then costs two scheduler passes fewer.
    """

    stream: trio.abc.Stream
    peer: PeerCredentials
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    in_flight: dict[int, trio.CancelScope] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)
    raw: socket.socket | None = None
    session: dict[str, Any] = field(default_factory=dict)
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stream, trio.SocketStream):
            self.raw = socket.socket(fileno=self.stream.socket.fileno())
            self.raw.setblocking(False)

    def detach(self) -> None:
        if self.raw is not None:
            self.raw.detach()  # the fd belongs to the trio stream, which closes it
            self.raw = None

    async def send(self, message: Any) -> None:
        data = pack(message)
        if self.raw is None:
            async with self.send_lock:
                await self.stream.send_all(data)
            return
        if self.send_lock.locked():
            await self.send_lock.acquire()  # cancellable: none of this message has gone out
        else:
            self.send_lock.acquire_nowait()
        try:
            view = memoryview(data)[self._send_some(data):]
            while view:
                try:
                    await trio.lowlevel.wait_writable(self.raw)
                except trio.Cancelled:
                    if len(view) < len(data):
                        await self._finish(view)
                    raise
                view = view[self._send_some(view):]
        finally:
            self.send_lock.release()

    def _send_some(self, data: bytes | memoryview) -> int:
        assert self.raw is not None
        try:
            return self.raw.send(data)
        except BlockingIOError:
            return 0
        except OSError as err:
            raise trio.BrokenResourceError(str(err)) from err

    async def _finish(self, view: memoryview) -> None:
        """Send the rest of a message cut short by cancellation: the peer could not find the next
        message in a stream that ends half-way through one. A peer that does not take it within
        :data:`_SEND_GRACE` seconds is disconnected."""
        assert self.raw is not None
        with trio.move_on_after(_SEND_GRACE) as grace:
            grace.shield = True
            while view:
                await trio.lowlevel.wait_writable(self.raw)
                view = view[self._send_some(view):]
        if view:
            with contextlib.suppress(OSError):
                self.raw.shutdown(socket.SHUT_RDWR)

    async def receive(self) -> bytes | bytearray:
        if self.raw is not None:
            waited = False
            while True:
                try:
                    data = self.raw.recv(_RECEIVE_SIZE)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.raw)
                    waited = True
                    continue
                except OSError as err:
                    raise trio.BrokenResourceError(str(err)) from err
                if not waited:
                    # Data was already there: yield once so one busy connection cannot starve the
                    # others (inline calls never reach a checkpoint of their own).
                    await trio.lowlevel.checkpoint()
                return data
        return await self.stream.receive_some(_RECEIVE_SIZE)


class RPCServer:
    """Dispatches requests to handlers; serve any number of connections with :meth:`serve_connection`.

    Args:
        methods: handlers by full method name.
        max_message_size: the largest message accepted, in bytes.
        max_concurrent_requests: requests in flight per connection before reading pauses.
        authorize: decides whether a peer may talk to the daemon; a refused peer gets
            ``permission_denied`` and is disconnected.
    """

    def __init__(
        self,
        methods: Mapping[str, Handler],
        *,
        max_message_size: int,
        max_concurrent_requests: int = 128,
        authorize: Callable[[PeerCredentials], bool] = lambda _: True,
    ) -> None:
        self.methods = dict(methods)
        self.max_message_size = max_message_size
        self.max_concurrent_requests = max_concurrent_requests
        self.authorize = authorize
        self.connections = 0
        #: Requests being served that are not streams (a graceful shutdown waits for these).
        self.active_requests = 0
        self._idle = trio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no request other than streams is being served."""
        while not self._idle.is_set():
            await self._idle.wait()

    @classmethod
    def from_services(cls, services: Iterable[RPCService], **kwargs: Any) -> RPCServer:
        """Build a server from services; two services offering one method name is an error.

        Raises:
            AlreadyExists: naming the method offered twice.
        """
        methods: dict[str, Handler] = {}
        for service in services:
            for name, handler in service.rpc_methods().items():
                if name in methods:
                    raise AlreadyExists(f"RPC method {name} is offered by two services")
                methods[name] = handler
        return cls(methods, **kwargs)

    async def serve_connection(self, stream: trio.abc.Stream, peer: PeerCredentials | None = None) -> None:
        """Serve one connection until the peer closes it or sends bytes that cannot be decoded.

        Cancelling this cancels every request of the connection. Always closes ``stream``.
        """
        connection = _Connection(stream, peer or PeerCredentials())
        self.connections += 1
        try:
            async with stream:
                if not self.authorize(connection.peer):
                    await _send_quietly(connection, [NOTIFICATION, ERROR, [error_to_wire(PermissionDenied(
                        f"uid {connection.peer.uid} may not use this socket"))]])
                    log.warning("rpc_peer_refused", pid=connection.peer.pid, uid=connection.peer.uid)
                    return
                try:
                    async with trio.open_nursery() as nursery:
                        await self._read_loop(connection, nursery)
                        nursery.cancel_scope.cancel()
                except Exception:  # a bug must cost this connection, not the daemon and every other client
                    log.exception("rpc_connection_failed", pid=connection.peer.pid)
        finally:
            connection.detach()
            self.connections -= 1
            await _run_cleanups(connection)

    async def _read_loop(self, connection: _Connection, nursery: trio.Nursery) -> None:
        unpacker = new_unpacker(self.max_message_size)
        slots = trio.Semaphore(self.max_concurrent_requests)
        fed = 0  # bytes fed to the unpacker
        boundary = 0  # where the message being decoded starts: it has fed - boundary bytes so far
        pending: bytes | bytearray = b""
        while True:
            if not pending:
                try:
                    pending = await connection.receive()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not pending:
                    return
            # Feed only what the message being decoded may still take: the limit holds for the whole
            # message (not only its undecoded rest), and a message up to the limit passes even when
            # the start of the next one came in the same read.
            room = self.max_message_size - (fed - boundary)
            data, pending = pending[:room], pending[room:]
            try:
                if not data:
                    raise msgpack.BufferFull
                unpacker.feed(data)
                fed += len(data)
            except msgpack.BufferFull:
                await self._fatal(connection, ResourceExhausted(
                    f"message larger than max_message_size ({self.max_message_size} bytes)"))
                return
            while True:
                try:
                    frame = unpacker.unpack()
                except msgpack.OutOfData:
                    break
                except Exception as err:  # msgpack raises several unrelated types on bad bytes
                    reason = str(err) or type(err).__name__
                    await self._fatal(connection, InvalidArgument(f"malformed msgpack: {reason}"))
                    return
                boundary = unpacker.tell()
                try:
                    parsed = parse_client_frame(frame)
                except FrameError as err:
                    await self._reply_error(connection, err.msgid, err)
                    continue
                if isinstance(parsed, CancelFrame):
                    scope = connection.in_flight.get(parsed.msgid)
                    if scope is not None:
                        connection.cancelled.add(parsed.msgid)
                        scope.cancel()
                    continue
                if parsed.msgid in connection.in_flight:
                    await self._reply_error(connection, None, InvalidArgument(
                        f"msgid {parsed.msgid} is already in flight on this connection"))
                    continue
                try:
                    slots.acquire_nowait()
                except trio.WouldBlock:
                    await slots.acquire()  # back-pressure: stop reading until a request finishes
                scope = trio.CancelScope()
                if parsed.meta.deadline is not None:
                    scope.deadline = trio.current_time() + (parsed.meta.deadline - time.time())
                connection.in_flight[parsed.msgid] = scope
                call = Call(parsed.method, parsed.msgid, parsed.meta, connection.peer, connection)
                if is_inline(self.methods.get(parsed.method)):
                    await self._run_call(connection, call, parsed.args, scope, slots)
                else:
                    nursery.start_soon(self._run_call, connection, call, parsed.args, scope, slots)

    async def _run_call(self, connection: _Connection, call: Call, args: dict[str, Any],
                        scope: trio.CancelScope, slots: trio.Semaphore) -> None:
        error: BerthError | None = None
        result: Any = None
        handler = self.methods.get(call.method)
        counted = handler is not None and not is_streaming(handler)
        if counted:
            if not self.active_requests:
                self._idle = trio.Event()
            self.active_requests += 1
        try:
            with scope:
                if handler is None:
                    raise Unimplemented(f"unknown method {call.method!r}")
                if scope.deadline <= trio.current_time():
                    raise DeadlineExceeded(f"{call.method}: the deadline passed before the call started")
                token = current_call.set(call)
                try:
                    with with_namespace(call.meta.namespace), with_lease(call.meta.lease):
                        result = await handler(call, args)
                finally:
                    current_call.reset(token)
            if scope.cancelled_caught:
                if call.msgid in connection.cancelled:
                    error = Canceled(f"{call.method} was cancelled by the client")
                else:
                    error = DeadlineExceeded(f"{call.method} did not finish before the deadline")
        except BerthError as err:
            error = err
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the peer has gone while we streamed to it
        except Exception as err:
            error = first_berth_error(err)
            if error is None:
                log.exception("rpc_handler_failed", method=call.method)
                error = Internal(f"{call.method} failed: {type(err).__name__}: {err}")
        finally:
            if counted:
                self.active_requests -= 1
                if not self.active_requests:
                    self._idle.set()
            connection.in_flight.pop(call.msgid, None)
            connection.cancelled.discard(call.msgid)
            slots.release()
        if error is None:
            message = [RESPONSE, call.msgid, None, result]
        else:
            message = [RESPONSE, call.msgid, error_to_wire(error), None]
        try:
            await connection.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except (TypeError, ValueError, OverflowError) as err:  # a result msgpack cannot carry
            log.error("rpc_result_unencodable", method=call.method, error=str(err))
            await _send_quietly(connection, [RESPONSE, call.msgid, error_to_wire(
                Internal(f"{call.method} returned a result that cannot be encoded: {err}")), None])

    async def _reply_error(self, connection: _Connection, msgid: int | None, error: BerthError) -> None:
        if msgid is None:
            await _send_quietly(connection, [NOTIFICATION, ERROR, [error_to_wire(error)]])
        else:
            await _send_quietly(connection, [RESPONSE, msgid, error_to_wire(error), None])

    async def _fatal(self, connection: _Connection, error: BerthError) -> None:
        log.info("rpc_connection_dropped", reason=error.message, pid=connection.peer.pid)
        with trio.move_on_after(1):
            await _send_quietly(connection, [NOTIFICATION, ERROR, [error_to_wire(error)]])


async def _run_cleanups(connection: _Connection) -> None:
    with trio.CancelScope(shield=True):
        for cleanup in reversed(connection.cleanups):
            with trio.move_on_after(10):
                try:
                    await cleanup()
                except Exception:
                    log.exception("rpc_disconnect_cleanup_failed")


async def _send_quietly(connection: _Connection, message: Any) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await connection.send(message)


def _peer_in_group(peer: PeerCredentials, gid: int) -> bool:
    if peer.gid == gid:
        return True
    try:
        with open(f"/proc/{peer.pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return str(gid) in line.split()[1:]
    except OSError:
        return False
    return False


def socket_authorizer(gid: int) -> Callable[[PeerCredentials], bool]:
    """Allow root, berthd's own uid, and (when ``gid`` is not 0) members of group ``gid``."""
    own = os.geteuid()

    def authorize(peer: PeerCredentials) -> bool:
        if peer.uid in (0, own):
            return True
        return gid != 0 and _peer_in_group(peer, gid)

    return authorize


def _probe_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(str(path))
    except OSError:
        return False
    else:
        return True
    finally:
        probe.close()


def check_socket_free(path: Path) -> None:
    """Check that ``path`` is free for a new socket (absent, or a stale socket nobody listens on).

    Raises:
        Unavailable: another process is serving on ``path``.
        InvalidArgument: ``path`` exists and is not a socket.
    """
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise InvalidArgument(f"{path} exists and is not a socket")
        if _probe_live(path):
            raise Unavailable(f"another daemon is serving on {path}")


def bind_unix_socket(path: Path, *, gid: int) -> socket.socket:
    """Bind and listen on ``path`` with mode 0660 and group ``gid``, replacing a stale socket.

    The socket is bound under a temporary name, given its mode and owner, then renamed into place,
    so it never exists at ``path`` with looser permissions.

    Raises:
        Unavailable: another process is serving on ``path``.
        InvalidArgument: ``path`` exists and is not a socket.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    check_socket_free(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(temporary))
        os.chmod(temporary, 0o660)
        os.chown(temporary, -1, gid)
        sock.listen(1024)
        os.replace(temporary, path)
    except BaseException:
        sock.close()
        temporary.unlink(missing_ok=True)
        raise
    return sock


async def serve_unix(
    server: RPCServer,
    path: Path,
    *,
    gid: int = 0,
    stop: trio.Event | None = None,
    grace: float = 0.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on the unix socket ``path`` and serve every connection.

    Reports readiness through ``task_status`` once the socket accepts connections. Runs until
    cancelled, or until ``stop`` is set: then it stops accepting, removes the socket file, waits up
    to ``grace`` seconds for requests in flight (streams are not waited for) and returns, cancelling
    what is left.
    """
    sock = bind_unix_socket(path, gid=gid)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    try:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(_accept_loop, server, listener, connections)
                task_status.started()
                if stop is None:
                    await trio.sleep_forever()
                await stop.wait()
                accepting.cancel_scope.cancel()
            await listener.aclose()
            _remove_socket(path)
            with trio.move_on_after(grace):
                await server.wait_idle()
            connections.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        _remove_socket(path)


async def _accept_loop(server: RPCServer, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
    while True:
        stream = await listener.accept()
        try:
            peer = PeerCredentials.of(stream.socket)  # type: ignore[arg-type]
        except OSError:
            peer = PeerCredentials()
        nursery.start_soon(server.serve_connection, stream, peer)


def _remove_socket(path: Path) -> None:
    try:
        if path.is_socket():
            path.unlink()
    except OSError:
        pass
