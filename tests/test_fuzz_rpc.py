"""Malformed input against a live berthd: each example opens a fresh connection, sends something bad,
and checks every message that comes back has a documented shape; meanwhile a long-lived client on
its own connection must keep getting correct answers, and at the end the daemon must be alive with
no internal error in its log.

The expectations come from the protocol's documentation (``berth.core.rpc.protocol``):

* a frame that is valid msgpack but not a valid request is answered on that connection, which stays
  open: with an error response when it has a usable msgid, else with a ``$error`` notification;
* bytes that are not msgpack, or a message over ``rpc.max_message_size``, get a ``$error``
  notification and the connection is closed.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import socket
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from conftest import BerthdFactory, BerthdProcess
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import berth.plugins.services
from berth.client.sync import Client
from berth.core import errdefs

MAX_MESSAGE_SIZE = 65536
MAX_MSGID = 2**32 - 1
FOLLOW_UP = 4242
READ_TIMEOUT = 10.0

CODES = {cls.code for cls in vars(errdefs).values()
         if isinstance(cls, type) and issubclass(cls, errdefs.BerthError)}
#: Codes that mean berth itself failed: never an answer to bad input.
BUG_CODES = {"internal", "unknown"}
LOG_BUGS = ("rpc_handler_failed", "rpc_connection_failed", "rpc_result_unencodable", "Traceback")

METHODS = [
    "version.get", "introspection.plugins", "introspection.server",
    "namespaces.create", "namespaces.get", "namespaces.list", "namespaces.update", "namespaces.delete",
    "events.publish", "events.forward",
    "leases.create", "leases.delete", "leases.list", "leases.add_resource", "leases.delete_resource",
    "leases.list_resources",
    "content.info", "content.update", "content.list", "content.delete", "content.status", "content.list_statuses",
    "content.abort", "content.write",
]
#: Methods that answer with a stream: with valid arguments they send no response until cancelled.
STREAMING = ["events.subscribe", "content.read"]


def _argument_names() -> list[str]:
    """Every field name of the services' argument classes (so junk lands on real keys)."""
    names = {"name", "labels", "filters", "update_mask", "topic", "event", "namespace", "timestamp", "id", "digest"}
    for info in pkgutil.iter_modules(berth.plugins.services.__path__):
        module = importlib.import_module(f"berth.plugins.services.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__name__.endswith("Args"):
                names.update(f.name for f in dataclasses.fields(value))
    return sorted(names)


ARG_NAMES = _argument_names()

settings.register_profile(
    "berth-fuzz", max_examples=200, deadline=None, database=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FUZZ = settings.get_profile("berth-fuzz")
#: For the tests whose examples are costly (big messages) or only vary a few parameters.
FUZZ_SMALL = settings(FUZZ, max_examples=100)


# ------------------------------------------------------------------------------------ the daemon


@pytest.fixture(scope="module")
def daemon(berthd_module_factory: BerthdFactory) -> BerthdProcess:
    return berthd_module_factory.start({"rpc": {"max_message_size": MAX_MESSAGE_SIZE}})


@pytest.fixture(scope="module")
def watcher(daemon: BerthdProcess) -> Iterator[Client]:
    """A long-lived, well-behaved client on its own connection."""
    with daemon.client(timeout=READ_TIMEOUT) as client:
        yield client


class Health:
    """Checks, after each example, that others are still served and the log shows no internal error."""

    def __init__(self, daemon: BerthdProcess, watcher: Client) -> None:
        self.daemon = daemon
        self.watcher = watcher
        self.version = watcher.version()
        self._log_offset = 0

    def check(self) -> None:
        assert self.daemon.alive(), self.daemon.log_text()
        assert self.watcher.version() == self.version
        namespaces = self.watcher.namespace_list()
        assert isinstance(namespaces, list)
        assert all(isinstance(n, dict) and isinstance(n.get("name"), str) for n in namespaces)
        with self.daemon.log_path.open("rb") as f:
            f.seek(self._log_offset)
            new = f.read().decode(errors="replace")
        self._log_offset += len(new.encode(errors="replace"))
        for bug in LOG_BUGS:
            assert bug not in new, f"{bug} in berthd's log:\n{new}"


@pytest.fixture(scope="module")
def health(daemon: BerthdProcess, watcher: Client) -> Health:
    return Health(daemon, watcher)


# ------------------------------------------------------------------------------------ talking raw


class Conversation:
    """What came back on one connection."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.eof = False  # the daemon closed the connection (or reset it)
        self.timed_out = False

    def responses(self, msgid: int) -> list[Any]:
        return [m for m in self.messages if m[0] == 1 and m[1] == msgid]

    def others(self, *msgids: int) -> list[Any]:
        return [m for m in self.messages if not (m[0] == 1 and m[1] in msgids)]


def converse(daemon: BerthdProcess, payload: bytes, *, chunks: int = 1, follow_up: bool = True,
             close_write: bool = False, wait_for: tuple[int, ...] = ()) -> Conversation:
    """Send ``payload`` (in ``chunks`` writes), then a ``version.get`` with msgid ``FOLLOW_UP`` when
    ``follow_up``; read until the responses to ``FOLLOW_UP`` and ``wait_for`` came, or end of stream."""
    out = Conversation()
    wanted = set(wait_for) | ({FOLLOW_UP} if follow_up else set())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(READ_TIMEOUT)
        sock.connect(str(daemon.address))
        try:
            step = max(1, -(-len(payload) // chunks))
            for start in range(0, len(payload), step):
                sock.sendall(payload[start:start + step])
            if follow_up:
                sock.sendall(pack([0, FOLLOW_UP, "version.get", [{}, {}]]))
            if close_write:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon dropped the connection while we wrote: read what it said before
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        while True:
            try:
                data = sock.recv(256 * 1024)
            except ConnectionResetError:
                data = b""
            except TimeoutError:
                out.timed_out = True
                break
            if not data:
                out.eof = True
                break
            unpacker.feed(data)
            out.messages.extend(unpacker)
            seen = {m[1] for m in out.messages if isinstance(m, list) and len(m) == 4 and m[0] == 1}
            if wanted and wanted <= seen and not close_write:
                break
    for message in out.messages:
        check_message(message)
    return out


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def check_error(error: Any) -> str:
    assert isinstance(error, dict), error
    assert set(error) == {"code", "message"}, error
    assert error["code"] in CODES, error
    assert error["code"] not in BUG_CODES, error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    return error["code"]  # type: ignore[no-any-return]


def check_message(message: Any) -> None:
    """Every message the daemon sends has one of the documented shapes."""
    assert isinstance(message, list), message
    assert message, message
    if message[0] == 1:
        assert len(message) == 4, message
        _, msgid, error, result = message
        assert type(msgid) is int, message
        assert 0 <= msgid <= MAX_MSGID, message
        if error is not None:
            check_error(error)
            assert result is None, message
    elif message[0] == 2:
        assert len(message) == 3, message
        _, method, params = message
        assert isinstance(params, list), message
        if method == "$error":
            assert len(params) == 1, message
            check_error(params[0])
        else:
            assert method == "$stream", message
            assert len(params) == 2, message
            assert type(params[0]) is int, message
    else:
        pytest.fail(f"not a response or notification: {message!r:.200}")


def notified_errors(conversation: Conversation) -> list[str]:
    return [m[2][0]["code"] for m in conversation.messages if m[0] == 2 and m[1] == "$error"]


# ------------------------------------------------------------------------------------ strategies

leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=24), st.binary(max_size=24),
    st.builds(msgpack.ExtType, st.integers(min_value=0, max_value=127), st.binary(max_size=8)),
)
#: Any value msgpack carries, with str keys (a map key of another type is malformed input, tested apart).
values = st.recursive(leaves, lambda children: st.one_of(
    st.lists(children, max_size=5), st.dictionaries(st.text(max_size=10), children, max_size=5)), max_leaves=10)
msgids = st.one_of(
    st.integers(min_value=0, max_value=MAX_MSGID).filter(lambda i: i != FOLLOW_UP),
    st.sampled_from([0, 1, MAX_MSGID]),
    st.integers(min_value=-(2**63), max_value=-1), st.integers(min_value=MAX_MSGID + 1, max_value=2**64 - 1),
    st.booleans(), st.floats(), st.text(max_size=5), st.none(), st.lists(leaves, max_size=2),
)
method_names = st.one_of(st.sampled_from(METHODS + STREAMING), st.text(max_size=30), values)
metas = st.one_of(
    st.fixed_dictionaries({}, optional={
        "namespace": st.one_of(st.sampled_from(["default", "fuzz", "", "../x", "a" * 100]), values),
        "lease": st.one_of(st.none(), st.text(max_size=10), values),
        "deadline": st.one_of(st.none(), st.floats(), st.integers(min_value=-(2**63), max_value=2**63),
                              st.booleans(), st.text(max_size=5)),
    }),
    values,
)
arg_maps = st.dictionaries(st.one_of(st.sampled_from(ARG_NAMES), st.text(max_size=10)), values, max_size=5)
args_values = st.one_of(arg_maps, st.none(), values)


def is_valid_msgid(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_MSGID


def meta_is_valid(meta: Any) -> bool:
    if not isinstance(meta, dict):
        return False
    namespace = meta.get("namespace", "default")
    lease = meta.get("lease")
    deadline = meta.get("deadline")
    return (isinstance(namespace, str)
            and (lease is None or isinstance(lease, str))
            and (deadline is None or (type(deadline) in (int, float) and not math.isnan(deadline))))


def expected_outcome(frame: Any) -> tuple[str, int | None]:
    """What the protocol's documentation says a decoded frame gets back.

    ``("notify", None)``: one ``$error`` notification; ``("invalid", msgid)``: an ``invalid_argument``
    response; ``("unknown", msgid)``: ``not_implemented``; ``("call", msgid)``: the method's own answer;
    ``("stream", msgid)``: a stream (maybe no response); ``("silent", None)``: nothing.
    """
    if not isinstance(frame, list) or not frame:
        return "notify", None
    kind = frame[0]
    if type(kind) is int and kind == 0:
        if len(frame) != 4 or not is_valid_msgid(frame[1]):
            return "notify", None
        _, msgid, method, params = frame
        if not isinstance(method, str) or not method:
            return "invalid", msgid
        if not isinstance(params, list) or len(params) != 2:
            return "invalid", msgid
        if not meta_is_valid(params[0]) or not (params[1] is None or isinstance(params[1], dict)):
            return "invalid", msgid
        if method in STREAMING:
            return "stream", msgid
        if method in METHODS:
            return "call", msgid
        return "unknown", msgid
    if type(kind) is int and kind == 2:
        if len(frame) == 3 and frame[1] == "$cancel" and isinstance(frame[2], list) and len(frame[2]) == 1 \
                and is_valid_msgid(frame[2][0]):
            return "silent", None
        return "notify", None
    return "notify", None


requests = st.builds(lambda msgid, method, meta, args: [0, msgid, method, [meta, args]],
                     msgids, method_names, metas, args_values)
frames = st.one_of(
    requests,
    # the right kinds with the wrong number or kind of elements
    st.lists(values, max_size=6).map(lambda rest: [0, *rest]),
    st.lists(values, max_size=5).map(lambda rest: [2, *rest]),
    st.builds(lambda msgid, method, params: [0, msgid, method, params], msgids, method_names, values),
    st.builds(lambda params: [2, "$cancel", params],
              st.one_of(st.lists(msgids, max_size=3), values)),
    st.builds(lambda method, params: [2, method, params], st.one_of(st.text(max_size=10), values), values),
    # responses or other kinds from a client, and not arrays at all
    st.builds(lambda kind, rest: [kind, *rest],
              st.sampled_from([-1, 1, 3, 4, 127, 255, -128, 2**32, 0.0, 2.0, False, True, "0", None, b"\x00"]),
              st.lists(values, max_size=4)),
    values.filter(lambda v: not isinstance(v, list)),
    st.just([]),
)


def check_reply(conversation: Conversation, frame: Any) -> None:
    """The messages match what ``expected_outcome`` predicts, and the connection stayed open."""
    outcome, msgid = expected_outcome(frame)
    assert not conversation.timed_out, (frame, conversation.messages)
    assert len(conversation.responses(FOLLOW_UP)) == 1, (frame, conversation.messages)
    assert conversation.responses(FOLLOW_UP)[0][2] is None
    others = [m for m in conversation.others(FOLLOW_UP) if not (m[0] == 2 and m[1] == "$stream")]
    if outcome == "notify":
        assert [m[:2] for m in others] == [[2, "$error"]], (frame, others)
        assert others[0][2][0]["code"] == "invalid_argument"
    elif outcome == "silent":
        assert others == [], (frame, others)
    else:
        assert msgid is not None
        responses = conversation.responses(msgid)
        assert others == responses, (frame, others)
        if outcome == "stream":
            assert len(responses) <= 1
            if responses:
                assert responses[0][2] is not None, (frame, responses)
            return
        assert len(responses) == 1, (frame, conversation.messages)
        error = responses[0][2]
        if outcome in ("invalid", "unknown"):
            assert error is not None, (frame, responses)
            assert error["code"] == ("invalid_argument" if outcome == "invalid" else "not_implemented"), (frame, error)


def follows_up_id(frame: Any) -> bool:
    """The frame uses the follow-up request's msgid (its answer would be mistaken for the follow-up's)."""
    return isinstance(frame, list) and len(frame) > 1 and type(frame[1]) is int and frame[1] == FOLLOW_UP


def response_wait_list(frame: Any) -> tuple[int, ...]:
    outcome, msgid = expected_outcome(frame)
    return (msgid,) if msgid is not None and outcome != "stream" else ()


# ------------------------------------------------------------------------------------ the tests


@FUZZ
@given(payload=st.binary(min_size=1, max_size=4096))
def test_random_bytes(daemon: BerthdProcess, health: Health, payload: bytes) -> None:
    conversation = converse(daemon, payload, follow_up=False, close_write=True)
    assert conversation.eof, "the daemon must close a connection whose client has finished"
    health.check()


@FUZZ
@given(frame=frames)
def test_wrong_shapes(daemon: BerthdProcess, health: Health, frame: Any) -> None:
    assume(not follows_up_id(frame))
    conversation = converse(daemon, pack(frame), wait_for=response_wait_list(frame))
    check_reply(conversation, frame)
    health.check()


@FUZZ
@given(method=st.sampled_from(METHODS), meta=st.one_of(st.just({}), metas), args=arg_maps,
       msgid=st.integers(min_value=0, max_value=MAX_MSGID).filter(lambda i: i != FOLLOW_UP))
def test_real_methods_with_junk_arguments(daemon: BerthdProcess, health: Health,
                                          method: str, meta: Any, args: dict[str, Any], msgid: int) -> None:
    frame = [0, msgid, method, [meta, args]]
    conversation = converse(daemon, pack(frame), wait_for=response_wait_list(frame))
    check_reply(conversation, frame)
    health.check()


@FUZZ_SMALL
@given(args=st.one_of(
    st.fixed_dictionaries({"name": values}, optional={"labels": values}),
    st.fixed_dictionaries({"name": st.text(max_size=80)},
                          optional={"labels": st.one_of(st.lists(values, max_size=3),
                                                        st.dictionaries(st.text(max_size=5), values, max_size=3))}),
))
def test_namespaces_create_with_wrong_types(daemon: BerthdProcess, health: Health, args: dict[str, Any]) -> None:
    frame = [0, 5, "namespaces.create", [{}, args]]
    conversation = converse(daemon, pack(frame), wait_for=(5,))
    check_reply(conversation, frame)
    [response] = conversation.responses(5)
    name, labels = args.get("name"), args.get("labels", {})
    if not isinstance(name, str) or not isinstance(labels, dict) or \
            not all(isinstance(v, str) for v in labels.values()):
        assert response[2] is not None, response
        assert response[2]["code"] == "invalid_argument", response
    health.check()


@FUZZ
@given(valid_before=st.integers(min_value=0, max_value=2), frame=requests, cut=st.floats(0, 1),
       abrupt=st.booleans())
def test_truncated_frames(daemon: BerthdProcess, health: Health,
                          valid_before: int, frame: Any, cut: float, abrupt: bool) -> None:
    whole = pack(frame)
    truncated = whole[:min(len(whole) - 1, max(1, int(len(whole) * cut)))]
    payload = b"".join(pack([0, i + 1, "version.get", [{}, {}]]) for i in range(valid_before)) + truncated
    if abrupt:  # close mid-frame without reading anything
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(READ_TIMEOUT)
            sock.connect(str(daemon.address))
            sock.sendall(payload)
    else:
        conversation = converse(daemon, payload, follow_up=False, close_write=True)
        assert conversation.eof
        assert sorted(m[1] for m in conversation.messages if m[0] == 1) == list(range(1, valid_before + 1))
        assert all(m[2] is None for m in conversation.messages if m[0] == 1)
        assert notified_errors(conversation) == []
    health.check()


def _oversized(shape: str, size: int) -> bytes:
    if shape == "string":
        return pack([0, 9, "namespaces.create", [{}, {"name": "x" * size}]])
    if shape == "binary":
        return pack([0, 9, "version.get", [{"namespace": "default", "pad": b"\x00" * size}, {}]])
    # many small elements: each decodes on its own, but the message as a whole is what counts
    return pack([0, 9, "events.publish", [{}, {"topic": "/fuzz/big", "event": {"parts": ["y" * 100] * (size // 102)}}]])


@FUZZ_SMALL
@given(shape=st.sampled_from(["string", "binary", "array"]),
       size=st.one_of(st.integers(min_value=MAX_MESSAGE_SIZE - 200, max_value=MAX_MESSAGE_SIZE + 200),
                      st.integers(min_value=MAX_MESSAGE_SIZE, max_value=8 * MAX_MESSAGE_SIZE)),
       chunks=st.integers(min_value=1, max_value=8))
def test_oversized_messages(daemon: BerthdProcess, health: Health,
                            shape: str, size: int, chunks: int) -> None:
    payload = _oversized(shape, size)
    conversation = converse(daemon, payload, chunks=chunks, wait_for=(9,))
    assert not conversation.timed_out
    if len(payload) > MAX_MESSAGE_SIZE:
        assert notified_errors(conversation) == ["resource_exhausted"], (len(payload), conversation.messages)
        assert [m for m in conversation.messages if m[0] == 1] == []
        assert conversation.eof
    else:
        # Up to the limit a message passes, even with the next request right behind it.
        assert notified_errors(conversation) == [], (len(payload), conversation.messages)
        assert len(conversation.responses(9)) == 1
        assert conversation.responses(FOLLOW_UP)[0][2] is None
    health.check()


def _nest(depth: int, leaf: bytes, *, maps: bool) -> bytes:
    return (b"\x81\xa1k" if maps else b"\x91") * depth + leaf


@FUZZ_SMALL
@given(depth=st.integers(min_value=1, max_value=1100), maps=st.booleans(),
       where=st.sampled_from(["top", "kind", "msgid", "method", "meta", "namespace", "args", "name", "labels",
                              "event", "cancel"]))
def test_deep_nesting(daemon: BerthdProcess, health: Health,
                      depth: int, maps: bool, where: str) -> None:
    deep = _nest(depth, b"\x00", maps=maps)

    def request(method: str, meta: bytes, args: bytes, msgid: bytes = b"\x07") -> bytes:
        return b"\x94\x00" + msgid + pack(method) + b"\x92" + meta + args

    payload = {
        "top": deep,
        "kind": b"\x92" + deep + b"\x00",
        "msgid": request("version.get", b"\x80", b"\x80", msgid=deep),
        "method": b"\x94\x00\x07" + deep + pack([{}, {}]),
        "meta": request("version.get", deep, b"\x80"),
        "namespace": request("version.get", b"\x81" + pack("namespace") + deep, b"\x80"),
        "args": request("version.get", b"\x80", deep),
        "name": request("namespaces.create", b"\x80", b"\x81" + pack("name") + deep),
        "labels": request("namespaces.create", b"\x80", b"\x82" + pack("name") + pack("deep")
                          + pack("labels") + b"\x81\xa1k" + deep),
        "event": request("events.publish", b"\x80", b"\x82" + pack("topic") + pack("/fuzz/deep")
                         + pack("event") + b"\x81\xa1k" + deep),
        "cancel": b"\x93\x02" + pack("$cancel") + deep,
    }[where]
    conversation = converse(daemon, payload, wait_for=(7,) if where not in ("top", "kind", "msgid", "cancel") else ())
    assert not conversation.timed_out
    answered = len(conversation.responses(FOLLOW_UP)) == 1
    if depth <= 900:
        assert answered, conversation.messages
    if not answered:  # too deep for the decoder: malformed input, so the connection is dropped
        assert notified_errors(conversation) == ["invalid_argument"], conversation.messages
        assert conversation.eof
    health.check()


@FUZZ_SMALL
@given(frames_=st.lists(frames, min_size=2, max_size=8))
def test_pipelined_junk(daemon: BerthdProcess, health: Health,
                        frames_: list[Any]) -> None:
    # Many bad frames back to back on one connection: each gets its own answer, in any order, and
    # the connection still serves a good request after them.
    ids = [msgid for frame in frames_ for msgid in response_wait_list(frame)]
    # The same msgid twice (or an open stream) would make the answers depend on timing.
    assume(len(ids) == len(set(ids)))
    assume(not any(expected_outcome(f)[0] == "stream" or follows_up_id(f) for f in frames_))
    conversation = converse(daemon, b"".join(pack(f) for f in frames_), wait_for=tuple(ids))
    assert not conversation.timed_out
    assert len(conversation.responses(FOLLOW_UP)) == 1
    notifies = sum(expected_outcome(f)[0] == "notify" for f in frames_)
    assert len(notified_errors(conversation)) == notifies
    for msgid in ids:
        assert len(conversation.responses(msgid)) == 1
    health.check()


def test_map_keys_that_are_not_strings(daemon: BerthdProcess, health: Health) -> None:
    # msgpack allows any map key; berth's decoder takes only str and bytes keys, so anything else is
    # malformed input: a $error, then the connection is closed.
    for frame in ([0, 1, "version.get", [{1: "x"}, {}]], [0, 1, "namespaces.create", [{}, {"name": "a", 2.5: 1}]],
                  {None: 1}):
        conversation = converse(daemon, pack(frame))
        assert notified_errors(conversation) == ["invalid_argument"], conversation.messages
        assert conversation.responses(FOLLOW_UP) == []
        assert conversation.eof
        health.check()


def test_daemon_survived(daemon: BerthdProcess, health: Health) -> None:
    health.check()
    assert daemon.alive()
    log = daemon.log_text()
    for bug in LOG_BUGS:
        assert bug not in log, f"{bug} in berthd's log:\n{log}"
