"""Synchronisation primitives trio does not ship."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

__all__ = ["SharedExclusiveLock"]


class SharedExclusiveLock:
    """Many shared holders or one exclusive holder (a readers-writer lock).

    A task waiting for exclusive access blocks new shared holders, so it cannot be starved.
    """

    def __init__(self) -> None:
        self._gate = trio.Lock()
        self._shared = 0
        self._drained = trio.Event()
        self._drained.set()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._gate:
            if self._shared == 0:
                self._drained = trio.Event()
            self._shared += 1
        try:
            yield
        finally:
            self._shared -= 1
            if self._shared == 0:
                self._drained.set()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._gate:
            await self._drained.wait()
            yield
