"""berth.core.events.Exchange: publish/subscribe with filters and bounded, lossy-but-counted queues."""

from __future__ import annotations

import math
import time

import pytest
import trio
import trio.testing

from berth.core.errdefs import InvalidArgument
from berth.core.events import Envelope, Exchange, Subscription, validate_topic


def drain(subscription: Subscription) -> list[Envelope]:
    """Everything queued for ``subscription`` right now, without waiting (peeks at its channel)."""
    out = []
    while True:
        try:
            out.append(subscription._receive.receive_nowait())
        except trio.WouldBlock:
            return out


async def test_publish_reaches_a_subscriber() -> None:
    exchange = Exchange()
    async with exchange.subscribe() as sub:
        before = time.time()
        sent = exchange.publish("default", "/tasks/exit", {"container_id": "c1", "exit_status": 3})
        after = time.time()
        with trio.fail_after(5):
            got = await sub.receive()
    assert got == sent
    assert got.namespace == "default"
    assert got.topic == "/tasks/exit"
    assert got.event == {"container_id": "c1", "exit_status": 3}
    assert got.dropped == 0
    assert before <= got.timestamp <= after
    assert got.to_wire() == {"timestamp": got.timestamp, "namespace": "default", "topic": "/tasks/exit",
                             "event": {"container_id": "c1", "exit_status": 3}}


async def test_events_published_before_subscribing_are_not_delivered() -> None:
    exchange = Exchange()
    exchange.publish("default", "/images/create", {"name": "early"})
    async with exchange.subscribe() as sub:
        exchange.publish("default", "/images/create", {"name": "late"})
        assert [e.event["name"] for e in drain(sub)] == ["late"]


async def test_iterating_a_subscription() -> None:
    exchange = Exchange()
    names = []
    async with exchange.subscribe() as sub:
        for i in range(3):
            exchange.publish("default", "/images/create", {"name": f"i{i}"})
        with trio.fail_after(5):
            async for envelope in sub:
                names.append(envelope.event["name"])
                if len(names) == 3:
                    break
    assert names == ["i0", "i1", "i2"]


async def test_filters_select_events() -> None:
    exchange = Exchange()
    async with (
        exchange.subscribe(['topic=="/tasks/exit"']) as exits,
        exchange.subscribe(['topic~="^/images/",namespace==k8s.io']) as k8s_images,
        exchange.subscribe(['topic=="/tasks/oom"', "event.container_id==c2"]) as oom_or_c2,
        exchange.subscribe() as everything,
    ):
        exchange.publish("default", "/tasks/exit", {"container_id": "c1"})
        exchange.publish("k8s.io", "/images/create", {"name": "a"})
        exchange.publish("default", "/images/create", {"name": "b"})
        exchange.publish("default", "/tasks/oom", {"container_id": "c1"})
        exchange.publish("default", "/tasks/start", {"container_id": "c2"})

        def topics(envelopes: list[Envelope]) -> list[tuple[str, str]]:
            return [(e.namespace, e.topic) for e in envelopes]

        assert topics(drain(exits)) == [("default", "/tasks/exit")]
        assert topics(drain(k8s_images)) == [("k8s.io", "/images/create")]
        assert topics(drain(oom_or_c2)) == [("default", "/tasks/oom"), ("default", "/tasks/start")]
        assert len(drain(everything)) == 5


async def test_a_bad_filter_refuses_the_subscription() -> None:
    exchange = Exchange()
    with pytest.raises(InvalidArgument, match="position"):
        async with exchange.subscribe(["topic=="]):
            pytest.fail("subscribed with a bad filter")
    assert exchange.subscriber_count == 0


@pytest.mark.parametrize("topic", ["tasks/exit", "", "/", "/tasks/", "/tasks//exit", "/tasks/ex it", "/tasks/exit!",
                                   "/a/" + "x" * 77, None, 5])
async def test_publish_refuses_bad_topics(topic: object) -> None:
    exchange = Exchange()
    async with exchange.subscribe() as sub:
        with pytest.raises(InvalidArgument, match="topic"):
            exchange.publish("default", topic, {})  # type: ignore[arg-type]
        assert drain(sub) == []


@pytest.mark.parametrize("namespace", ["", "bad ns", "-lead", "trail-", "a..b", "x" * 77])
async def test_publish_refuses_bad_namespaces(namespace: str) -> None:
    exchange = Exchange()
    async with exchange.subscribe() as sub:
        with pytest.raises(InvalidArgument, match="namespace"):
            exchange.publish(namespace, "/tasks/exit", {})
        assert drain(sub) == []


def test_validate_topic_accepts_containerd_topics() -> None:
    for topic in ("/tasks/exit", "/tasks/exec-added", "/snapshot/prepare", "/images/create", "/a.b/c_d"):
        assert validate_topic(topic) == topic


async def test_forward_keeps_the_timestamp() -> None:
    exchange = Exchange()
    async with exchange.subscribe(["namespace==shim"]) as sub:
        envelope = Envelope(timestamp=1234.5, namespace="shim", topic="/tasks/exit", event={"pid": 7})
        exchange.forward(envelope)
        got = drain(sub)
    assert [(e.timestamp, e.namespace, e.topic, e.event) for e in got] == [(1234.5, "shim", "/tasks/exit", {"pid": 7})]


@pytest.mark.parametrize("timestamp", [0.0, -1.0, math.nan, math.inf, 1e300])
async def test_forward_refuses_a_missing_timestamp(timestamp: float) -> None:
    exchange = Exchange()
    async with exchange.subscribe() as sub:
        with pytest.raises(InvalidArgument, match="timestamp"):
            exchange.forward(Envelope(timestamp=timestamp, namespace="default", topic="/tasks/exit", event={}))
        assert drain(sub) == []


async def test_forward_validates_namespace_and_topic() -> None:
    exchange = Exchange()
    with pytest.raises(InvalidArgument, match="namespace"):
        exchange.forward(Envelope(timestamp=1.0, namespace="bad ns", topic="/tasks/exit", event={}))
    with pytest.raises(InvalidArgument, match="topic"):
        exchange.forward(Envelope(timestamp=1.0, namespace="default", topic="tasks", event={}))


async def test_a_slow_subscriber_drops_new_events_and_is_told_how_many() -> None:
    exchange = Exchange()
    async with exchange.subscribe(buffer=2) as slow, exchange.subscribe(buffer=100) as fast:
        for i in range(5):
            exchange.publish("default", "/images/create", {"n": i})  # never blocks, even with slow full
        # the slow one keeps the oldest events it had room for; the newer ones are dropped
        first = drain(slow)
        assert [(e.event["n"], e.dropped) for e in first] == [(0, 0), (1, 0)]
        assert slow.total_dropped == 3

        exchange.publish("default", "/images/create", {"n": 5})
        exchange.publish("default", "/images/create", {"n": 6})
        second = drain(slow)
        assert [(e.event["n"], e.dropped) for e in second] == [(5, 3), (6, 0)]
        assert second[0].to_wire()["dropped"] == 3
        assert "dropped" not in second[1].to_wire()

        # the fast one missed nothing
        assert [(e.event["n"], e.dropped) for e in drain(fast)] == [(i, 0) for i in range(7)]
        assert fast.total_dropped == 0


async def test_drops_accumulate_until_something_is_delivered() -> None:
    exchange = Exchange()
    async with exchange.subscribe(buffer=1) as sub:
        exchange.publish("default", "/a", {"n": 0})
        exchange.publish("default", "/a", {"n": 1})
        assert [e.event["n"] for e in drain(sub)] == [0]
        exchange.publish("default", "/a", {"n": 2})
        exchange.publish("default", "/a", {"n": 3})
        exchange.publish("default", "/a", {"n": 4})
        # 1 was dropped, 2 went in, 3 and 4 were dropped
        assert [(e.event["n"], e.dropped) for e in drain(sub)] == [(2, 1)]
        exchange.publish("default", "/a", {"n": 5})
        assert [(e.event["n"], e.dropped) for e in drain(sub)] == [(5, 2)]
        assert sub.total_dropped == 3


async def test_filtered_out_events_do_not_count_as_dropped() -> None:
    exchange = Exchange()
    async with exchange.subscribe(['topic=="/keep"'], buffer=1) as sub:
        for _ in range(10):
            exchange.publish("default", "/other", {})
        exchange.publish("default", "/keep", {})
        got = drain(sub)
    assert [(e.topic, e.dropped) for e in got] == [("/keep", 0)]


async def test_publish_does_not_block_when_nobody_reads() -> None:
    exchange = Exchange(subscriber_buffer=4)
    async with exchange.subscribe() as sub:
        with trio.fail_after(5):
            for i in range(10_000):
                exchange.publish("default", "/flood", {"i": i})
                await trio.lowlevel.checkpoint()
        assert sub.total_dropped == 10_000 - 4
        assert len(drain(sub)) == 4


async def test_subscription_ends_with_its_context() -> None:
    exchange = Exchange()
    async with exchange.subscribe() as first:
        assert exchange.subscriber_count == 1
        async with exchange.subscribe():
            assert exchange.subscriber_count == 2
        assert exchange.subscriber_count == 1
    assert exchange.subscriber_count == 0
    with pytest.raises(trio.ClosedResourceError):
        await first.receive()
    exchange.publish("default", "/tasks/exit", {})  # no subscriber left: nothing to do, no error


async def test_subscription_ends_when_its_task_is_cancelled() -> None:
    exchange = Exchange()
    received: list[Envelope] = []

    async def listen(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with exchange.subscribe() as sub:
            task_status.started()
            async for envelope in sub:
                received.append(envelope)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(listen)
            assert exchange.subscriber_count == 1
            exchange.publish("default", "/x", {})
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert len(received) == 1
    assert exchange.subscriber_count == 0
