"""Serving on the devices that are up: a new plan when a device is lost or comes back.

A re-plan (the caller holds the step lock, so no step is in flight) computes the plan over the
devices that are up with the same planner and weights policy, has every worker load its slice of
it (from its checkpoint or split, or fetched from the master) while rank 0 loads its own, and
only then switches to it: a re-plan that fails (a device cannot hold its new slice, another one
went away meanwhile) leaves the old plan in place, and the cluster answers 503 naming the reason
until a device returns. Every open request is then replayed from its tokens (ClusterEngine).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edge.messages import HEARTBEAT_S, Replan, Replanned, receive, send
from edge.planner import Planner
from edge.roster import Roster
from models.sharding import LocalDims, PlanError
from models.threads import to_passing_thread
from transport.errors import TransportError

log = logging.getLogger("edge_llm.master")
REPLAN_TIMEOUT = 600.0  # a worker loading (or fetching) a wider slice
SILENT_S = 4 * HEARTBEAT_S  # a worker without a heartbeat for this long when a step failed is frozen


class ReplanFailed(Exception):
    """The devices that are up cannot serve the model; the message says why."""


@dataclass
class ReplanStats:
    replans: int = 0  # plans adopted after the first
    seconds: float = 0.0  # time they took in all
    last_seconds: float = 0.0
    last_started_at: float = 0.0  # unix time the last re-plan began (right after the loss was noticed)
    last_load_seconds: float = 0.0  # of which loading the new slices (every device at once)
    replayed: int = 0  # requests rebuilt from their tokens on a new plan
    refused: str = ""  # why the last re-plan failed ("" when it did not)


class Replanner:
    """Adopts a plan over the devices that are up. `load_rank0(weights, dims0)` loads rank 0's slice
    without using it yet (returning callables that switch to it or discard it, or raising);
    `adopted(devices)` rewires the collectives and replays every open request."""

    def __init__(self, planner: Planner, roster: Roster, lock: asyncio.Lock,
                 load_rank0: Callable[[list[float], LocalDims], tuple[Callable[[], None], Callable[[], None]]],
                 adopted: Callable[[list[int]], Awaitable[None]]):
        self.planner, self.roster, self._lock = planner, roster, lock
        self._load_rank0, self._adopted = load_rank0, adopted
        self.stats = ReplanStats()
        self.serving = False  # the first plan has served with every device: from then on, re-plan
        self._task: asyncio.Task[None] | None = None  # a re-plan after a loss, run by the engine's loop

    def on_lost(self, device: int) -> None:
        """A worker's link ended: re-plan without it now (no request needs to be in flight)."""
        if self.serving and device in self.planner.devices and self._task is None:
            self._task = asyncio.create_task(self._replan_soon(), name="replan")

    async def _replan_soon(self) -> None:
        try:
            async with self._lock:  # another device lost meanwhile is planned around in the same task
                while self.needed() and await self._replan_live() is None:
                    pass  # a failure: stats.refused says why, /health names the rank
        finally:
            self._task = None

    async def on_joined(self, device: int) -> None:
        """A worker joined (or came back) while serving: re-plan to include it (its KV is new)."""
        async with self._lock:
            await self._replan_live()

    async def settled(self) -> None:
        """Wait for a re-plan in progress (a request arriving meanwhile waits instead of failing)."""
        task = self._task
        if task is not None:
            await asyncio.shield(task)

    def needed(self) -> bool:
        return self.live_devices() != self.planner.devices

    async def recover(self) -> str | None:
        """A step failed on a device (the caller holds the step lock): drop workers that went silent
        (frozen), serve the devices that remain. None when the cluster can retry its requests, else
        why not ("" before the cluster first served with every device: nothing to re-plan from)."""
        if not self.serving:
            return ""
        await self.roster.drop_silent(SILENT_S)
        return await self._replan_live()

    async def _replan_live(self) -> str | None:
        """Re-plan onto the devices that are up; a try that loses another device tries again without
        it. None when serving, else why not."""
        for _ in range(self.roster.world_size):
            devices = self.live_devices()
            try:
                await self.replan()
            except ReplanFailed as e:
                if self.live_devices() == devices:
                    return str(e)
                continue
            return None
        return self.stats.refused

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def live_devices(self) -> list[int]:
        return [d for d in range(self.roster.world_size) if self.roster.up(d)]

    async def replan(self) -> None:
        """Serve the devices that are up now (held by the caller: the step lock); ReplanFailed."""
        began, self.stats.last_started_at = time.perf_counter(), time.time()
        devices = self.live_devices()
        try:
            weights, dims = self.planner.layout(devices)
        except PlanError as e:
            raise self._refuse(f"the {len(devices)} device(s) left cannot split this model: {e}") from e
        epoch = self.planner.epoch + 1
        log.warning("re-planning onto device(s) %s (plan %d)", devices, epoch)
        loads = [to_passing_thread(self._load_rank0, weights, dims[0])]
        loads += [self._replan_worker(device, position, epoch, weights)
                  for position, device in enumerate(devices) if device != 0]
        results = await asyncio.gather(*loads, return_exceptions=True)
        self.stats.last_load_seconds = time.perf_counter() - began
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            if not isinstance(results[0], BaseException):
                results[0][1]()  # rank 0 keeps its old slice
            raise self._refuse("; ".join(str(e) or type(e).__name__ for e in errors)) from errors[0]
        results[0][0]()  # rank 0 switches to its new slice
        self.planner.adopt(devices, weights, dims)
        await self._adopted(devices)
        spent = time.perf_counter() - began
        self.stats.replans += 1
        self.stats.seconds += spent
        self.stats.last_seconds, self.stats.refused = spent, ""
        log.warning("serving plan %d on device(s) %s (re-planned in %.2f s)", epoch, devices, spent)

    def _refuse(self, reason: str) -> ReplanFailed:
        self.stats.refused = reason
        log.error("cannot re-plan: %s", reason)
        return ReplanFailed(reason)

    async def _replan_worker(self, device: int, position: int, epoch: int, weights: list[float]) -> None:
        record = self.roster.records[device]
        ch = record.channel
        plan = await self.planner.plan_message(position, weights, fetch=record.fetches)
        try:
            await send(ch, Replan(epoch, len(weights), position, weights, plan.fetch, plan.config))
            await self.planner.serve_fetch(ch, plan)
            while True:
                done = await receive(ch, Replanned, REPLAN_TIMEOUT)
                if done.epoch == epoch:
                    break
        except TransportError as e:
            raise ReplanFailed(f"rank {device} went away while re-planning ({e})") from e
        if done.error is not None:
            raise ReplanFailed(done.error)
        record.weight_bytes = done.weight_bytes
        if done.fetched_bytes is not None:
            record.fetched = done.fetched_bytes
