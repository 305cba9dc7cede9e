"""Who takes part in the cluster: each worker's join (checked, planned, loaded), its heartbeats and
its links, as one record per rank.

A worker joins on the control channel: Join -> Plan (or Refused) -> [shard fetch] -> Ready,
then heartbeats until it leaves; silence for HEARTBEAT_TIMEOUT drops its link, so requests fail
fast and /health names it until it joins again. Its all-reduce data link (transport.fastpath)
arrives separately and is matched by rank.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from edge.messages import HEARTBEAT_TIMEOUT, Heartbeat, Join, Message, Ready, Refused, receive, send
from edge.planner import Planner
from models.engine import EngineUnavailable
from transport.errors import FrameError, TransportError
from transport.fastpath import DataLink, DataServer
from transport.link import LinkSpec
from transport.tcp import ChannelServer, TcpChannel

log = logging.getLogger("edge_llm.master")
JOIN_TIMEOUT, READY_TIMEOUT = 10.0, 600.0  # the second covers loading (or fetching) a slice


@dataclass
class RankRecord:
    """What the master knows of one worker since it last joined."""

    channel: TcpChannel
    listen: list  # where it accepts its ring predecessor
    weight_bytes: int = 0  # resident weights
    fixed_rss: int = 0  # its RSS before weights
    fetched: int = 0  # shard bytes it fetched from us when it joined or last re-planned
    free_bytes: int | None = None  # free memory: at join, then reported with every step
    fetches: bool = False  # it has no checkpoint: it fetches its slices from the master
    budget_bytes: int | None = None  # its memory budget (None: resident)
    last_seen: float = field(default_factory=time.monotonic)  # its last heartbeat

    @property
    def up(self) -> bool:
        return not self.channel.closed


T = TypeVar("T")


class ByPosition(Mapping[int, T]):
    """A map by device seen by plan position (what the all-reduces index): position p is device
    devices[p]; position 0 (the master itself) and devices without an entry are absent."""

    def __init__(self, by_device: Mapping[int, T], devices: list[int]):
        self._by_device, self._devices = by_device, list(devices)

    def __getitem__(self, position: int) -> T:
        if not 0 < position < len(self._devices):
            raise KeyError(position)
        return self._by_device[self._devices[position]]

    def __iter__(self) -> Iterator[int]:
        return (p for p in range(1, len(self._devices)) if self._devices[p] in self._by_device)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Roster:
    """Ranks 1..N-1 as rank 0 sees them. `channels` and `data_links` are the live maps the
    all-reduces send on (they change as workers come and go)."""

    def __init__(self, world_size: int, fingerprint: str, secret: bytes, link: LinkSpec | None,
                 planner: Planner, on_ready: Callable[[int], Awaitable[None]],
                 on_attention_node: Callable[[TcpChannel, Join], Awaitable[None]],
                 data_plane: bool, step_timeout: float, on_lost: Callable[[int], None] = lambda _: None):
        self.world_size, self.fingerprint, self.planner = world_size, fingerprint, planner
        self._on_ready, self._on_attention_node, self._on_lost = on_ready, on_attention_node, on_lost
        self.records: dict[int, RankRecord] = {}
        self.channels: dict[int, TcpChannel] = {}
        self.data_links: dict[int, DataLink] = {}
        self._server = ChannelServer(secret, self.admit, link)
        self._data_server = DataServer(secret, step_timeout, self._add_data_link) if data_plane else None
        self._data_task: asyncio.Task[None] | None = None
        self.data_port: int | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen for workers (and their data links); returns the control port."""
        if self._data_server is not None:
            self.data_port = self._data_server.start(host)
            self._data_task = asyncio.create_task(self._data_server.serve(), name="data-links")
        return await self._server.start(host, port)

    def missing(self, devices: list[int] | None = None) -> list[int]:
        """Workers (of `devices`, default all) not connected now."""
        devices = range(1, self.world_size) if devices is None else [d for d in devices if d != 0]
        return [r for r in devices if not self.up(r)]

    def up(self, device: int) -> bool:
        return device == 0 or (device in self.records and self.records[device].up)

    def device_table(self) -> dict[int, dict]:
        """Per worker that ever joined: where it is, whether its link is up, its heartbeat's age."""
        now = time.monotonic()
        return {r: {"host": rec.channel.peer, "up": rec.up, "heartbeat_age_s": round(now - rec.last_seen, 3),
                    "budget_bytes": rec.budget_bytes} for r, rec in self.records.items()}

    def data_plane_up(self, devices: list[int]) -> bool:
        """Whether a step's all-reduces can use the data plane: every worker of `devices` has a live
        data link."""
        return self._data_server is not None and all(
            d in self.data_links and not self.data_links[d].closed for d in devices if d != 0)

    async def drop_silent(self, max_age: float) -> list[int]:
        """Drop the links of workers whose last heartbeat is older than `max_age` seconds (frozen:
        a step timed out waiting for them); returns them."""
        now = time.monotonic()
        silent = [d for d, rec in self.records.items() if rec.up and now - rec.last_seen > max_age]
        for d in silent:
            log.warning("rank %d sent no heartbeat for %.1f s; dropping its link", d, now - self.records[d].last_seen)
            await self.records[d].channel.aclose()
        return silent

    async def command(self, msg: Message, devices: list[int], ignore_errors: bool = False) -> None:
        """Send a command to every worker of `devices` (the plan served); EngineUnavailable names
        one that is gone."""
        for rank in devices:
            ch = self.channels.get(rank)
            if ch is None:
                continue
            try:
                await send(ch, msg)
            except TransportError as e:
                if not ignore_errors:
                    raise EngineUnavailable(f"worker rank {rank} is unavailable: {e}") from e

    async def admit(self, ch: TcpChannel) -> None:
        """A device's control channel, for as long as it stays: join, plan, ready, heartbeats."""
        try:
            join = await receive(ch, Join, JOIN_TIMEOUT)
            if join.role == "attention":
                await self._on_attention_node(ch, join)
                return
            rank = join.rank if join.rank is not None else self._free_rank()
            error = self._refusal(rank, join)
            if error:
                log.error("refusing worker %s: %s", ch.peer, error)
                await send(ch, Refused(error))
                return
            plan = await self.planner.plan_for(rank, join.profile, fetch=join.fingerprint is None)
            plan = replace(plan, data_port=self.data_port, rank=rank)
            await send(ch, plan)
            await self.planner.serve_fetch(ch, plan)
            ready = await receive(ch, Ready, READY_TIMEOUT)
        except TransportError as e:
            log.warning("worker %s failed to join: %s", ch.peer, e)
            return
        await self._enlist(rank, ch, join, ready)
        await self._on_ready(rank)
        await self._watch(rank, ch)

    def _free_rank(self) -> int | None:
        """The lowest worker rank nobody holds now: for a device started without --rank."""
        return next((r for r in range(1, self.world_size) if not self.up(r)), None)

    def _refusal(self, rank: int | None, join: Join) -> str | None:
        if rank is None:
            return f"every worker rank (1..{self.world_size - 1}) is taken; this cluster has {self.world_size} devices"
        if not 0 < rank < self.world_size:
            return f"rank {rank!r} is not in 1..{self.world_size - 1}"
        if join.fingerprint not in (self.fingerprint, None):
            return (f"rank {rank}'s checkpoint differs from the master's "
                    f"({join.fingerprint} != {self.fingerprint}); give every device the same model")
        return None

    async def _enlist(self, rank: int, ch: TcpChannel, join: Join, ready: Ready) -> None:
        free = (join.profile or {}).get("free_bytes")
        old = self.records.get(rank)
        self.records[rank] = RankRecord(ch, list(join.listen or []), ready.weight_bytes, ready.fixed_rss_bytes,
                                        ready.fetched_bytes, int(free) if isinstance(free, int | float) else None,
                                        fetches=join.fingerprint is None, budget_bytes=ready.budget_bytes)
        self.channels[rank] = ch
        if old is not None:
            await old.channel.aclose()
        log.info("rank %d ready (%s)", rank, ch.peer)

    async def _watch(self, rank: int, ch: TcpChannel) -> None:
        """Hold a worker's link while its heartbeats come; a silent (frozen) worker is dropped. Either
        way, a link that ends is reported (on_lost) unless the worker has joined again meanwhile."""
        try:
            while True:
                await receive(ch, Heartbeat, HEARTBEAT_TIMEOUT)
                self.records[rank].last_seen = time.monotonic()
        except TransportError as e:
            if self.channels.get(rank) is ch and not ch.closed:
                log.warning("rank %d went silent (%s); dropping its link until it rejoins", rank, e)
                await ch.aclose()
        if self.channels.get(rank) is ch:
            self._on_lost(rank)

    def _add_data_link(self, rank: int, link: DataLink) -> None:
        """A worker's data link (authenticated): it replaces the rank's old one."""
        if not 0 < rank < self.world_size:
            raise FrameError(f"data link for rank {rank!r}, not in 1..{self.world_size - 1}")
        old = self.data_links.pop(rank, None)
        if old is not None:
            old.close()
        self.data_links[rank] = link

    async def aclose(self) -> None:
        if self._data_task is not None:
            self._data_task.cancel()
            await asyncio.gather(self._data_task, return_exceptions=True)
        if self._data_server is not None:
            self._data_server.close()
        for link in list(self.data_links.values()):
            link.close()
        await self._server.aclose()
        for ch in list(self.channels.values()):
            await ch.aclose()
