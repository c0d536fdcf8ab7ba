"""``io.berth.gc.v1.scheduler``: decides when the metadata garbage collector runs.

containerd's thresholds, plus one thing containerd lacks: the scheduler also wakes up when the next
lease, image or ingest expires, so expired objects are collected even when the daemon is idle.

* ``startup_delay`` after start, one collection.
* After a deletion, a collection is scheduled ``schedule_delay`` later, but not sooner than the pause
  budget allows: a collection that held the write lock for ``p`` seconds is followed by at least
  ``p / pause_threshold`` seconds without one (so GC holds the lock at most that fraction of the time).
* ``deletion_threshold`` deletions (when not 0) trigger a collection at once, budget or not.
* ``mutation_threshold`` database mutations schedule one within the budget.
* :meth:`Scheduler.collect_now` (a synchronous delete) runs one at once and waits for it.
"""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import dataclass

import trio

from berth.core.decode import Duration
from berth.core.metadata.db import load_labels
from berth.core.metadata.gc import GCResult
from berth.core.metadata.leases import LABEL_GC_EXPIRE, parse_expiry
from berth.core.plugin import InitContext, PluginType, Registration, Registry, hookimpl
from berth.plugins.metadata.plugin import Metadata


@dataclass(kw_only=True)
class Config:
    #: Largest fraction of wall time GC may hold the database write lock (0 < x <= 0.5).
    pause_threshold: float = 0.02
    #: Deletions that trigger a collection at once (0: deletions only schedule one).
    deletion_threshold: int = 0
    #: Database mutations that schedule a collection.
    mutation_threshold: int = 100
    #: Delay between a trigger and the collection.
    schedule_delay: Duration = Duration(0.0)
    #: Delay before the first collection after start.
    startup_delay: Duration = Duration(0.1)

    def __post_init__(self) -> None:
        if not 0 < self.pause_threshold <= 0.5:
            raise ValueError(f"pause_threshold must be in (0, 0.5], got {self.pause_threshold}")
        if self.deletion_threshold < 0 or self.mutation_threshold < 0:
            raise ValueError("thresholds must not be negative")


#: The tables whose rows hold expiry times (``berth.io/gc.expire`` labels, ingests' ``expire_at``).
EXPIRY_TABLES = frozenset({"leases", "images", "ingests"})


def _next_expiry(conn: sqlite3.Connection, now: float) -> float | None:
    times: list[float] = []
    for (labels,) in conn.execute("SELECT labels FROM leases UNION ALL SELECT labels FROM images"):
        text = load_labels(labels).get(LABEL_GC_EXPIRE)
        when = parse_expiry(text) if text else None
        if when is not None and when > now:
            times.append(when)
    row = conn.execute("SELECT MIN(expire_at) FROM ingests WHERE expire_at > ?", (now,)).fetchone()
    if row and row[0] is not None:
        times.append(float(row[0]))
    return min(times) if times else None


class Scheduler:
    """Runs the collector of ``metadata`` as the config says; start :meth:`run` in a nursery."""

    def __init__(self, metadata: Metadata, config: Config) -> None:
        self.metadata = metadata
        self.config = config
        self.last: GCResult | None = None
        self.collections = 0
        self._mutations = 0
        self._deletions = 0
        self._wakeup = trio.Event()
        self._waiters: list[trio.Event] = []
        self._next_allowed = -math.inf
        self._next_expiry: float | None = None
        #: A write changed leases, images or ingests since the next expiry was read (one may expire sooner).
        self._expiry_stale = False
        #: When (trio time) the first trigger since the last collection came; ``schedule_delay``
        #: counts from it (re-counting from "now" at every wake-up would postpone forever).
        self._triggered_at: float | None = None
        self._collecting = False
        metadata.db.on_mutation(self._on_mutation)
        metadata.deletion_listeners.append(self._on_deletion)

    def _trigger(self) -> None:
        if self._triggered_at is None:
            self._triggered_at = trio.current_time()
        self._wakeup.set()

    def _on_mutation(self, tables: frozenset[str]) -> None:
        if self._collecting:
            return
        self._mutations += 1
        if tables & EXPIRY_TABLES:
            self._expiry_stale = True
        self._wakeup.set()
        if self.config.mutation_threshold and self._mutations >= self.config.mutation_threshold:
            self._trigger()

    def _on_deletion(self) -> None:
        self._deletions += 1
        self._trigger()

    async def collect_now(self) -> GCResult:
        """Run a collection as soon as the current one (if any) ends, and return its result."""
        done = trio.Event()
        self._waiters.append(done)
        self._wakeup.set()
        await done.wait()
        assert self.last is not None
        return self.last

    async def _collect(self) -> None:
        waiters, self._waiters = self._waiters, []
        # Reset before collecting: a deletion made while this collection runs schedules another.
        self._mutations = self._deletions = 0
        self._triggered_at = None
        self._collecting = True
        try:
            self.last = await self.metadata.gc.collect()
        finally:
            self._collecting = False
        self.collections += 1
        self._next_allowed = trio.current_time() + self.last.pause / self.config.pause_threshold
        await self._read_next_expiry()
        for waiter in waiters:
            waiter.set()

    async def _read_next_expiry(self) -> None:
        self._expiry_stale = False
        now = time.time()
        expiry = await self.metadata.db.read(lambda conn: _next_expiry(conn, now))
        self._next_expiry = None if expiry is None else trio.current_time() + (expiry - time.time())

    def _due(self) -> float | None:
        """When the next collection should run (trio time), or ``None`` for "not until woken"."""
        if self._waiters:
            return trio.current_time()
        config = self.config
        triggered = trio.current_time() if self._triggered_at is None else self._triggered_at
        if config.deletion_threshold and self._deletions >= config.deletion_threshold:
            return triggered + config.schedule_delay
        if self._deletions or (config.mutation_threshold and self._mutations >= config.mutation_threshold):
            return max(triggered + config.schedule_delay, self._next_allowed)
        return self._next_expiry

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Schedule collections until cancelled."""
        task_status.started()
        with trio.move_on_after(self.config.startup_delay):
            while not self._waiters:  # a synchronous request does not wait out the startup delay
                await self._wakeup.wait()
                self._wakeup = trio.Event()
        await self._collect()
        while True:
            due = self._due()
            if due is None or due > trio.current_time():
                with trio.move_on_at(math.inf if due is None else due):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                if self._expiry_stale:  # a write may have made something that expires sooner
                    await self._read_next_expiry()
                due = self._due()
                if due is None or due > trio.current_time():
                    continue
            await self._collect()


async def init(ic: InitContext) -> Scheduler:
    metadata: Metadata = ic.get_single(PluginType.METADATA)
    scheduler = Scheduler(metadata, ic.config)
    await ic.nursery.start(scheduler.run)
    ic.meta.exports.update({
        "pause_threshold": str(ic.config.pause_threshold),
        "deletion_threshold": str(ic.config.deletion_threshold),
        "mutation_threshold": str(ic.config.mutation_threshold),
        "schedule_delay": f"{float(ic.config.schedule_delay):g}s",
        "startup_delay": f"{float(ic.config.startup_delay):g}s",
    })
    return scheduler


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.register(Registration(type=PluginType.GC, id="scheduler", init=init, config=Config,
                                   requires=(PluginType.METADATA,)))
