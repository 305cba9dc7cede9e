"""Request admission: at most `max_running` generate at once, `max_queue` wait; the rest get 429."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from scheduler.errors import ApiError


class Admission:
    """A bounded waiting room in front of the engine; fair (FIFO) by asyncio.Semaphore."""

    def __init__(self, max_running: int, max_queue: int, retry_after_s: int = 1):
        self.max_running, self.max_queue, self.retry_after_s = max_running, max_queue, retry_after_s
        self._slots = asyncio.Semaphore(max_running)
        self.running = 0
        self.waiting = 0

    @asynccontextmanager
    async def slot(self, deadline: float | None = None) -> AsyncIterator[None]:
        """Hold a generation slot; raises ApiError(429) with Retry-After when the queue is full, and
        TimeoutError when the loop time `deadline` passes while waiting (the request's timeout)."""
        if self.running >= self.max_running and self.waiting >= self.max_queue:
            raise ApiError(429, f"the server is busy: {self.running} requests running and "
                                f"{self.waiting} waiting (queue limit {self.max_queue}); retry later",
                           "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.waiting += 1
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()
