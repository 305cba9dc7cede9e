"""Compute-rank side of attention offload (Lamina): KV caches live on attention nodes.

Per layer a compute rank sends each attention node the new token's q, k, v for the heads whose
KV head that node holds, and gets the attention output back: one round trip per layer, all
nodes in parallel. On the wire per layer and token, summed over ranks: q and the attention
output (hidden each) plus k and v (hidden / G each), i.e. (2 + 2/G) x hidden x 4 bytes.

Messages on a rank's channel to a node:
  iam       rank -> node  {rank, epoch}                    once, after connecting
  attn      rank -> node  {op: step, rid, layer, start, cap, q, k, v, map?}
                          {op: close, rid}
  attn.out  node -> rank  {o} or {error}                   one per step message, in order
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import torch

from models.config import LlamaConfig
from models.llama import Attend
from models.sharding import AttentionSlice, LocalDims, attention_nodes_of, attention_slices
from transport.codec import pack_array, unpack_array
from transport.errors import FrameError, TransportError
from transport.link import LinkSpec
from transport.tcp import TcpChannel, connect

log = logging.getLogger("edge_llm.offload")
LINK_TIMEOUT = 30.0


class AttentionNodeFailed(TransportError):
    """An attention node died, timed out or refused a step; the request's KV there is lost.

    Its message starts with MARK, which is how the hub recognises it in a worker's failure report.
    """

    MARK = "attention node"

    def __init__(self, node: int, reason: str):
        super().__init__(f"{self.MARK} {node}: {reason}")
        self.node = node


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
                await ch.send({"t": "iam", "rank": dims.rank, "epoch": epoch})
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

    async def attend(self, rid: str, layer: int, start: int, cap: int, q: np.ndarray, k: np.ndarray,
                     v: np.ndarray) -> np.ndarray:
        """q [1, H, S, hd], k, v [1, KV, S, hd] -> attention output [1, H, S, hd] from the nodes."""
        for s in self.slices:  # every request goes out before any answer is awaited
            msg = {"t": "attn", "op": "step", "rid": rid, "layer": layer, "start": start, "cap": cap,
                   "q": pack_array(q[:, s.q_start:s.q_stop]), "k": pack_array(k[:, s.kv_start:s.kv_stop]),
                   "v": pack_array(v[:, s.kv_start:s.kv_stop])}
            if s.kv_map is not None:
                msg["map"] = list(s.kv_map)
            await self._send(s.node, msg)
        outs = [await self._answer(s.node) for s in self.slices]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)

    async def _send(self, node: int, msg: dict) -> None:
        try:
            await self.channels[node].send(msg)
        except TransportError as e:
            raise AttentionNodeFailed(node, str(e)) from e

    async def _answer(self, node: int) -> np.ndarray:
        try:
            reply = await self.channels[node].recv("attn.out", self.timeout)
            if "error" in reply:
                raise AttentionNodeFailed(node, str(reply["error"]))
            return unpack_array(reply["o"])
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


class RemoteKV:
    """A request's KV store on the attention nodes (models.llama.KVStore): only the length is local."""

    def __init__(self, links: AttentionLinks, rid: str, capacity: int, loop: asyncio.AbstractEventLoop):
        self.links, self.rid, self.capacity, self.loop = links, rid, capacity, loop
        self.length = 0

    def attend_for(self, config: LlamaConfig, dims: LocalDims, seqlen: int) -> Attend:
        start, links = self.length, self.links

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # runs on the compute thread; the round trip runs on the event loop
            coro = links.attend(self.rid, layer, start, self.capacity, q.numpy(), k.numpy(), v.numpy())
            began = time.perf_counter()
            out = asyncio.run_coroutine_threadsafe(coro, self.loop).result(links.timeout + 1.0)
            links.wait_s += time.perf_counter() - began
            links.round_trips += 1
            return torch.from_numpy(out if out.flags.writeable else out.copy())  # [1, H, S, hd]

        return attend

    def advance(self, seqlen: int) -> None:
        self.length += seqlen

    async def close(self) -> None:
        await self.links.close_request(self.rid)


def check_node_addrs(msg: dict) -> dict[int, list]:
    """The node addresses of an 'attn' link message; raises FrameError when malformed."""
    try:
        return {int(k): list(v) for k, v in msg["addrs"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FrameError(f"bad attention link message: {e}") from e
