"""Worker-to-worker links for `--allreduce ring|auto`: position p dials p+1; the master closes the ring.

Ring of the N devices of the plan served now, by their positions in it: 0 -> 1 -> ... -> N-1 -> 0,
where the links touching position 0 are the workers' channels to the master. The master sends
LinkRing (edge.messages) whenever the plan or the set of workers changes (a re-plan after a loss
renumbers the devices that remain); every worker drops its old peer links, dials its successor,
waits for its predecessor, (for auto) answers the master's link probes, and replies RingLinked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from edge.messages import AttentionLinked, Hello, LinkRing, RingLinked, receive, send
from transport.channel import Channel
from transport.collectives import (
    AutoAllReduce,
    RingAllReduce,
    StarAllReduce,
    StepCollective,
    measure_links,
)
from transport.errors import FrameError
from transport.tcp import ChannelServer, TcpChannel, connect

log = logging.getLogger("edge_llm.ring")
LINK_TIMEOUT = 30.0


class PeerLinks:
    """A worker's listening socket for its ring predecessor and its current peer channels."""

    def __init__(self, rank: int, secret: bytes):
        self.rank, self._secret = rank, secret
        self._accepted: asyncio.Queue[tuple[int, TcpChannel]] = asyncio.Queue()
        self._server = ChannelServer(secret, self._on_channel)
        self.peers: dict[int, TcpChannel] = {}
        self.address: tuple[str, int] | None = None

    async def start(self, host: str) -> tuple[str, int]:
        self.address = (host, await self._server.start(host, 0))
        return self.address

    async def _on_channel(self, ch: TcpChannel) -> None:
        try:
            hello = await receive(ch, Hello, LINK_TIMEOUT)
        except Exception:  # noqa: BLE001 - a peer that never says who it is is simply dropped
            await ch.aclose()
            return
        await self._accepted.put((hello.epoch, ch))

    async def link(self, master: Channel, msg: LinkRing, position: int, world_size: int, star: StarAllReduce,
                   timeout: float) -> StepCollective:
        """Relink for this epoch as `position` of `world_size` (this device's place in the plan) and
        return the collective to use; raises on a broken ring."""
        try:
            epoch, addrs = msg.epoch, {int(k): tuple(v) for k, v in msg.addrs.items()}
        except ValueError as e:
            raise FrameError(f"bad ring link message: {e}") from e
        await self._close_peers()
        self.peers = {0: master}  # type: ignore[dict-item]
        nxt, prev = position + 1, position - 1
        if nxt < world_size:
            host, port = addrs[nxt]
            ch = await connect(host, port, self._secret, timeout=LINK_TIMEOUT)
            await send(ch, Hello(self.rank, epoch))
            self.peers[nxt] = ch
        if prev >= 1:
            async with asyncio.timeout(LINK_TIMEOUT):
                while prev not in self.peers:
                    got_epoch, ch = await self._accepted.get()
                    if got_epoch == epoch:
                        self.peers[prev] = ch
                    else:
                        await ch.aclose()  # a straggler from an older ring
        ring = RingAllReduce(position, world_size, self.peers, timeout)
        if msg.algorithm == "auto":
            model = await measure_links(position, world_size, {0: master}, timeout)
            return StepCollective(star, AutoAllReduce(star, ring, model))
        return StepCollective(star, ring)

    async def _close_peers(self) -> None:
        """Close the worker-to-worker links; the master link (rank 0) belongs to the serve loop."""
        for rank, ch in list(self.peers.items()):
            if rank != 0:
                await ch.aclose()

    async def aclose(self) -> None:
        await self._close_peers()
        await self._server.aclose()


async def link_ring_from_master(workers: Mapping[int, TcpChannel], addrs: dict[int, list], epoch: int,
                                algorithm: str, star: StarAllReduce, timeout: float) -> StepCollective:
    """Master side: ask every worker to relink, probe links for auto, wait for every ring.ok.
    `workers` and `addrs` are keyed by position in the plan."""
    world = star.world_size
    msg = LinkRing(epoch, algorithm, {str(r): list(a) for r, a in addrs.items()})
    for ch in list(workers.values()):
        await send(ch, msg)
    ring = RingAllReduce(0, world, workers, timeout)
    collective = StepCollective(star, ring)
    if algorithm == "auto":
        model = await measure_links(0, world, workers, timeout)
        log.info("link model: alpha %.0f us, %.0f MB/s", model.alpha * 1e6, model.bandwidth / 1e6)
        collective = StepCollective(star, AutoAllReduce(star, ring, model))
    for rank, ch in list(workers.items()):
        await epoch_ack(ch, RingLinked, epoch, rank)
    return collective


async def epoch_ack(ch: TcpChannel, kind: type[RingLinked | AttentionLinked], epoch: int,
                    rank: int) -> RingLinked | AttentionLinked:
    """A worker's answer to a relink of this epoch; answers to older, superseded epochs are skipped.

    Raises FrameError for an answer to an epoch never asked for, TransportError as the channel does.
    """
    while True:
        ok = await receive(ch, kind, LINK_TIMEOUT)
        if ok.epoch == epoch:
            return ok
        if ok.epoch > epoch:
            raise FrameError(f"rank {rank} answered {kind.TAG} for epoch {ok.epoch}, expected {epoch}")
