"""The events exchange: publish/subscribe with containerd's topics and filters.

Every event travels in an :class:`Envelope` (timestamp, namespace, topic, payload map). Publishing
never blocks: each subscriber has a bounded queue, and when a subscriber's queue is full the new
event is dropped *for that subscriber only*. The next envelope that subscriber does receive carries
``dropped``, the number of events it missed just before it, so a gap is never silent.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from berth.core.errdefs import InvalidArgument
from berth.core.filters import Filter, parse_filters
from berth.core.identifiers import validate_identifier

__all__ = ["DEFAULT_SUBSCRIBER_BUFFER", "Envelope", "Exchange", "Subscription", "validate_topic"]

DEFAULT_SUBSCRIBER_BUFFER = 1024
#: Forwarded timestamps must be before the year 9999 (and finite).
_LATEST_TIMESTAMP = 253402300800.0


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event as delivered: ``timestamp`` is UNIX seconds (UTC)."""

    timestamp: float
    namespace: str
    topic: str
    event: dict[str, Any]
    dropped: int = 0

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "timestamp": self.timestamp, "namespace": self.namespace, "topic": self.topic, "event": self.event,
        }
        if self.dropped:
            wire["dropped"] = self.dropped
        return wire

    def _as_filter_target(self) -> dict[str, Any]:
        return {"topic": self.topic, "namespace": self.namespace, "event": self.event}


def validate_topic(topic: Any) -> str:
    """Return ``topic`` if it is ``/``-rooted with identifier components (``/tasks/exit``).

    Raises:
        InvalidArgument: naming the topic and the bad component.
    """
    if not isinstance(topic, str) or not topic.startswith("/"):
        raise InvalidArgument(f"topic {topic!r} must be a string starting with '/'")
    for part in topic[1:].split("/"):
        validate_identifier(part, f"topic {topic!r} component")
    return topic


@dataclass(eq=False)
class Subscription:
    """A subscriber's end: iterate it to receive envelopes."""

    filter: Filter
    _send: trio.MemorySendChannel[Envelope]
    _receive: trio.MemoryReceiveChannel[Envelope]
    pending_drops: int = 0
    total_dropped: int = field(default=0)

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._receive.__aiter__()

    async def receive(self) -> Envelope:
        return await self._receive.receive()

    def _offer(self, envelope: Envelope) -> None:
        if self.pending_drops:
            envelope = Envelope(envelope.timestamp, envelope.namespace, envelope.topic, envelope.event,
                                self.pending_drops)
        try:
            self._send.send_nowait(envelope)
        except trio.WouldBlock:
            self.pending_drops += 1
            self.total_dropped += 1
        except trio.BrokenResourceError:
            pass  # the subscriber is going away
        else:
            self.pending_drops = 0


class Exchange:
    """Broadcasts published events to every subscriber whose filters match."""

    def __init__(self, *, subscriber_buffer: int = DEFAULT_SUBSCRIBER_BUFFER) -> None:
        self.subscriber_buffer = subscriber_buffer
        self._subscribers: set[Subscription] = set()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, namespace: str, topic: str, event: dict[str, Any]) -> Envelope:
        """Stamp and broadcast an event. Never blocks.

        Raises:
            InvalidArgument: the namespace or topic is invalid.
        """
        validate_identifier(namespace, "namespace")
        envelope = Envelope(time.time(), namespace, validate_topic(topic), event)
        self._broadcast(envelope)
        return envelope

    def forward(self, envelope: Envelope) -> None:
        """Broadcast an envelope stamped elsewhere (a shim, a proxy), keeping its timestamp.

        Raises:
            InvalidArgument: the namespace or topic is invalid, or the timestamp is not a plausible time.
        """
        validate_identifier(envelope.namespace, "namespace")
        validate_topic(envelope.topic)
        if not 0 < envelope.timestamp < _LATEST_TIMESTAMP:
            raise InvalidArgument(f"a forwarded event needs a UNIX timestamp, got {envelope.timestamp!r}")
        self._broadcast(envelope)

    def _broadcast(self, envelope: Envelope) -> None:
        target = None
        for subscription in tuple(self._subscribers):
            if subscription.filter.alternatives:
                if target is None:
                    target = envelope._as_filter_target()
                if not subscription.filter.match_mapping(target):
                    continue
            subscription._offer(envelope)

    @asynccontextmanager
    async def subscribe(
        self, filters: Sequence[str] = (), *, buffer: int | None = None
    ) -> AsyncIterator[Subscription]:
        """Receive every event published while the context is open that matches any filter.

        ``buffer`` (default: the exchange's ``subscriber_buffer``) bounds the subscriber's queue.

        Raises:
            InvalidArgument: a filter does not parse.
        """
        parsed = parse_filters(filters)
        send, receive = trio.open_memory_channel[Envelope](buffer or self.subscriber_buffer)
        subscription = Subscription(parsed, send, receive)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)
            send.close()
            receive.close()
