"""Waiting for things the tests cannot be told about: a condition to hold, a process to be gone, events."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from berth.client.sync import Client


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "the condition") -> Any:
    """Poll ``condition`` until it returns something true; return that. Fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class TaskEvents:
    """The ``/tasks/*`` events of a daemon, collected by a thread whose subscription exists once this is
    made (probe events are published until it sees one), until ``last(topic, event)`` is true."""

    def __init__(self, connect: Callable[[], Client], last: Callable[[str, dict[str, Any]], bool]) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        subscribed = threading.Event()

        def follow() -> None:
            with connect() as listener:
                for envelope in listener.stream("events.subscribe", {"filters": ['topic~="^/tasks/"']}):
                    subscribed.set()
                    self.seen.append((envelope["topic"], envelope["event"]))
                    if last(envelope["topic"], envelope["event"]):
                        return

        self._thread = threading.Thread(target=follow, daemon=True)
        self._thread.start()
        with connect() as prober:
            wait_for(lambda: (prober.call("events.publish", {"topic": "/tasks/probe", "event": {}}),
                              subscribed.is_set())[1], what="the subscription")

    def of(self, container_id: str) -> list[tuple[str, dict[str, Any]]]:
        """Wait for the last event (20 s at most); the events of ``container_id``, in order."""
        self._thread.join(timeout=20)
        assert not self._thread.is_alive(), "the last event did not come"
        return [(topic, event) for topic, event in self.seen if event.get("container_id") == container_id]
