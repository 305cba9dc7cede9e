"""Request admission: at most `max_running` sequences generate at once, `max_queue` requests wait;
the rest get 429.

A request holds one slot per sequence it generates (every choice of every prompt: `n` x prompts),
as vLLM's max_num_seqs counts them: each is a row of every decode step and a KV cache of its own,
so a request of 8 choices is 8 requests' worth of work. One that asks for more than `max_running`
takes them all, alone, rather than never running. Waiting requests are served in arrival order: a
wide request at the head is not overtaken by narrow ones behind it, so it cannot starve.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from scheduler.errors import ApiError


class Admission:
    """A bounded, FIFO waiting room in front of the engine, counted in sequences."""

    def __init__(self, max_running: int, max_queue: int, retry_after_s: int = 1):
        self.max_running, self.max_queue, self.retry_after_s = max_running, max_queue, retry_after_s
        self.free = max_running  # slots not held
        self.running = 0  # requests holding slots
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()  # (slots, granted), in arrival order

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def slots_for(self, sequences: int) -> int:
        """Slots a request of `sequences` sequences holds: one each, at most all of them."""
        return max(1, min(sequences, self.max_running))

    def queue_full(self, sequences: int = 1) -> bool:
        """True when a request of `sequences` sequences would have to wait and no room is left to."""
        return self._must_wait(self.slots_for(sequences)) and self.waiting >= self.max_queue

    @asynccontextmanager
    async def slot(self, deadline: float | None = None, sequences: int = 1) -> AsyncIterator[None]:
        """Hold the slots of a request of `sequences` sequences; raises ApiError(429) with Retry-After
        when it would wait and the queue is full, and TimeoutError when the loop time `deadline`
        passes while waiting (the request's timeout)."""
        need = self.slots_for(sequences)
        if self.queue_full(sequences):
            raise ApiError(429, f"the server is busy: {self.max_running - self.free} of {self.max_running} "
                                f"sequences running, {self.waiting} requests waiting (queue limit "
                                f"{self.max_queue}); retry later", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.retry_after_s)})
        async with asyncio.timeout_at(deadline):
            await self._acquire(need)
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._release(need)

    def _must_wait(self, need: int) -> bool:
        return bool(self._waiters) or self.free < need

    async def _acquire(self, need: int) -> None:
        if not self._must_wait(need):
            self.free -= need
            return
        granted = asyncio.get_running_loop().create_future()
        waiter = (need, granted)
        self._waiters.append(waiter)
        try:
            await granted
        except BaseException:  # cancelled or timed out while waiting
            if granted.done() and not granted.cancelled():  # granted just as it gave up: hand them back
                self._release(need)
            else:
                if waiter in self._waiters:  # else _grant dropped it already
                    self._waiters.remove(waiter)
                self._grant()  # a request behind it may fit now
            raise

    def _release(self, need: int) -> None:
        self.free += need
        self._grant()

    def _grant(self) -> None:
        """Admit waiting requests, oldest first, while the oldest one fits."""
        while self._waiters and self._waiters[0][0] <= self.free:
            need, granted = self._waiters.popleft()
            if granted.done():  # its waiter was cancelled and has not removed it yet
                continue
            self.free -= need
            granted.set_result(None)
