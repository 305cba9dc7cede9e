"""The Channel interface and the per-tag inbox that TCP and in-memory channels share."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from typing import Any, Protocol

from transport.errors import ChannelClosed, CollectiveTimeout

Message = dict[str, Any]


class Channel(Protocol):
    """One ordered, reliable, authenticated link to one peer."""

    peer: str

    async def send(self, msg: Message) -> None: ...

    async def recv(self, tag: str, timeout: float) -> Message: ...

    async def aclose(self) -> None: ...


class TaggedInbox:
    """Incoming messages sorted by tag `t`, so control and collective traffic share one ordered link."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Message]] = defaultdict(deque)
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self.closed_reason: str | None = None

    def deliver(self, msg: Message) -> None:
        tag = msg["t"]
        self._queues[tag].append(msg)
        waiter = self._waiters.pop(tag, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def get(self, tag: str, timeout: float, peer: str) -> Message:
        """Next message with this tag; CollectiveTimeout after `timeout` s, ChannelClosed if the link dies.

        One future and one timer handle per wait (no asyncio.timeout/shield): this is the hot path
        of every all-reduce.
        """
        queue = self._queues[tag]
        if queue:
            return queue.popleft()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not queue:
            if self.closed_reason is not None:
                raise ChannelClosed(f"link to {peer} closed: {self.closed_reason}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise CollectiveTimeout(f"no {tag!r} message from {peer} within {timeout:.1f}s")
            waiter = self._waiters[tag] = loop.create_future()
            timer = loop.call_later(remaining, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                if self._waiters.get(tag) is waiter:
                    del self._waiters[tag]
        return queue.popleft()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
