"""A worker's requests: each one's KV store, held here or on the attention nodes, and this rank's
links to those nodes (relinked per epoch by the master)."""

from __future__ import annotations

import asyncio
import logging

from edge.engine import ShardModel
from edge.offload import AttentionLinks, RemoteKV
from models.attention import KVCache
from transport.errors import TransportError
from transport.link import LinkSpec

log = logging.getLogger("edge_llm.worker")


class KVStores:
    """Request id -> KV store. An offloaded request opened while the nodes were unreachable is
    `unlinked`: its next step reports an attention failure, so the master rebuilds it locally."""

    def __init__(self, rank: int, secret: bytes, link: LinkSpec | None, timeout: float):
        self.rank, self._secret, self._link, self._timeout = rank, secret, link, timeout
        self.stores: dict[str, KVCache | RemoteKV] = {}
        self.unlinked: set[str] = set()
        self.attn: AttentionLinks | None = None  # channels to the attention nodes, when linked

    def reset(self) -> None:
        """A new join: the master holds none of the old requests any more."""
        self.stores.clear()
        self.unlinked.clear()

    async def open(self, shard: ShardModel, rid: str, capacity: int, offload: bool) -> None:
        """A request's KV store (re-opening drops what it held: a rebuild starts over)."""
        await self.close(rid)
        if not offload:
            self.stores[rid] = shard.new_cache(capacity)
        elif self.attn is None or not self.attn.up:
            log.error("rank %d: offloaded request %s but no attention nodes linked", self.rank, rid)
            self.unlinked.add(rid)
        else:
            self.stores[rid] = RemoteKV(self.attn, rid, capacity, asyncio.get_running_loop())

    def for_step(self, shard: ShardModel, rids: list[str], positions: int,
                 starts: list[int] | None = None) -> list[KVCache | RemoteKV]:
        """The stores of a step's rows, each rewound to its `starts` entry (the master's count of the
        positions it holds); a request closed meanwhile runs on a scratch cache, so every rank stays
        in step. Raises ValueError when a store holds fewer positions than the master counts."""
        stores = []
        for b, rid in enumerate(rids):
            kv = self.stores.get(rid)
            if kv is None:
                kv = shard.new_cache(positions)
            elif starts is not None:
                kv.rewind(starts[b])
            stores.append(kv)
        return stores

    async def close(self, *rids: str) -> None:
        for rid in rids:
            self.unlinked.discard(rid)
            kv = self.stores.pop(rid, None)
            if isinstance(kv, RemoteKV):
                await kv.close()

    async def link_attention(self, shard: ShardModel, nodes: int, addrs: dict[int, list], epoch: int) -> str | None:
        """(Re)connect to the attention nodes for a new epoch; the error, if it failed."""
        if self.attn is not None:
            await self.attn.aclose()
            self.attn = None
        try:
            self.attn = await AttentionLinks.connect(shard.config, shard.dims, nodes, addrs, epoch, self._secret,
                                                     self._link, self._timeout)
        except (OSError, TimeoutError, TransportError, KeyError, ValueError) as e:
            log.warning("rank %d could not reach the attention nodes: %s", self.rank, e)
            return str(e)
        return None
