"""Compute-rank side of attention offload (Lamina): KV caches live on attention nodes.

Per layer a compute rank sends each attention node the new token's q, k, v for the heads whose
KV head that node holds, and gets the attention output back: one round trip per layer, all
nodes in parallel. On the wire per layer and token, summed over ranks: q and the attention
output (hidden each) plus k and v (hidden / G each), i.e. (2 + 2/G) x hidden x 4 bytes.

Messages on a rank's channel to a node:
  iam       rank -> node  {rank, epoch}                    once, after connecting
  attn      rank -> node  {op: step, n, rid, layer, start, cap, q, k, v, map?}
                          {op: close, rid}
  attn.out  node -> rank  {n, o} or {n, error}             one per step message, in order
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from edge.messages import Hello, send
from models.attention import Attend
from models.config import LlamaConfig
from models.llama import batch_attend
from models.sharding import AttentionSlice, LocalDims, attention_nodes_of, attention_slices
from transport.codec import pack_array, unpack_array
from transport.errors import FrameError, TransportError
from transport.link import LinkSpec
from transport.tcp import TcpChannel, connect

log = logging.getLogger("edge_llm.offload")
LINK_TIMEOUT = 30.0


class AttentionNodeFailed(TransportError):
    """An attention node died, timed out or refused a step; the request's KV there is lost.

    A worker reports it to the hub with FailureCause.ATTENTION, so the master rebuilds the request.
    """

    def __init__(self, node: int, reason: str):
        super().__init__(f"attention node {node}: {reason}")
        self.node = node


@dataclass(frozen=True)
class Row:
    """One request's new q, k, v of one layer, for the attention nodes."""

    rid: str
    layer: int
    start: int
    cap: int
    q: np.ndarray  # [1, H, S, hd]
    k: np.ndarray  # [1, KV, S, hd]
    v: np.ndarray


class AttentionLinks:
    """One compute rank's channels to the attention nodes and the slices of its heads each one holds.

    `attend` runs on the event loop; `wait_s` and `round_trips` count how long the compute
    thread waited on attention round trips (the part of the round trip nothing overlapped).
    """

    def __init__(self, dims: LocalDims, slices: list[AttentionSlice], channels: dict[int, TcpChannel],
                 epoch: int, timeout: float):
        self.dims, self.slices, self.channels = dims, slices, channels
        self.epoch, self.timeout = epoch, timeout
        self.wait_s = 0.0
        self.round_trips = 0
        self._next_id = 0  # numbers step messages; a node's answer carries the number it answers

    @classmethod
    async def connect(cls, config: LlamaConfig, dims: LocalDims, n_nodes: int, addrs: dict[int, list],
                      epoch: int, secret: bytes, link: LinkSpec | None, timeout: float) -> AttentionLinks:
        """Dial every node this rank's heads need; raises OSError / TransportError / TimeoutError."""
        slices = attention_slices(dims, attention_nodes_of(config, n_nodes))
        channels: dict[int, TcpChannel] = {}
        try:
            for node in sorted({s.node for s in slices}):
                host, port = addrs[node]
                ch = await connect(host, int(port), secret, link=link, timeout=LINK_TIMEOUT)
                channels[node] = ch
                await send(ch, Hello(dims.rank, epoch))
        except BaseException:
            for ch in channels.values():
                await ch.aclose()
            raise
        return cls(dims, slices, channels, epoch, timeout)

    @property
    def up(self) -> bool:
        return all(not ch.closed for ch in self.channels.values())

    def link_bytes(self) -> dict[int, dict[str, int]]:
        return {n: {"sent": ch.bytes_sent, "received": ch.bytes_received} for n, ch in self.channels.items()}

    async def attend_many(self, rows: list[Row]) -> list[np.ndarray]:
        """Per row (one request): q [1, H, S, hd], k, v [1, KV, S, hd] -> attention output [1, H, S, hd].

        Every message of every row goes out before any answer is awaited: one round trip per layer
        for the whole batch. Each node answers in the order it was asked.
        """
        first = self._next_id
        for row in rows:
            for s in self.slices:
                msg = {"t": "attn", "op": "step", "n": self._next_id, "rid": row.rid, "layer": row.layer,
                       "start": row.start, "cap": row.cap, "q": pack_array(row.q[:, s.q_start:s.q_stop]),
                       "k": pack_array(row.k[:, s.kv_start:s.kv_stop]), "v": pack_array(row.v[:, s.kv_start:s.kv_stop])}
                if s.kv_map is not None:
                    msg["map"] = list(s.kv_map)
                self._next_id += 1
                await self._send(s.node, msg)
        outs, n = [], first
        for row in rows:
            parts = []
            for s in self.slices:
                expected = (1, s.q_stop - s.q_start, row.q.shape[2], row.q.shape[3])
                parts.append(await self._answer(s.node, n, expected))
                n += 1
            outs.append(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))
        return outs

    def call(self, loop: asyncio.AbstractEventLoop, rows: list[Row]) -> list[torch.Tensor]:
        """From the compute thread: one round trip on the event loop; counts the time it waited."""
        began = time.perf_counter()
        outs = asyncio.run_coroutine_threadsafe(self.attend_many(rows), loop).result(self.timeout + 1.0)
        self.wait_s += time.perf_counter() - began
        self.round_trips += 1
        return [torch.from_numpy(o if o.flags.writeable else o.copy()) for o in outs]

    async def _send(self, node: int, msg: dict) -> None:
        try:
            await self.channels[node].send(msg)
        except TransportError as e:
            raise AttentionNodeFailed(node, str(e)) from e

    async def _answer(self, node: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
        """The node's answer to message `n`; answers to older messages (left by a step that timed
        out) are skipped. Raises AttentionNodeFailed."""
        try:
            while True:
                reply = await self.channels[node].recv("attn.out", self.timeout)
                got = reply.get("n")
                if not isinstance(got, int) or got > n:
                    raise FrameError(f"answer to message {got!r} while waiting for {n}")
                if got == n:
                    break
            if "error" in reply:
                raise AttentionNodeFailed(node, str(reply["error"]))
            out = unpack_array(reply["o"])
            if out.shape != shape:
                raise FrameError(f"attention output of shape {out.shape}, expected {shape}")
            return out
        except (TransportError, KeyError) as e:
            if isinstance(e, AttentionNodeFailed):
                raise
            raise AttentionNodeFailed(node, str(e) or type(e).__name__) from e

    async def close_request(self, rid: str) -> None:
        """Free a request's KV on the nodes; a node that is gone has nothing left to free."""
        for node, ch in self.channels.items():
            try:
                await ch.send({"t": "attn", "op": "close", "rid": rid})
            except TransportError:
                log.debug("attention node %d gone while closing %s", node, rid)

    async def aclose(self) -> None:
        for ch in self.channels.values():
            await ch.aclose()


def _wire(t: torch.Tensor) -> np.ndarray:
    """q, k or v for an attention node, in float32: nodes keep KV and attend in float32 whatever
    the weight dtype (bf16/fp16 activations are upcast exactly)."""
    return t.float().numpy()


class RemoteKV:
    """A request's KV store on the attention nodes (models.llama.KVStore): only the length is local."""

    def __init__(self, links: AttentionLinks, rid: str, capacity: int, loop: asyncio.AbstractEventLoop):
        self.links, self.rid, self.capacity, self.loop = links, rid, capacity, loop
        self.length = 0

    def attend_for(self, config: LlamaConfig, dims: LocalDims, seqlen: int) -> Attend:
        start = self.length

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            row = Row(self.rid, layer, start, self.capacity, _wire(q), _wire(k), _wire(v))
            return self.links.call(self.loop, [row])[0].to(q.dtype)  # [1, H, S, hd]

        return attend

    def advance(self, seqlen: int) -> None:
        self.length += seqlen

    def rewind(self, length: int) -> None:
        """Forget positions from `length` on: the nodes rewind when a step starts there (layer 0)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind offloaded KV of {self.length} positions to {length}")
        self.length = length

    async def close(self) -> None:
        await self.links.close_request(self.rid)


def batch_attend_for(kvs: list, config: LlamaConfig, dims: LocalDims, seqlen: int = 1) -> Attend:
    """The attend of a batch of `seqlen` new positions per row: local rows on their KV caches, and the offloaded rows of one
    set of links together, in one round trip per layer."""
    attends = [kv.attend_for(config, dims, seqlen) for kv in kvs]
    remote = [b for b, kv in enumerate(kvs) if isinstance(kv, RemoteKV)]
    if len(remote) < 2 or len({id(kvs[b].links) for b in remote}) > 1:
        return batch_attend(attends)
    links, loop = kvs[remote[0]].links, kvs[remote[0]].loop
    starts = [kv.length for kv in kvs]

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rows = [Row(kvs[b].rid, layer, starts[b], kvs[b].capacity, _wire(q[b:b + 1]), _wire(k[b:b + 1]),
                    _wire(v[b:b + 1])) for b in remote]
        outs = {b: o.to(q.dtype) for b, o in zip(remote, links.call(loop, rows), strict=True)}
        return torch.cat([outs[b] if b in outs else a(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1])
                          for b, a in enumerate(attends)])

    return attend
