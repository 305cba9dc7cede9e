"""Rank 0 of a tensor-parallel cluster: the engine the front end talks to (models.engine.Engine).

It wires the parts, each with one job:
  Planner   the split (device weights -> slices) and the plan each joining worker gets
  Roster    the workers: joins, heartbeats, their control and data links
  Relinker  the ring and the attention-node links, relinked per epoch as ranks come and go
  StepBatcher  requests' steps -> batched forwards, one at a time
  Failover  a failed step: rebuild offloaded requests and retry, or fail each request once
and keeps for itself opening sessions, scoring, and the cluster-wide forward: embed on rank 0,
send the hidden states to every worker, run rank 0's slice (all-reducing with the others),
gather every rank's vocabulary slice of the logits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import psutil
import torch

from edge.attention_pool import AttentionPool
from edge.batcher import StepBatcher, StepRequest
from edge.engine import ShardModel, load_shard
from edge.failover import STEP_ERRORS, Failover
from edge.messages import Join, Refused, Step, send
from edge.offload import RemoteKV
from edge.planner import Planner, plannable
from edge.profile import kv_room
from edge.relinker import Relinker
from edge.roster import Roster
from edge.session import ClusterSession, OffloadedEngine
from edge.tensors import pack_tensor
from edge.weights import EmbeddingRows
from models.checkpoint import Checkpoint
from models.dtypes import resolve_dtype
from models.engine import (
    ClusterCounters,
    EngineStatus,
    EngineUnavailable,
    OffloadStatus,
    PromptScores,
)
from models.files import checkpoint_fingerprint
from models.scoring import combine_scores
from models.sharding import LocalDims
from models.tokenizer import Tokenizer, load_tokenizer
from transport.collectives import StarAllReduce
from transport.fastpath import ABORT, FastStar
from transport.link import LinkSpec
from transport.tcp import TcpChannel

log = logging.getLogger("edge_llm.master")


@dataclass
class MasterSettings:
    model: str
    world_size: int
    weights: list[float] | Literal["auto"] | None = None
    host: str = "127.0.0.1"
    port: int = 0
    secret: bytes = b""
    step_timeout: float = 5.0
    link: LinkSpec | None = None
    served_name: str | None = None
    memory_budget_mb: float | None = None
    split_dir: str | None = None
    keep_page_cache: bool = False
    allreduce: Literal["star", "ring", "auto"] = "star"
    attention_nodes: int = 0
    max_batch: int = 16  # decode steps of concurrent requests that run as one forward
    dtype: str = "auto"  # weights (and activations, KV) in: auto = the checkpoint's torch_dtype
    quantize: str = "auto"  # Linear weights: auto (as stored) | none | int8 | int4 (models.quant)


class ClusterEngine:
    """The master of a tensor-parallel cluster; raises EngineUnavailable when a rank is gone."""

    def __init__(self, settings: MasterSettings):
        s = self.settings = settings
        ckpt = Checkpoint(s.model)
        self.dtype = resolve_dtype(s.dtype, ckpt.config.torch_dtype)
        weights = None if s.weights in ("auto", None) else s.weights
        ckpt = plannable(ckpt.with_dtype(self.dtype).with_quant(s.quantize), s.world_size, weights, s.quantize)
        self.config, self._ckpt = ckpt.config, ckpt
        self.tokenizer: Tokenizer = load_tokenizer(ckpt.folder, self.config)
        self.fingerprint = checkpoint_fingerprint(s.model)
        self.shard: ShardModel | None = None
        self.embed_bytes = 0  # resident embedding table bytes (none when mapped from the split)
        self.planner = Planner(ckpt, s.world_size, weights, s.weights == "auto", s.split_dir, self._load_rank0)
        plain = s.allreduce == "star" and (s.link is None or not s.link.active)
        self.roster = Roster(s.world_size, self.fingerprint, s.secret, s.link, self.planner, self._on_rank_ready,
                             self._on_attention_node, plain and s.world_size > 1, s.step_timeout)
        self.star = StarAllReduce(0, s.world_size, self.roster.channels, s.step_timeout)
        # The all-reduce data plane (transport.fastpath): on plain star links only; emulated links
        # and rings keep the event-loop path, which implements their delays and hops.
        self.fast = FastStar(0, s.world_size, self.roster.data_links, self.star.next_seq)
        self.attention = (AttentionPool(s.model, self.config, s.attention_nodes, s.secret, s.link, s.step_timeout)
                          if s.attention_nodes else None)
        self._lock = asyncio.Lock()  # one cluster-wide step (or relink) at a time
        self.relinker = Relinker(self.roster, self.star, s.allreduce, s.step_timeout, self.attention, self._lock,
                                 lambda: self.planner.dims[0], self.missing_ranks)
        self.failover = Failover(self._forward, self._rebuild_locally, lambda: not self.missing_ranks(),
                                 self.offload_ready)
        self.batcher = StepBatcher(self._run_batch, s.max_batch,
                                   alone=lambda e: e.session.offload and not self.offload_ready())
        self._steps, self._rids = itertools.count(1), itertools.count(1)
        self.kv_rebuilds = 0
        self.steps_run = 0  # cluster-wide forwards
        self.rows_run = 0  # request-steps they carried (rows / steps = mean decode batch)

    @property
    def quantize(self) -> str:
        return self._ckpt.quant_label

    def _load_rank0(self, weights: list[float], dims0: LocalDims) -> None:
        """Load rank 0's slice (and the embedding) for the plan just decided."""
        s = self.settings
        self.shard = load_shard(self._ckpt, dims0, s.world_size, weights, s.memory_budget_mb, s.split_dir,
                                split_all=True, drop_cache=not s.keep_page_cache)
        if self.shard.window is not None:  # rows mapped from the split, outside the budget
            self.embed = EmbeddingRows(self.shard.window.folder, s.world_size)
        else:
            table = self._ckpt.read("model.embed_tokens.weight")  # [V, D]: rank 0 embeds every token
            self.embed = partial(torch.nn.functional.embedding, weight=table)
            self.embed_bytes = table.nbytes

    async def start(self) -> int:
        """Listen for workers and start the step runner; returns the port."""
        self.batcher.start()
        self.port = await self.roster.start(self.settings.host, self.settings.port)
        return self.port

    async def _on_rank_ready(self) -> None:
        await self.relinker.after_join()

    async def _on_attention_node(self, ch: TcpChannel, join: Join) -> None:
        if self.attention is None:
            await send(ch, Refused("this cluster runs without attention nodes (start it with --attention-nodes K)"))
            return
        await self.attention.serve_node(ch, join, self.relinker.link_attention)

    # --- what the front end reads --------------------------------------------------------------

    def missing_ranks(self) -> list[int]:
        """Ranks that cannot take part yet: not connected, not planned (0), or not linked in the ring."""
        ranks = self.roster.missing()
        if self.shard is None:
            return [0, *ranks]
        return ranks or ([] if self.relinker.ring_ok else list(range(1, self.settings.world_size)))

    def offload_ready(self) -> bool:
        return self.attention is not None and self.attention.ready and not self.missing_ranks()

    def status(self) -> EngineStatus:
        return EngineStatus(self.missing_ranks(), self._free_kv_bytes(), self._offload_status())

    def _offload_status(self) -> OffloadStatus | None:
        pool = self.attention
        if pool is None:
            return None
        missing, ready = pool.missing(), self.offload_ready()
        reason = ("" if ready else f"attention node(s) {missing} not connected" if missing
                  else "the attention nodes are not linked to every rank yet")
        return OffloadStatus(pool.n_nodes, ready, missing, reason, pool.free_kv_bytes())

    def _free_kv_bytes(self) -> int:
        """What one request's KV could take on the compute ranks: the tightest rank's free memory
        scaled by its share of the KV heads (each rank holds the KV of its own heads)."""
        free = {0: psutil.virtual_memory().available}
        free |= {r: rec.free_bytes for r, rec in self.roster.records.items() if rec.free_bytes is not None}
        for rank, meta in self.star.peer_meta.items():
            if isinstance(meta.get("mem_available"), int):
                free[rank] = meta["mem_available"]
        heads = {d.rank: d.n_local_kv_heads for d in self.planner.dims} if self.shard is not None else {}
        return kv_room({r: f for r, f in free.items() if r in heads}, heads)

    def counters(self) -> ClusterCounters:
        """Live counters for /metrics: bytes on each link, resident weights, window and step timing."""
        records = self.roster.records
        links = {r: {"sent": rec.channel.bytes_sent, "received": rec.channel.bytes_received}
                 for r, rec in records.items()}
        for r, data in list(self.roster.data_links.items()):  # the all-reduce data plane of the same link
            if r in links:
                links[r] = {"sent": links[r]["sent"] + data.bytes_sent,
                            "received": links[r]["received"] + data.bytes_received}
        shard = self.shard
        window = {0: shard.stats(), **self.star.peer_meta} if shard is not None and shard.window else {}
        timing = {0: shard.timing} if shard is not None else {}
        timing |= {r: m for r, m in self.star.peer_meta.items() if "forward_s" in m}
        rank0 = shard.nbytes() + self.embed_bytes if shard else 0
        return ClusterCounters(
            links=links, weight_bytes={0: rank0, **{r: rec.weight_bytes for r, rec in records.items()}},
            timing=timing, window=window, fixed_rss={r: rec.fixed_rss for r, rec in records.items()},
            fetched={r: rec.fetched for r, rec in records.items()},
            attention=self.attention.snapshot() if self.attention else None,
            kv_rebuilds=self.kv_rebuilds, steps=self.steps_run, step_rows=self.rows_run)

    def offloaded(self) -> OffloadedEngine | None:
        return OffloadedEngine(self) if self.attention is not None else None

    async def wait_ready(self, timeout: float, with_attention_nodes: bool = False) -> None:
        """Until every rank has joined (and, if asked, the attention nodes are linked); TimeoutError."""
        async with asyncio.timeout(timeout):
            while self.missing_ranks() or (with_attention_nodes and not self.offload_ready()):
                await asyncio.sleep(0.05)

    # --- requests ------------------------------------------------------------------------------

    async def open_session(self, capacity: int = 64, offload: bool = False) -> ClusterSession:
        """A request's session, its KV reserved for `capacity` positions; on the attention nodes if `offload`."""
        missing = self.missing_ranks()
        if missing:
            raise EngineUnavailable(f"worker rank(s) {missing} not connected; the cluster cannot serve")
        if offload and not self.offload_ready():
            status = self._offload_status()
            raise EngineUnavailable(status.reason if status else "no attention nodes are configured")
        rid = f"r{next(self._rids)}"
        kv = (RemoteKV(self.attention.links, rid, capacity, asyncio.get_running_loop()) if offload
              else self.shard.new_cache(capacity))
        session = ClusterSession(rid, kv, capacity, self.batcher, self.roster)
        await self.roster.command(session.open_command())
        return session

    async def score(self, prompt_ids: list[int], k: int, offload: bool = False) -> PromptScores:
        """Natural-log probability of every prompt token after the first given those before it, and
        the top k at each position (`echo` with `logprobs`); one extra prefill, nothing generated."""
        if len(prompt_ids) < 2:
            return []
        session = await self.open_session(len(prompt_ids), offload)
        try:
            stats = await self.batcher.submit(session, list(prompt_ids), k)  # [S-1, N x (3 + 2k)]
        finally:
            await session.close()
        parts = [torch.from_numpy(p) for p in np.split(stats, self.settings.world_size, axis=-1)]
        return combine_scores(parts, k)

    async def _run_batch(self, batch: list[StepRequest]) -> None:
        async with self._lock:
            await self.failover.run(batch)

    async def _rebuild_locally(self, session: ClusterSession, reason: str) -> None:
        """Move an offloaded request's KV to the compute ranks; the next step replays its history."""
        log.warning("request %s: attention offload failed (%s); rebuilding %d positions of KV on the "
                    "compute ranks", session.rid, reason, len(session.history))
        if isinstance(session.kv, RemoteKV):
            await session.kv.close()
        session.offload, session.replay = False, True
        session.kv = self.shard.new_cache(session.capacity)
        self.kv_rebuilds += 1
        await self.roster.command(session.open_command())

    async def _forward(self, sessions: list[ClusterSession], tokens: list[list[int]],
                       score_k: int | None = None) -> np.ndarray:
        """One cluster-wide forward (the caller holds the lock): one row per session (its history
        first if its KV was just rebuilt) -> logits [B, V]. Aborts the step on failure."""
        missing = self.missing_ranks()
        if missing:
            raise EngineUnavailable(f"worker rank(s) {missing} disconnected during the request")
        rows = [s.history + t if s.replay else t for s, t in zip(sessions, tokens, strict=True)]
        step, fast = next(self._steps), self.roster.data_plane_up()
        ids = torch.tensor(rows, dtype=torch.long)  # [B, S]; S == 1 when B > 1
        h = await self.shard.run(lambda: self.embed(ids))  # [B, S, D]
        score = None
        if score_k is not None:  # one session, no replay: its tokens are the prompt to score
            score = (torch.tensor(rows[0][1:], dtype=torch.long), score_k)
        await self.roster.command(Step([s.rid for s in sessions], step, pack_tensor(h), fast,
                                       score_k, rows[0][1:] if score else None))
        collective = self.relinker.collective
        collective.begin(step)
        try:
            full = await self.shard.forward(h, [s.kv for s in sessions], collective,
                                            self.settings.step_timeout, score, self.fast if fast else None)
        except STEP_ERRORS:
            await self.star.abort(f"step {step} failed")
            if fast:  # workers waiting for a sum wait on their data links
                self.fast.report(ABORT, self.star.seq, f"step {step} failed")
            raise
        for s, t in zip(sessions, tokens, strict=True):
            s.history += t
            s.replay = False
        self.steps_run += 1
        self.rows_run += len(sessions)
        return full

    async def aclose(self) -> None:
        await self.batcher.aclose()
        await self.roster.aclose()
        if self.attention is not None:
            await self.attention.aclose()
        if self.shard is not None:
            self.shard.close()
