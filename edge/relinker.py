"""Keeps the links between ranks matched to who is up: the all-reduce ring (`--allreduce ring|auto`)
over the devices of the plan served now, and every rank's links to the attention nodes, each
relinked under a new epoch when a worker or a node (re)joins or a re-plan changes the devices.
Relinking holds the step lock, so no step runs on a half-built set of links.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from edge.attention_pool import AttentionPool
from edge.ring import link_ring_from_master
from edge.roster import ByPosition, Roster
from models.sharding import LocalDims
from transport.collectives import StarAllReduce, StepCollective
from transport.errors import TransportError

log = logging.getLogger("edge_llm.master")


class Relinker:
    """Owns `collective` (what rank 0's forward all-reduces with) and whether the ring is whole."""

    def __init__(self, roster: Roster, algorithm: str, timeout: float, attention: AttentionPool | None,
                 lock: asyncio.Lock, rank0_dims: Callable[[], LocalDims], missing_ranks: Callable[[], list[int]],
                 devices: Callable[[], list[int]]):
        self.roster, self.algorithm, self.timeout = roster, algorithm, timeout
        self.attention, self._lock, self._rank0_dims = attention, lock, rank0_dims
        self._devices = devices  # the plan's devices, by position (the ring's order)
        self._missing_ranks = missing_ranks  # the cluster's: workers, rank 0's plan, the ring
        self.ring_ok = algorithm == "star" or roster.world_size == 1
        self._epoch = 0

    def rewire(self, star: StarAllReduce) -> None:
        """The star of the plan served now (a re-plan makes a new one)."""
        self.star, self.collective = star, StepCollective(star)

    async def after_join(self) -> None:
        """A worker (re)joined: relink the ring (if any) and the attention nodes."""
        if self.algorithm != "star":
            await self.link_ring()
        await self.link_attention()

    async def link_ring(self) -> None:
        """(Re)build the worker ring once every worker of the plan is connected; until then the
        cluster is down."""
        self.ring_ok = False
        if self.roster.missing(self._devices()):
            return
        async with self._lock:
            await self.relink_ring()

    async def relink_ring(self) -> None:
        """Link the ring over the plan's devices in their positions; the caller holds the step lock
        (a re-plan adopting a plan does)."""
        self.ring_ok = False
        devices = self._devices()
        self._epoch += 1
        listen = {p: self.roster.records[d].listen for p, d in enumerate(devices) if p > 0}
        try:
            self.collective = await link_ring_from_master(ByPosition(self.roster.channels, devices), listen,
                                                          self._epoch, self.algorithm, self.star, self.timeout)
        except (TransportError, TimeoutError, KeyError) as e:
            log.warning("could not link the ring: %s", e)
            return
        self.ring_ok = True
        log.info("ring linked over device(s) %s (epoch %d, %s)", devices, self._epoch, self.algorithm)

    async def link_attention(self) -> None:
        """Link every rank to the attention nodes once all ranks and nodes are up (else wait)."""
        if self.attention is None or self.attention.missing() or self._missing_ranks():
            return
        async with self._lock:
            await self.attention.link(self.roster.channels, self._rank0_dims())
