"""An attention node (`edge-llm worker --role attention`): holds KV caches, computes attention.

Lamina-style offload: compute ranks keep their memory for weights; this node keeps the keys and
values of the KV heads assigned to it (models.sharding.attention_nodes_of) for every offloaded
request, and answers each layer's q, k, v with softmax(qK^T)V (edge/offload.py has the wire
format). It needs no checkpoint: the master sends config.json when it joins.

Protocol on the channel to the master (tags):
  join   node -> master  {role: attention, node, listen}
  plan   master -> node  {config, nodes} or {error}
  stats  node -> master  {kv_bytes, rss, requests, links}   every `stats_interval` s (a heartbeat)
A node whose master goes away rejoins; a restarted node is linked again by the master.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from edge.messages import Hello, Join, NodePlan, NodeStats, Refused, receive, receive_plan, send
from edge.rejoin import MASTER_GONE_S, stay_joined
from models.attention import CacheAttention, KVCache
from models.config import LlamaConfig, config_from_hf
from transport.codec import pack_array, unpack_array
from transport.errors import FrameError, TransportError
from transport.link import LinkSpec
from transport.tcp import ChannelServer, TcpChannel, connect

log = logging.getLogger("edge_llm.attention")
IDLE_TIMEOUT = 3600.0


class NodeRefused(Exception):
    """The master refused this attention node (bad index); fatal, exit 2."""


@dataclass(frozen=True)
class AttentionNodeSettings:
    node: int
    master_host: str
    master_port: int
    secret: bytes
    link: LinkSpec | None = None
    stats_interval: float = 0.5
    master_timeout: float = MASTER_GONE_S  # give up after the master is unreachable this long


@dataclass
class _Request:
    kv: KVCache
    next_layer: int = 0


class AttentionNode:
    """One attention node: per compute rank, per request KV caches for the heads it holds."""

    def __init__(self, settings: AttentionNodeSettings):
        self.settings = settings
        self.config: LlamaConfig | None = None
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attention")
        self.requests: dict[int, dict[str, _Request]] = {}  # rank -> rid -> its KV here
        self.peers: dict[int, TcpChannel] = {}
        self._server = ChannelServer(settings.secret, self._on_rank, settings.link)
        self.address: tuple[str, int] | None = None
        self.fixed_rss = psutil.Process().memory_info().rss

    def kv_bytes(self) -> int:
        """Bytes of keys and values held (filled positions, not reserved capacity)."""
        return sum(r.kv.used_bytes() for reqs in self.requests.values() for r in reqs.values())

    def stats(self) -> NodeStats:
        return NodeStats(kv_bytes=self.kv_bytes(), rss=psutil.Process().memory_info().rss, fixed_rss=self.fixed_rss,
                         available=psutil.virtual_memory().available,
                         requests=sum(len(r) for r in self.requests.values()),
                         links={str(r): {"sent": ch.bytes_sent, "received": ch.bytes_received}
                                for r, ch in self.peers.items()})

    async def _join(self) -> TcpChannel:
        s = self.settings
        ch = await connect(s.master_host, s.master_port, s.secret, link=s.link, timeout=5.0)
        if self.address is None:  # listen where the master's network reaches us
            self.address = (ch.local_host, await self._server.start(ch.local_host, 0))
        await send(ch, Join(role="attention", node=s.node, listen=list(self.address)))
        plan = await receive_plan(ch, NodePlan, 60.0)
        if isinstance(plan, Refused):
            raise NodeRefused(plan.error)
        config = config_from_hf(plan.config)
        if config != self.config:
            self.requests.clear()
            self.config = config
        log.info("attention node %d joined the master; compute ranks reach it at %s", s.node, self.address)
        return ch

    async def _report(self, ch: TcpChannel) -> None:
        """Heartbeat with counters until the master's channel closes (raises ChannelClosed)."""
        while True:
            await send(ch, self.stats())
            await asyncio.sleep(self.settings.stats_interval)

    async def run(self) -> None:
        """Join, report, rejoin after the master disappears; NodeRefused ends it."""
        try:
            await stay_joined(self._join, self._report, f"attention node {self.settings.node}",
                              self.settings.master_timeout)
        finally:
            await self._server.aclose()
            self.compute.shutdown(wait=False, cancel_futures=True)

    async def _on_rank(self, ch: TcpChannel) -> None:
        """Serve one compute rank's channel: a step gets an answer (or an error), close frees."""
        try:
            rank = (await receive(ch, Hello, 30.0)).rank
        except TransportError as e:
            log.warning("dropping %s: no valid hello (%s)", ch.peer, e)
            await ch.aclose()
            return
        old = self.peers.get(rank)
        if old is not None:
            await old.aclose()
        self.peers[rank] = ch
        requests = self.requests[rank] = {}  # a relinked rank starts over (its master replays)
        loop = asyncio.get_running_loop()
        try:
            while True:
                msg = await ch.recv("attn", IDLE_TIMEOUT)
                if msg.get("op") == "close":
                    requests.pop(str(msg.get("rid")), None)
                    continue
                try:
                    out = await loop.run_in_executor(self.compute, self._attend, requests, msg)
                except (FrameError, ValueError, KeyError, TypeError, RuntimeError) as e:
                    await ch.send({"t": "attn.out", "n": msg.get("n"), "error": f"{type(e).__name__}: {e}"})
                    continue
                await ch.send({"t": "attn.out", "n": msg.get("n"), "o": pack_array(out)})
        except TransportError as e:
            log.info("rank %d's channel ended: %s", rank, e)
        finally:
            if self.peers.get(rank) is ch:
                del self.peers[rank]
                self.requests.pop(rank, None)
            await ch.aclose()

    def _attend(self, requests: dict[str, _Request], msg: dict) -> np.ndarray:
        """One layer of one request: append k, v, attend -> [1, H, S, hd]; raises on a bad message."""
        config = self.config
        assert config is not None
        rid, layer, start = str(msg["rid"]), int(msg["layer"]), int(msg["start"])
        q, k, v = (torch.from_numpy(unpack_array(msg[n]).copy()) for n in ("q", "k", "v"))
        kv_map = tuple(int(i) for i in msg["map"]) if "map" in msg else None
        _check_shapes(config, q, k, v, kv_map, start)
        req = requests.get(rid)
        if req is None:
            if start != 0 or layer != 0:
                raise ValueError(f"request {rid} is unknown here (KV lost?); it must restart at position 0")
            capacity = min(max(int(msg.get("cap", 0)), k.shape[2]), config.max_position_embeddings)
            req = requests[rid] = _Request(KVCache(config.num_layers, k.shape[1], config.head_dim, capacity))
        if layer == 0 and req.next_layer == 0 and start < req.kv.length:
            req.kv.rewind(start)  # the positions from `start` on held drafted tokens the model rejected
        if start != req.kv.length or layer != req.next_layer:
            raise ValueError(f"request {rid}: got layer {layer} at position {start}, expected layer "
                             f"{req.next_layer} at position {req.kv.length}")
        with torch.inference_mode():
            out = CacheAttention(req.kv, config, kv_map, q.shape[2])(layer, q, k, v)  # [1, H, S, hd]
        req.next_layer = (layer + 1) % config.num_layers
        if req.next_layer == 0:
            req.kv.advance(q.shape[2])
        return out.contiguous().numpy()


def _check_shapes(config: LlamaConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  kv_map: tuple[int, ...] | None, start: int) -> None:
    """q [1, H, S, hd], k = v [1, KV, S, hd] with a consistent grouping and room in the context."""
    hd = config.head_dim
    if q.dim() != 4 or q.shape[0] != 1 or q.shape[3] != hd or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"bad shapes q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} (head_dim {hd})")
    if k.shape[0] != 1 or k.shape[2] != q.shape[2] or k.shape[3] != hd or k.shape[1] == 0:
        raise ValueError(f"k {list(k.shape)} does not match q {list(q.shape)}")
    if kv_map is None and q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not group over {k.shape[1]} KV heads")
    if kv_map is not None and (len(kv_map) != q.shape[1] or not all(0 <= i < k.shape[1] for i in kv_map)):
        raise ValueError(f"map {list(kv_map)} does not fit {q.shape[1]} query / {k.shape[1]} KV heads")
    if start < 0 or start + q.shape[2] > config.max_position_embeddings:
        raise ValueError(f"positions {start}..{start + q.shape[2]} exceed the context of "
                         f"{config.max_position_embeddings}")
