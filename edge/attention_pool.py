"""The master's view of the attention nodes: who is up, their counters, and linking the ranks to them.

The offload route is available only while every configured node is connected, heartbeating,
and linked to every compute rank under the current epoch. A node that comes back (or a worker
that rejoins) triggers a relink with a new epoch, after which offload is used again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from edge.messages import (
    AttentionLinked,
    Join,
    LinkAttention,
    NodePlan,
    NodeStats,
    Refused,
    receive,
    send,
)
from edge.offload import AttentionLinks
from edge.profile import kv_room
from edge.ring import epoch_ack
from models.config import LlamaConfig
from models.sharding import LocalDims, attention_nodes_of
from transport.errors import TransportError
from transport.link import LinkSpec
from transport.tcp import TcpChannel

log = logging.getLogger("edge_llm.attention_pool")
HEARTBEAT_TIMEOUT = 5.0


class AttentionPool:
    """Attention nodes 0..K-1 as seen from rank 0; `links` are rank 0's own channels to them."""

    def __init__(self, model: str, config: LlamaConfig, n_nodes: int, secret: bytes, link: LinkSpec | None,
                 timeout: float):
        attention_nodes_of(config, n_nodes)  # PlanError at start for an impossible node count
        self.model, self.config, self.n_nodes = model, config, n_nodes
        self.secret, self.link_spec, self.timeout = secret, link, timeout
        self.nodes: dict[int, TcpChannel] = {}
        self.listen: dict[int, list] = {}
        self.stats: dict[int, dict] = {}
        self.links: AttentionLinks | None = None
        self.linked = False
        self.epoch = 0
        self.lost = 0  # nodes lost while serving (heartbeat or link failures)

    def missing(self) -> list[int]:
        return [n for n in range(self.n_nodes) if n not in self.nodes or self.nodes[n].closed]

    @property
    def ready(self) -> bool:
        return self.linked and not self.missing() and self.links is not None and self.links.up

    async def serve_node(self, ch: TcpChannel, join: Join, relink: Callable[[], Awaitable[None]]) -> None:
        """Own one node's control channel: plan, then heartbeats until it stops; relink on arrival."""
        node = join.node
        if node is None or not 0 <= node < self.n_nodes:
            await send(ch, Refused(f"attention node {node!r} is not in 0..{self.n_nodes - 1}"))
            return
        config = json.loads((Path(self.model) / "config.json").read_text())
        await send(ch, NodePlan(config, self.n_nodes))
        old = self.nodes.get(node)
        self.nodes[node], self.listen[node] = ch, list(join.listen or [])
        if old is not None:
            await old.aclose()
        log.info("attention node %d joined (%s)", node, ch.peer)
        await relink()
        try:
            while True:
                self.stats[node] = vars(await receive(ch, NodeStats, HEARTBEAT_TIMEOUT))
        except TransportError as e:
            log.warning("attention node %d lost: %s", node, e)
            self.lost += 1
        finally:
            if self.nodes.get(node) is ch:
                self.linked = False
            await ch.aclose()

    async def link(self, workers: dict[int, TcpChannel], dims0: LocalDims) -> None:
        """Link rank 0 and every worker to the nodes for a new epoch (caller holds the step lock)."""
        self.linked = False
        if self.missing():
            return
        self.epoch += 1
        addrs = {n: self.listen[n] for n in range(self.n_nodes)}
        msg = LinkAttention(self.epoch, self.n_nodes, {str(n): a for n, a in addrs.items()})
        if self.links is not None:
            await self.links.aclose()
            self.links = None
        try:
            for ch in list(workers.values()):
                await send(ch, msg)
            self.links = await AttentionLinks.connect(self.config, dims0, self.n_nodes, addrs, self.epoch,
                                                      self.secret, self.link_spec, self.timeout)
            for rank, ch in list(workers.items()):
                await self._linked(rank, ch)
        except (OSError, TimeoutError, TransportError, ValueError) as e:
            log.warning("could not link the attention nodes (epoch %d): %s", self.epoch, e)
            return
        self.linked = True
        log.info("attention nodes linked (epoch %d, %d node(s))", self.epoch, self.n_nodes)

    async def _linked(self, rank: int, ch: TcpChannel) -> None:
        ok = await epoch_ack(ch, AttentionLinked, self.epoch, rank)
        if isinstance(ok, AttentionLinked) and ok.error is not None:
            raise TransportError(f"rank {rank} cannot reach the attention nodes: {ok.error}")

    def free_kv_bytes(self) -> int:
        """What one request's KV could take on the nodes: the tightest node's free memory scaled by
        its share of the KV heads (0 while any node is missing)."""
        if not self.ready:
            return 0
        heads = attention_nodes_of(self.config, self.n_nodes)
        free = {n: self.stats.get(n, {}).get("available") for n in range(self.n_nodes)}
        if any(f is None for f in free.values()):
            return 0
        return kv_room(free, {n: heads.count(n) for n in range(self.n_nodes)})

    def snapshot(self) -> dict:
        return {"nodes": self.n_nodes, "ready": self.ready, "missing": self.missing(), "lost": self.lost,
                "stats": dict(self.stats),
                "rank0_wait_s": self.links.wait_s if self.links else 0.0,
                "rank0_round_trips": self.links.round_trips if self.links else 0,
                "rank0_links": self.links.link_bytes() if self.links else {}}

    async def aclose(self) -> None:
        if self.links is not None:
            await self.links.aclose()
        for ch in list(self.nodes.values()):
            await ch.aclose()
