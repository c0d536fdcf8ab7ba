"""A blocking msgpack-RPC client for berthd. Imports only the standard library, msgpack and core's
errors and wire protocol, so a CLI call starts fast.

::

    from berth.client.sync import Client

    with Client() as client:                 # $BERTH_ADDRESS or /run/berth/berth.sock
        print(client.version())
        for event in client.subscribe(['topic~="/namespaces/"']):
            print(event)

One client holds one connection and is not thread-safe (use one client per thread, or the trio
client for concurrency). Calls run one at a time, except that :meth:`Client.content_ingest` pipelines
its writes on the connection. Errors from the daemon are raised as the matching
:mod:`berth.core.errdefs` class; a daemon that cannot be reached raises
:class:`~berth.core.errdefs.Unavailable` naming the socket.

Content and lease methods take an optional ``lease=``: the call runs under that lease (it travels in
the call's meta), so what it creates joins the lease. Without one, a committed blob that is neither
labelled ``berth.io/gc.root`` nor referenced is removed at the next garbage collection.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from berth.core.errdefs import (
    AlreadyExists,
    BerthError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    error_from_wire,
)
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

__all__ = ["DEFAULT_ADDRESS", "DEFAULT_NAMESPACE", "Client", "default_address", "default_namespace"]

DEFAULT_ADDRESS = "/run/berth/berth.sock"
#: Most writes :meth:`Client.content_ingest` keeps in flight: their unread answers must fit in the
#: socket's buffer, and the daemon serves at most ``max_concurrent_requests`` (128) at once.
_MAX_WINDOW = 64


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
        #: Requests sent with :meth:`_send_request` whose response was not collected yet; the value is
        #: the response (``[error, result]``) once it arrived while another call was being read.
        self._pending: dict[int, list[Any] | None] = {}

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
        self._pending.clear()

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
                self._pending.pop(msgid, None)
                if message[2] is not None:
                    raise error_from_wire(message[2])
                yield True, message[3]
                return
            if message[0] == RESPONSE and len(message) == 4 and message[1] in self._pending:
                self._pending[message[1]] = [message[2], message[3]]  # a pipelined request's answer
                continue
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

        Closing the iterator early (``break``, or garbage collection) cancels the call. While a stream is
        open, make other calls on another :class:`Client`: this one reads its connection for one call at a
        time, and a stream's items that arrive during another call are not kept.
        """
        msgid = self._start(method, args, namespace, lease, timeout)
        finished = False
        try:
            for final, value in self._messages(msgid):
                if final:
                    finished = True
                    return
                yield value
        except BerthError:
            finished = True  # the daemon ended the call with an error (or the connection is gone)
            raise
        finally:
            if not finished and self._sock is not None:
                self._cancel(msgid)

    def _send_request(self, method: str, args: dict[str, Any] | None = None, *, namespace: str | None = None,
                      lease: str | None = None, timeout: float | None = None) -> int:
        """Send a unary request without waiting for it; return its msgid for :meth:`_collect`.

        Several requests may be in flight on the connection at once (pipelining); their responses are
        kept as they arrive until collected. Not for streaming methods (their items would be dropped).
        """
        msgid = self._start(method, args, namespace, lease, timeout)
        self._pending[msgid] = None
        return msgid

    def _collect(self, msgid: int) -> Any:
        """Wait for the response to a request sent with :meth:`_send_request`; return its result.

        Raises:
            BerthError: the request's error, as its class.
        """
        if msgid not in self._pending:
            raise KeyError(f"no request {msgid} in flight")
        answer = self._pending[msgid]
        if answer is None:
            for final, value in self._messages(msgid):
                if final:
                    return value
            raise AssertionError("unreachable")  # pragma: no cover
        del self._pending[msgid]
        if answer[0] is not None:
            raise error_from_wire(answer[0])
        return answer[1]

    def _cancel_pending(self, msgids: list[int]) -> None:
        """Cancel requests sent with :meth:`_send_request` and drain their responses."""
        try:
            for msgid in msgids:
                if msgid in self._pending and self._pending[msgid] is None:  # not answered yet
                    self._send([NOTIFICATION, CANCEL, [msgid]])
            for msgid in msgids:
                if msgid in self._pending:
                    with contextlib.suppress(BerthError):  # cancelled, or failed: either way it is over
                        self._collect(msgid)
        except Exception:  # a broken connection is closed; the daemon keeps the ingest's progress
            self.close()

    def _cancel(self, msgid: int) -> None:
        try:
            self._send([NOTIFICATION, CANCEL, [msgid]])
            for _ in self._messages(msgid):
                pass
        except BerthError:
            pass  # the call's end, normally `canceled` (a lost connection has been closed already)
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

    # ------------------------------------------------------------------ content

    def content_info(self, digest: str, *, lease: str | None = None) -> dict[str, Any]:
        """``{digest, size, created_at, updated_at, labels}`` of a committed blob. Raises: NotFound."""
        return self.call("content.info", {"digest": digest}, lease=lease)["info"]  # type: ignore[no-any-return]

    def content_list(self, filters: list[str] | None = None, *, lease: str | None = None) -> list[dict[str, Any]]:
        """Infos of every blob of the namespace matching any filter (``digest``, ``size``, ``labels.<key>``)."""
        return self.call("content.list", {"filters": filters or []}, lease=lease)["infos"]  # type: ignore[no-any-return]

    def content_delete(self, digest: str, *, lease: str | None = None) -> None:
        """Delete the blob's record (its bytes go at the next garbage collection). Raises: NotFound."""
        self.call("content.delete", {"digest": digest}, lease=lease)

    def content_update(self, digest: str, labels: dict[str, str], update_mask: list[str] | None = None, *,
                       lease: str | None = None) -> dict[str, Any]:
        """Change labels: no mask (or ``labels``) replaces them all; ``labels.<key>`` sets (or, when absent
        from ``labels``, removes) one key. Returns the new info."""
        args = {"digest": digest, "labels": labels, "update_mask": update_mask or []}
        return self.call("content.update", args, lease=lease)["info"]  # type: ignore[no-any-return]

    def content_read(self, digest: str, offset: int = 0, size: int = 0, *,
                     lease: str | None = None) -> Iterator[bytes]:
        """Yield the blob's bytes from ``offset`` (``size`` bytes; 0: to the end) in chunks of up to 1 MiB.

        Closing the iterator early cancels the read. Raises: NotFound, OutOfRange.
        """
        for item in self.stream("content.read", {"digest": digest, "offset": offset, "size": size}, lease=lease):
            yield item["data"]

    def content_status(self, ref: str, *, lease: str | None = None) -> dict[str, Any]:
        """``{ref, offset, total, expected, started_at, updated_at}`` of an ingest. Raises: NotFound."""
        return self.call("content.status", {"ref": ref}, lease=lease)["status"]  # type: ignore[no-any-return]

    def content_statuses(self, filters: list[str] | None = None, *,
                         lease: str | None = None) -> list[dict[str, Any]]:
        """Statuses of the namespace's ingests matching any filter (field ``ref``)."""
        result = self.call("content.list_statuses", {"filters": filters or []}, lease=lease)
        return result["statuses"]  # type: ignore[no-any-return]

    def content_abort(self, ref: str, *, lease: str | None = None) -> None:
        """Remove the ingest ``ref`` and what it holds. Raises: NotFound."""
        self.call("content.abort", {"ref": ref}, lease=lease)

    def content_ingest(self, ref: str, source: BinaryIO, *, expected: str = "", total: int = 0,
                       labels: dict[str, str] | None = None, chunk_size: int = 1 << 20, window: int = 4,
                       lease: str | None = None) -> dict[str, Any]:
        """Write ``source`` (read from its current position to EOF) as blob ``ref`` and commit it.

        Resumes: when the ingest ``ref`` already holds ``offset`` bytes, that many bytes of ``source``
        are skipped (seeked past when it is seekable, else read and dropped) and only the rest is sent.
        Up to ``window`` writes (at most 64) of ``chunk_size`` bytes are in flight at once: the daemon
        holds at most that many chunks and the client one, whatever the blob's size. ``expected`` and ``total``
        (when set) are verified at commit. A blob that exists already counts as written (as containerd's
        ``WriteBlob`` does; its labels are left alone).

        Returns:
            ``{ref, digest, offset, total, started_at, updated_at, exists}``: ``offset`` is the blob's
            size, ``exists`` tells whether it was there before.

        Raises:
            FailedPrecondition: the size or digest does not match (the ingest stays, resumable);
            Unavailable: another writer holds ``ref``; InvalidArgument, NotFound (no such lease).
        """
        if chunk_size < 1 or window < 1:
            raise InvalidArgument("chunk_size and window must be at least 1")
        window = min(window, _MAX_WINDOW)
        call: dict[str, Any] = {"ref": ref}
        try:
            reply = self.call("content.write", {**call, "action": "stat", "total": total, "expected": expected},
                              lease=lease)
        except AlreadyExists:
            return self._existing(ref, expected, total, lease)
        try:
            offset = reply["offset"]
            if offset and not (reply["total"] and offset >= reply["total"]):
                _skip(source, offset, chunk_size)
            if not (reply["total"] and offset >= reply["total"]):
                reply = self._pipeline_writes(ref, source, offset, chunk_size, window, lease) or reply
            args = {**call, "action": "commit", "total": total, "expected": expected, "labels": labels or {}}
            try:
                committed = self.call("content.write", args, lease=lease)
            except AlreadyExists:  # verified, and the namespace has it already
                return self._existing(ref, expected or reply["digest"], total, lease)
        except BaseException:
            self._release(ref, lease)
            raise
        return {**committed, "exists": False}

    def _pipeline_writes(self, ref: str, source: BinaryIO, offset: int, chunk_size: int, window: int,
                         lease: str | None) -> dict[str, Any] | None:
        """Send ``source`` from ``offset`` with up to ``window`` writes in flight; the last reply."""
        in_flight: deque[int] = deque()
        reply = None
        try:
            eof = False
            while True:
                while not eof and len(in_flight) < window:
                    try:
                        data = source.read(chunk_size)
                    except Exception:  # keep what was sent: let the writes in flight land first
                        while in_flight:
                            self._collect(in_flight.popleft())
                        raise
                    if not data:
                        eof = True
                        break
                    args = {"action": "write", "ref": ref, "offset": offset, "data": data}
                    in_flight.append(self._send_request("content.write", args, lease=lease))
                    offset += len(data)
                    del data, args
                if not in_flight:
                    return reply
                reply = self._collect(in_flight.popleft())
        except BaseException:
            if in_flight and self._sock is not None:
                self._cancel_pending(list(in_flight))
            raise

    def _existing(self, ref: str, digest: str, total: int, lease: str | None) -> dict[str, Any]:
        info = self.content_info(digest, lease=lease)
        if total and info["size"] != total:
            raise FailedPrecondition(f"{ref!r} failed size validation: {info['size']} != {total}")
        return {"ref": ref, "digest": digest, "offset": info["size"], "total": info["size"],
                "started_at": info["created_at"], "updated_at": info["updated_at"], "exists": True}

    def _release(self, ref: str, lease: str | None) -> None:
        """Let the ingest ``ref`` go (keeping its progress) after a failure; best effort."""
        if self._sock is None:
            return  # the daemon released it when the connection ended
        try:
            self.call("content.write", {"ref": ref, "action": "close"}, lease=lease)
        except Exception:
            self.close()

    # ------------------------------------------------------------------ leases

    def lease_create(self, lease_id: str, labels: dict[str, str] | None = None,
                     expires_in: float | None = None) -> dict[str, Any]:
        """Create a lease (``expires_in`` seconds sets ``berth.io/gc.expire``) -> ``{id, labels, created_at}``."""
        args: dict[str, Any] = {"id": lease_id, "labels": labels or {}}
        if expires_in is not None:
            args["expires_in"] = expires_in
        return self.call("leases.create", args)["lease"]  # type: ignore[no-any-return]

    def lease_delete(self, lease_id: str, sync: bool = False) -> None:
        """Delete a lease; with ``sync``, garbage is collected before this returns. Raises: NotFound."""
        self.call("leases.delete", {"id": lease_id, "sync": sync})

    def lease_list(self, filters: list[str] | None = None) -> list[dict[str, Any]]:
        """Leases of the namespace matching any filter (``id``, ``labels.<key>``)."""
        return self.call("leases.list", {"filters": filters or []})["leases"]  # type: ignore[no-any-return]

    def lease_add_resource(self, lease_id: str, type: str, resource: str) -> None:  # noqa: A002
        """Make the lease hold a resource: ``type`` is content, ingests, images or snapshots/<snapshotter>."""
        self.call("leases.add_resource", {"id": lease_id, "type": type, "resource": resource})

    def lease_delete_resource(self, lease_id: str, type: str, resource: str) -> None:  # noqa: A002
        self.call("leases.delete_resource", {"id": lease_id, "type": type, "resource": resource})

    def lease_resources(self, lease_id: str) -> list[dict[str, Any]]:
        """``[{type, id}]`` the lease holds. Raises: NotFound."""
        return self.call("leases.list_resources", {"id": lease_id})["resources"]  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ images

    def images_get(self, name: str) -> dict[str, Any]:
        """``{name, target, labels, created_at, updated_at}``; ``target`` is an OCI descriptor map
        (``mediaType``, ``digest``, ``size``, ...). Raises: NotFound."""
        return self.call("images.get", {"name": name})["image"]  # type: ignore[no-any-return]

    def images_list(self, filters: list[str] | None = None) -> list[dict[str, Any]]:
        """Images of the namespace matching any filter (``name``, ``target.digest``, ``target.mediatype``,
        ``labels.<key>``), sorted by name. Raises: InvalidArgument (bad filter)."""
        return self.call("images.list", {"filters": filters or []})["images"]  # type: ignore[no-any-return]

    def images_create(self, name: str, target: dict[str, Any], labels: dict[str, str] | None = None, *,
                      lease: str | None = None) -> dict[str, Any]:
        """Create an image pointing at ``target`` (joining ``lease``). Raises: AlreadyExists, InvalidArgument."""
        args = {"name": name, "target": target, "labels": labels or {}}
        return self.call("images.create", args, lease=lease)["image"]  # type: ignore[no-any-return]

    def images_update(self, name: str, *, labels: dict[str, str] | None = None, target: dict[str, Any] | None = None,
                      update_mask: list[str] | None = None) -> dict[str, Any]:
        """Change an image: mask ``labels`` replaces the labels, ``labels.<key>`` sets (or, when absent from
        ``labels``, removes) one, ``target`` replaces the target; no mask replaces the labels (and the
        target when given). Returns the image. Raises: NotFound, InvalidArgument."""
        args: dict[str, Any] = {"name": name, "labels": labels or {}, "update_mask": update_mask or []}
        if target is not None:
            args["target"] = target
        return self.call("images.update", args)["image"]  # type: ignore[no-any-return]

    def images_delete(self, name: str, *, sync: bool = False, target: str = "") -> None:
        """Delete an image (with ``sync``, garbage is collected before this returns; with ``target``, only if
        it still points at that digest). Raises: NotFound, FailedPrecondition."""
        self.call("images.delete", {"name": name, "sync": sync, "target": target})

    # ------------------------------------------------------------------ transfer (pull, push, import, export)

    def call_streaming(self, method: str, args: dict[str, Any] | None = None, *,
                       on_item: Callable[[Any], object], lease: str | None = None,
                       timeout: float | None = None) -> Any:
        """Call a streaming method, hand each item to ``on_item``, and return the call's result.

        Raises: BerthError, the daemon's error; an exception from ``on_item`` cancels the call.
        """
        msgid = self._start(method, args, None, lease, timeout)
        finished = False
        try:
            for final, value in self._messages(msgid):
                if final:
                    finished = True
                    return value
                on_item(value)
        except BerthError:
            finished = True
            raise
        finally:
            if not finished and self._sock is not None:
                self._cancel(msgid)
        raise AssertionError("unreachable")  # pragma: no cover

    def images_pull(self, reference: str, *, platform: str = "", all_platforms: bool = False, snapshotter: str = "",
                    unpack: bool = True, plain_http: bool = False,
                    progress: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
        """Pull (and unpack) an image in the daemon. ``progress`` gets batches of ``{ref, status, offset,
        total}``. Returns ``{name, target, chain_id, fetched, fetched_bytes, skipped, unpacked_layers, seconds}``.

        Raises: InvalidArgument, NotFound, PermissionDenied, Unauthenticated, Unavailable, FailedPrecondition.
        """
        args = {"reference": reference, "platform": platform, "all_platforms": all_platforms,
                "snapshotter": snapshotter, "unpack": unpack, "plain_http": plain_http}
        return self.call_streaming("transfer.pull", args,  # type: ignore[no-any-return]
                                   on_item=lambda item: progress(item["progress"]) if progress else None)

    def images_push(self, name: str, destination: str = "", *, plain_http: bool = False,
                    progress: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
        """Push an image (to ``destination``, default its own name). Returns ``{name, target, pushed,
        pushed_bytes, skipped, mounted, seconds}``. Raises: NotFound, the registry's errors."""
        args = {"name": name, "destination": destination, "plain_http": plain_http}
        return self.call_streaming("transfer.push", args,  # type: ignore[no-any-return]
                                   on_item=lambda item: progress(item["progress"]) if progress else None)

    def images_import(self, source: BinaryIO, *, base_name: str = "", snapshotter: str = "",
                      unpack: bool = True) -> dict[str, Any]:
        """Upload an OCI layout or ``docker save`` tarball and import it. The upload runs under a lease of
        its own (released at the end, so the archive blob itself is garbage afterwards). Returns ``{images:
        [{name, target, chain_id}], unnamed: [descriptor], blobs}``. Raises: InvalidArgument (not an archive)."""
        import uuid

        lease_id = f"import-{uuid.uuid4().hex[:16]}"
        self.lease_create(lease_id, {"berth.io/import": "archive"}, expires_in=24 * 3600)
        try:
            uploaded = self.content_ingest(f"import-archive-{lease_id}", source, lease=lease_id)
            args = {"digest": uploaded["digest"], "base_name": base_name, "snapshotter": snapshotter,
                    "unpack": unpack}
            return self.call("transfer.import", args, lease=lease_id)  # type: ignore[no-any-return]
        finally:
            self.lease_delete(lease_id)

    def images_export(self, names: list[str], sink: BinaryIO) -> int:
        """Write an OCI image layout tarball of the images ``names`` to ``sink``; returns its size.
        Raises: NotFound (an unknown image or a missing blob)."""
        result = self.call_streaming("transfer.export", {"names": names},
                                     on_item=lambda item: sink.write(item["data"]))
        return int(result["size"])

    # ------------------------------------------------------------------ containers

    def containers_get(self, container_id: str, *, namespace: str | None = None) -> dict[str, Any]:
        """``{id, labels, image, runtime: {name, options}, spec, snapshotter, snapshot_key, extensions,
        created_at, updated_at}``. Raises: NotFound."""
        return self.call("containers.get", {"id": container_id}, namespace=namespace)["container"]  # type: ignore[no-any-return]

    def containers_list(self, filters: list[str] | None = None, *,
                        namespace: str | None = None) -> list[dict[str, Any]]:
        """Containers of the namespace matching any filter (``id``, ``image``, ``runtime.name``,
        ``labels.<key>``, ``snapshotter``, ``snapshot_key``), by id. Raises: InvalidArgument."""
        result = self.call("containers.list", {"filters": filters or []}, namespace=namespace)
        return result["containers"]  # type: ignore[no-any-return]

    def containers_create(self, container: dict[str, Any], *, namespace: str | None = None) -> dict[str, Any]:
        """Record a container (``id``, ``runtime.name`` and ``spec`` required; see :meth:`containers_get` for
        the fields) and return it. Starts nothing. Raises: AlreadyExists, InvalidArgument."""
        return self.call("containers.create", {"container": container},  # type: ignore[no-any-return]
                         namespace=namespace)["container"]

    def containers_update(self, container: dict[str, Any], update_mask: list[str] | None = None, *,
                          namespace: str | None = None) -> dict[str, Any]:
        """Change the container ``container["id"]``: each mask path (``labels``, ``labels.<key>``, ``image``,
        ``spec``, ``snapshot_key``, ``runtime``, ``runtime.options``, ``extensions[.<key>]``) takes that field
        from ``container``; no mask replaces labels, spec, extensions, image and snapshot_key. Returns the
        container. Raises: NotFound, InvalidArgument."""
        args = {"container": container, "update_mask": update_mask or []}
        return self.call("containers.update", args, namespace=namespace)["container"]  # type: ignore[no-any-return]

    def containers_delete(self, container_id: str, *, snapshot_cleanup: bool = False,
                          namespace: str | None = None) -> None:
        """Delete a container; with ``snapshot_cleanup``, its snapshot too (the disk space goes at the next
        garbage collection). Raises: NotFound."""
        self.call("containers.delete", {"id": container_id, "snapshot_cleanup": snapshot_cleanup},
                  namespace=namespace)


def _skip(source: BinaryIO, count: int, chunk_size: int) -> None:
    """Move ``source`` ``count`` bytes on: seek when it can, else read and drop.

    Raises:
        InvalidArgument: an unseekable source ends before that.
    """
    try:
        seekable = source.seekable()
    except (AttributeError, OSError, ValueError):
        seekable = False
    if seekable:
        source.seek(count, io.SEEK_CUR)
        return
    left = count
    while left:
        data = source.read(min(chunk_size, left))
        if not data:
            raise InvalidArgument(f"the source ended {left} bytes before the ingest's offset {count}")
        left -= len(data)
