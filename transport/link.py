"""Link emulation in wall time: one-way latency, a bandwidth cap and jitter on the sending side.

Delays are asyncio sleeps, never busy waits, so compute overlapping a slow link really overlaps.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkSpec:
    """Emulated link properties for one direction; zeros mean 'as fast as loopback'."""

    latency_ms: float = 0.0
    bandwidth_mbps: float = 0.0
    jitter_ms: float = 0.0

    @property
    def active(self) -> bool:
        return self.latency_ms > 0 or self.bandwidth_mbps > 0 or self.jitter_ms > 0


class Uplink:
    """A device's network interface: every link leaving one device shares its bandwidth.

    So a star hub that sends N-1 sums pays for N-1 transfers, as it would on a real NIC.
    """

    def __init__(self) -> None:
        self.free_at = 0.0


class DelayedWriter:
    """Writes each frame once the emulated link would have delivered it, keeping frame order.

    Bandwidth is a leaky bucket on bytes: a frame occupies the sender's uplink for size / bandwidth
    after the previous frame left, then arrives one latency (+- jitter) later.
    """

    def __init__(self, write: Callable[[bytes], None], spec: LinkSpec, seed: int = 0,
                 uplink: Uplink | None = None):
        self._write, self._spec = write, spec
        self._rng = random.Random(seed)
        self._queue: deque[tuple[float, bytes]] = deque()
        self._uplink = uplink or Uplink()
        self._last_delivery = 0.0
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._pump())
        self.bytes_sent = 0

    def submit(self, data: bytes) -> None:
        now = asyncio.get_running_loop().time()
        start = max(now, self._uplink.free_at)
        bw = self._spec.bandwidth_mbps
        self._uplink.free_at = start + (len(data) * 8 / (bw * 1e6) if bw > 0 else 0.0)
        jitter = self._spec.jitter_ms * (2 * self._rng.random() - 1)
        deliver = self._uplink.free_at + max(0.0, self._spec.latency_ms + jitter) / 1000
        self._last_delivery = max(deliver, self._last_delivery)  # never reorder
        self._queue.append((self._last_delivery, data))
        self.bytes_sent += len(data)
        self._wakeup.set()

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            deliver, data = self._queue[0]
            delay = deliver - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._queue.popleft()
            self._write(data)

    async def aclose(self, flush_timeout: float = 5.0) -> None:
        """Deliver what is already on the emulated wire (a real link would), then stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_timeout
        while self._queue and loop.time() < deadline and not self._task.done():
            await asyncio.sleep(max(0.0, min(self._queue[-1][0] - loop.time(), 0.05)) or 0.001)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
