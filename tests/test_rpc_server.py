"""berth.core.rpc.server.RPCServer over an in-memory stream: framing, errors, streams, cancellation."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from berth.core.errdefs import AlreadyExists, NotFound
from berth.core.rpc.args import typed_args
from berth.core.rpc.protocol import new_unpacker, pack
from berth.core.rpc.server import (
    Call,
    Handler,
    PeerCredentials,
    RPCServer,
    current_call,
    inline,
    streaming,
)

MAX = 64 * 1024


class Client:
    """The client end of a connection, speaking raw msgpack frames."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.unpacker = new_unpacker()
        self.next_msgid = 1

    async def send(self, frame: Any) -> None:
        await self.stream.send_all(pack(frame))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(self, method: str, args: Any = None, meta: Any = None, msgid: int | None = None) -> int:
        if msgid is None:
            msgid = self.next_msgid
            self.next_msgid += 1
        await self.send([0, msgid, method, [{} if meta is None else meta, {} if args is None else args]])
        return msgid

    async def receive(self) -> Any:
        """The next message from the server; ``EOFError`` once it closed the connection."""
        with trio.fail_after(5):
            while True:
                try:
                    return self.unpacker.unpack()
                except msgpack.OutOfData:
                    pass
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError
                self.unpacker.feed(data)

    async def call(self, method: str, args: Any = None, meta: Any = None) -> Any:
        """Send a request and return its response ``[1, msgid, error, result]``."""
        msgid = await self.request(method, args, meta)
        response = await self.receive()
        assert response[:2] == [1, msgid], response
        return response

    async def expect_closed(self) -> None:
        with pytest.raises(EOFError):
            await self.receive()


def error_of(message: Any) -> tuple[str, str]:
    if message[0] == 1:
        error = message[2]
    else:
        assert message[:2] == [2, "$error"], message
        error = message[2][0]
    assert set(error) == {"code", "message"}
    return error["code"], error["message"]


@asynccontextmanager
async def connected(
    methods: Mapping[str, Handler] | None = None, **kwargs: Any
) -> AsyncIterator[tuple[Client, RPCServer]]:
    """Serve one in-memory connection; on exit, close the client end and wait for the server to finish."""
    server = RPCServer(methods if methods is not None else basic_methods(), max_message_size=kwargs.pop(
        "max_message_size", MAX), **kwargs)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    client = Client(client_stream)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_connection, server_stream, PeerCredentials(pid=1, uid=0, gid=0))
            yield client, server
            await client_stream.aclose()
    assert server.connections == 0


async def echo(call: Call, args: dict[str, Any]) -> Any:
    return {"args": args, "namespace": call.namespace, "lease": call.meta.lease}


async def fail_not_found(call: Call, args: dict[str, Any]) -> Any:
    raise NotFound(f"image {args.get('name')!r} not found")


async def crash(call: Call, args: dict[str, Any]) -> Any:
    raise ZeroDivisionError("oops")


async def sleep_forever(call: Call, args: dict[str, Any]) -> Any:
    await trio.sleep_forever()


async def unencodable(call: Call, args: dict[str, Any]) -> Any:
    return {"x": object()}


def basic_methods() -> dict[str, Handler]:
    return {"test.echo": echo, "test.not_found": fail_not_found, "test.crash": crash, "test.sleep": sleep_forever,
            "test.unencodable": unencodable}


# ---------------------------------------------------------------------------------------------- basics


async def test_request_response() -> None:
    async with connected() as (client, _):
        response = await client.call("test.echo", {"a": 1, "b": b"\x00bin", "c": [1, "x"]},
                                     meta={"namespace": "k8s.io", "lease": "l1"})
        assert response == [1, 1, None, {"args": {"a": 1, "b": b"\x00bin", "c": [1, "x"]}, "namespace": "k8s.io",
                                         "lease": "l1"}]


async def test_defaults_for_meta_and_args() -> None:
    async with connected() as (client, _):
        await client.send([0, 7, "test.echo", [{}, None]])
        assert await client.receive() == [1, 7, None, {"args": {}, "namespace": "default", "lease": None}]


async def test_unknown_method_is_not_implemented() -> None:
    async with connected() as (client, _):
        response = await client.call("test.nope")
        assert response[3] is None
        code, message = error_of(response)
        assert code == "not_implemented"
        assert "test.nope" in message
        assert (await client.call("test.echo"))[2] is None


async def test_a_berth_error_keeps_its_code() -> None:
    async with connected() as (client, _):
        response = await client.call("test.not_found", {"name": "busybox"})
        assert error_of(response) == ("not_found", "image 'busybox' not found")


async def test_a_plain_exception_is_internal_and_the_connection_lives_on() -> None:
    async with connected() as (client, _):
        code, message = error_of(await client.call("test.crash"))
        assert code == "internal"
        assert "test.crash" in message
        assert "ZeroDivisionError" in message
        assert (await client.call("test.echo", {"x": 1}))[3]["args"] == {"x": 1}


async def test_an_unencodable_result_is_internal() -> None:
    async with connected() as (client, _):
        code, message = error_of(await client.call("test.unencodable"))
        assert code == "internal"
        assert "cannot be encoded" in message
        assert (await client.call("test.echo"))[2] is None


async def test_current_call_is_set_in_the_handler() -> None:
    seen: list[tuple[str, int, str, int]] = []

    async def who(call: Call, args: dict[str, Any]) -> Any:
        current = current_call.get()
        assert current is call
        seen.append((current.method, current.msgid, current.namespace, current.peer.pid))
        return None

    async with connected({"test.who": who}) as (client, _):
        await client.call("test.who", meta={"namespace": "ns1"})
        await client.call("test.who")
    assert seen == [("test.who", 1, "ns1", 1), ("test.who", 2, "default", 1)]
    assert current_call.get(None) is None


async def test_inline_handlers() -> None:
    @inline
    async def version(call: Call, args: dict[str, Any]) -> Any:
        return {"version": "1", "method": current_call.get().method}

    async with connected({"test.version": version, **basic_methods()}) as (client, _):
        assert await client.call("test.version") == [1, 1, None, {"version": "1", "method": "test.version"}]
        assert error_of(await client.call("test.crash"))[0] == "internal"
        assert (await client.call("test.version"))[2] is None


# ---------------------------------------------------------------------------------------------- bad frames


@pytest.mark.parametrize(
    "frame",
    [
        "hello",
        42,
        {"a": 1},
        [],
        [0, 1, "test.echo"],
        [0, 1, "test.echo", [{}, {}], "extra"],
        [0, -1, "test.echo", [{}, {}]],
        [0, 2**32, "test.echo", [{}, {}]],
        [0, "1", "test.echo", [{}, {}]],
        [0, True, "test.echo", [{}, {}]],
        [0, 1.0, "test.echo", [{}, {}]],
        [1, 1, None, None],
        [3, 1, "test.echo", [{}, {}]],
        ["0", 1, "test.echo", [{}, {}]],
        [2, "$cancel", "x"],
        [2, "$cancel", [1, 2]],
        [2, "$cancel", [-1]],
        [2, "$cancel"],
        [2, "something", []],
    ],
)
async def test_frames_without_a_usable_msgid_get_an_error_notification(frame: Any) -> None:
    async with connected() as (client, _):
        await client.send(frame)
        message = await client.receive()
        assert message[:2] == [2, "$error"]
        assert error_of(message)[0] == "invalid_argument"
        assert (await client.call("test.echo"))[2] is None  # still serving


@pytest.mark.parametrize(
    ("frame", "fragment"),
    [
        ([0, 5, 7, [{}, {}]], "method must be a non-empty string"),
        ([0, 5, "", [{}, {}]], "method must be a non-empty string"),
        ([0, 5, "test.echo", {}], "params must be an array [meta, args]"),
        ([0, 5, "test.echo", [{}]], "params must be an array [meta, args]"),
        ([0, 5, "test.echo", [{}, {}, {}]], "params must be an array [meta, args]"),
        ([0, 5, "test.echo", [[], {}]], "meta must be a map"),
        ([0, 5, "test.echo", [None, {}]], "meta must be a map"),
        ([0, 5, "test.echo", [{"namespace": 1}, {}]], "meta.namespace must be a string"),
        ([0, 5, "test.echo", [{"lease": 5}, {}]], "meta.lease must be a string"),
        ([0, 5, "test.echo", [{"deadline": "soon"}, {}]], "meta.deadline must be a number"),
        ([0, 5, "test.echo", [{"deadline": True}, {}]], "meta.deadline must be a number"),
        ([0, 5, "test.echo", [{}, [1, 2]]], "args must be a map"),
        ([0, 5, "test.echo", [{}, "x"]], "args must be a map"),
    ],
)
async def test_frames_with_a_msgid_get_an_error_response(frame: Any, fragment: str) -> None:
    async with connected() as (client, _):
        await client.send(frame)
        message = await client.receive()
        assert message[:2] == [1, 5]
        assert message[3] is None
        code, text = error_of(message)
        assert code == "invalid_argument"
        assert fragment in text
        assert (await client.call("test.echo"))[2] is None


async def test_a_nan_deadline_is_refused() -> None:
    async with connected() as (client, _):
        await client.send([0, 5, "test.echo", [{"deadline": float("nan")}, {}]])
        assert error_of(await client.receive())[0] == "invalid_argument"
        assert (await client.call("test.echo"))[2] is None


async def test_bytes_that_are_not_msgpack_close_the_connection() -> None:
    async with connected() as (client, _):
        assert (await client.call("test.echo"))[2] is None
        await client.send_raw(b"\xc1" + pack([0, 2, "test.echo", [{}, {}]]))
        message = await client.receive()
        assert message[:2] == [2, "$error"]
        code, text = error_of(message)
        assert code == "invalid_argument"
        assert "malformed msgpack" in text
        await client.expect_closed()


async def test_a_map_with_non_string_keys_closes_the_connection() -> None:
    async with connected() as (client, _):
        await client.send([0, 1, "test.echo", [{}, {1: 2}]])
        assert error_of(await client.receive())[0] == "invalid_argument"
        await client.expect_closed()


async def test_an_oversize_message_closes_the_connection() -> None:
    async with connected(max_message_size=4096) as (client, _):
        assert (await client.call("test.echo", {"blob": b"x" * 3000}))[2] is None
        await client.request("test.echo", {"blob": b"x" * 5000})
        message = await client.receive()
        assert message[:2] == [2, "$error"]
        code, text = error_of(message)
        assert code == "resource_exhausted"
        assert "4096" in text
        await client.expect_closed()


async def test_an_oversize_message_sent_in_pieces_closes_the_connection() -> None:
    async with connected(max_message_size=4096) as (client, _):
        data = pack([0, 1, "test.echo", [{}, {"blob": b"y" * 6000}]])
        for start in range(0, 5000, 1000):  # the fifth piece takes it over the limit
            await client.send_raw(data[start:start + 1000])
            await trio.testing.wait_all_tasks_blocked()
        assert error_of(await client.receive())[0] == "resource_exhausted"
        await client.expect_closed()


async def test_many_small_pipelined_requests_are_not_one_big_message() -> None:
    # 100 requests of about 100 bytes arrive in one read, far more than max_message_size together
    async with connected(max_message_size=4096) as (client, _):
        data = b"".join(pack([0, i, "test.echo", [{}, {"pad": "p" * 80}]]) for i in range(1, 101))
        assert len(data) > 2 * 4096
        await client.send_raw(data)
        responses = [await client.receive() for _ in range(100)]
        assert sorted(r[1] for r in responses) == list(range(1, 101))
        assert all(r[0] == 1 and r[2] is None for r in responses)


async def test_a_message_just_under_the_limit_followed_by_another() -> None:
    async with connected(max_message_size=4096) as (client, _):
        first = pack([0, 1, "test.echo", [{}, {"blob": b""}]])
        big = pack([0, 1, "test.echo", [{}, {"blob": b"z" * (4096 - len(first) - 2)}]])
        assert 4000 < len(big) <= 4096
        await client.send_raw(big + pack([0, 2, "test.echo", [{}, {}]]))
        responses = [await client.receive() for _ in range(2)]
        assert sorted((r[1], r[2]) for r in responses) == [(1, None), (2, None)]


async def test_an_unauthorized_peer_is_refused() -> None:
    async with connected(authorize=lambda peer: peer.uid == 4242) as (client, _):
        message = await client.receive()
        assert message[:2] == [2, "$error"]
        code, text = error_of(message)
        assert code == "permission_denied"
        assert "uid 0" in text
        await client.expect_closed()


# ---------------------------------------------------------------------------------------------- concurrency


async def test_concurrent_requests_complete_out_of_order() -> None:
    released = trio.Event()

    async def wait(call: Call, args: dict[str, Any]) -> Any:
        await released.wait()
        return "waited"

    async def release(call: Call, args: dict[str, Any]) -> Any:
        released.set()
        return "released"

    async with connected({"test.wait": wait, "test.release": release}) as (client, _):
        await client.request("test.wait", msgid=10)
        await client.request("test.release", msgid=11)
        assert await client.receive() == [1, 11, None, "released"]
        assert await client.receive() == [1, 10, None, "waited"]


async def test_back_pressure_limits_requests_in_flight() -> None:
    started: list[int] = []
    gates = {i: trio.Event() for i in (1, 2, 3)}

    async def blocked(call: Call, args: dict[str, Any]) -> Any:
        started.append(args["n"])
        await gates[args["n"]].wait()
        return args["n"]

    async with connected({"test.blocked": blocked}, max_concurrent_requests=2) as (client, server):
        for n in (1, 2, 3):
            await client.request("test.blocked", {"n": n}, msgid=n)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(started) == [1, 2]  # trio may start the two in either order
        assert server.active_requests == 2
        gates[2].set()
        assert await client.receive() == [1, 2, None, 2]
        await trio.testing.wait_all_tasks_blocked()
        assert len(started) == 3
        assert started[2] == 3
        gates[1].set()
        gates[3].set()
        assert sorted([(await client.receive())[1] for _ in range(2)]) == [1, 3]
        await trio.testing.wait_all_tasks_blocked()
        assert server.active_requests == 0


async def test_a_duplicate_msgid_in_flight_is_refused() -> None:
    gate = trio.Event()
    calls: list[int] = []

    async def blocked(call: Call, args: dict[str, Any]) -> Any:
        calls.append(args["n"])
        await gate.wait()
        return args["n"]

    async with connected({"test.blocked": blocked}) as (client, _):
        await client.request("test.blocked", {"n": 1}, msgid=9)
        await client.request("test.blocked", {"n": 2}, msgid=9)
        message = await client.receive()
        code, text = error_of(message)
        assert message[0] == 2
        assert code == "invalid_argument"
        assert "msgid 9 is already in flight" in text
        gate.set()
        assert await client.receive() == [1, 9, None, 1]
        assert calls == [1]
        # once answered, the msgid may be used again
        assert await client.call("test.blocked", {"n": 3}) == [1, 1, None, 3]


async def test_cancel_a_request_in_flight() -> None:
    async with connected() as (client, _):
        msgid = await client.request("test.sleep")
        await trio.testing.wait_all_tasks_blocked()
        await client.send([2, "$cancel", [msgid]])
        response = await client.receive()
        assert response[:2] == [1, msgid]
        code, message = error_of(response)
        assert code == "canceled"
        assert "test.sleep" in message
        assert (await client.call("test.echo"))[2] is None


async def test_cancel_of_an_unknown_msgid_is_ignored() -> None:
    async with connected() as (client, _):
        await client.send([2, "$cancel", [999]])
        # nothing comes back for it: the next message is the echo's response
        assert (await client.call("test.echo"))[:3] == [1, 1, None]


@pytest.mark.parametrize("offset", [-10.0, 0.05])
async def test_a_deadline_cancels_the_request(offset: float) -> None:
    async with connected() as (client, _):
        msgid = await client.request("test.sleep", meta={"deadline": time.time() + offset})
        response = await client.receive()
        assert response[:2] == [1, msgid]
        code, message = error_of(response)
        assert code == "deadline_exceeded"
        assert "test.sleep" in message
        assert (await client.call("test.echo"))[2] is None


async def test_a_distant_deadline_does_not_interfere() -> None:
    async with connected() as (client, _):
        response = await client.call("test.echo", meta={"deadline": time.time() + 3600})
        assert response[2] is None


async def test_closing_the_client_cancels_handlers_in_flight() -> None:
    events: list[str] = []

    async def long(call: Call, args: dict[str, Any]) -> Any:
        events.append("started")
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            events.append("cancelled")
            raise

    async with connected({"test.long": long}) as (client, server):
        await client.request("test.long")
        await client.request("test.long")
        await trio.testing.wait_all_tasks_blocked()
        assert events == ["started", "started"]
        assert server.active_requests == 2
        await client.stream.aclose()
    assert events == ["started", "started", "cancelled", "cancelled"]
    assert server.active_requests == 0


# ---------------------------------------------------------------------------------------------- streams


async def test_a_stream_sends_items_before_the_response() -> None:
    @streaming
    async def count(call: Call, args: dict[str, Any]) -> Any:
        for i in range(args["n"]):
            await call.send({"i": i})
        return {"sent": args["n"]}

    async with connected({"test.count": count, **basic_methods()}) as (client, _):
        msgid = await client.request("test.count", {"n": 3}, msgid=77)
        messages = [await client.receive() for _ in range(4)]
        assert messages == [
            [2, "$stream", [msgid, {"i": 0}]],
            [2, "$stream", [msgid, {"i": 1}]],
            [2, "$stream", [msgid, {"i": 2}]],
            [1, msgid, None, {"sent": 3}],
        ]
        assert (await client.call("test.echo"))[2] is None


async def test_streams_are_not_counted_as_active_requests() -> None:
    gate = trio.Event()

    @streaming
    async def follow(call: Call, args: dict[str, Any]) -> Any:
        await call.send("first")
        await gate.wait()
        return None

    async with connected({"test.follow": follow}) as (client, server):
        msgid = await client.request("test.follow")
        assert await client.receive() == [2, "$stream", [msgid, "first"]]
        assert server.active_requests == 0
        with trio.fail_after(5):
            await server.wait_idle()
        gate.set()
        assert await client.receive() == [1, msgid, None, None]


async def test_cancelling_a_stream() -> None:
    @streaming
    async def forever(call: Call, args: dict[str, Any]) -> Any:
        await call.send(1)
        await trio.sleep_forever()

    async with connected({"test.forever": forever}) as (client, _):
        msgid = await client.request("test.forever")
        assert await client.receive() == [2, "$stream", [msgid, 1]]
        await client.send([2, "$cancel", [msgid]])
        assert error_of(await client.receive())[0] == "canceled"


# ---------------------------------------------------------------------------------------------- typed args


@dataclass(kw_only=True)
class GetArgs:
    name: str
    limit: int = 10


@typed_args(GetArgs)
async def get_image(call: Call, args: GetArgs) -> Any:
    return {"name": args.name, "limit": args.limit}


class ImageService:
    @typed_args(GetArgs)
    async def get(self, call: Call, args: GetArgs) -> Any:
        return {"service": True, "name": args.name}

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"images.get_bound": self.get}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({}, "images.get: args.name: required key is missing"),
        ({"name": 5}, "images.get: args.name: expected string"),
        ({"name": "x", "limit": "ten"}, "images.get: args.limit: expected integer"),
        ({"name": "x", "colour": 1}, "images.get: args.colour: unknown key"),
    ],
)
async def test_typed_args_errors_name_method_and_key(args: dict[str, Any], fragment: str) -> None:
    async with connected({"images.get": get_image}) as (client, _):
        code, message = error_of(await client.call("images.get", args))
        assert code == "invalid_argument"
        assert fragment in message


async def test_typed_args_on_functions_and_methods() -> None:
    assert get_image.berth_args is GetArgs  # type: ignore[attr-defined]
    methods = {"images.get": get_image, **ImageService().rpc_methods()}
    async with connected(methods) as (client, _):
        assert (await client.call("images.get", {"name": "busybox"}))[3] == {"name": "busybox", "limit": 10}
        assert (await client.call("images.get_bound", {"name": "alpine"}))[3] == {"service": True, "name": "alpine"}


# ---------------------------------------------------------------------------------------------- from_services


class Service:
    def __init__(self, methods: Mapping[str, Handler]) -> None:
        self.methods = methods

    def rpc_methods(self) -> Mapping[str, Handler]:
        return self.methods


def test_from_services_collects_methods() -> None:
    server = RPCServer.from_services([Service({"a.one": echo}), Service({"b.two": crash})], max_message_size=MAX,
                                     max_concurrent_requests=3)
    assert server.methods == {"a.one": echo, "b.two": crash}
    assert server.max_concurrent_requests == 3


def test_from_services_refuses_a_method_offered_twice() -> None:
    with pytest.raises(AlreadyExists, match=r"RPC method a\.one is offered by two services"):
        RPCServer.from_services([Service({"a.one": echo}), Service({"a.one": crash})], max_message_size=MAX)
