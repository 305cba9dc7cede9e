"""Rank 0 of a tensor-parallel cluster: the engine the front end talks to (models.engine.Engine).

It wires the parts, each with one job (docs/ARCHITECTURE.md): Planner (the split), Roster (the
workers and their links), Relinker (ring and attention links), StepBatcher (steps -> batches),
Failover (a failed step), Replanner (serving the devices that are up), Rank0 (its own slice);
and keeps opening sessions, scoring, and the cluster-wide forward: embed on rank 0, send the
hidden states to every worker, run rank 0's slice, gather every rank's slice of the logits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from edge.attention_pool import AttentionPool
from edge.batcher import StepBatcher, StepRequest, step_rows
from edge.cluster_status import (
    free_kv_bytes,
    link_bytes,
    offload_status,
    peer_meta_by_device,
    plan_table,
)
from edge.failover import STEP_ERRORS, Failover
from edge.messages import Join, Message, Refused, Step, send
from edge.offload import RemoteKV
from edge.planner import Planner, plannable
from edge.rank0 import Rank0
from edge.relinker import Relinker
from edge.replanner import Replanner
from edge.roster import ByPosition, Roster
from edge.session import ClusterSession, OffloadedEngine
from edge.tensors import pack_tensor
from models.checkpoint import Checkpoint
from models.dtypes import resolve_dtype
from models.engine import ClusterCounters, EngineStatus, EngineUnavailable, PromptScores
from models.files import checkpoint_fingerprint
from models.quant_kernels import warm_kernels
from models.scoring import combine_scores
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
    """The master of a tensor-parallel cluster; raises EngineUnavailable when it cannot serve."""

    def __init__(self, settings: MasterSettings):
        s = self.settings = settings
        ckpt = Checkpoint(s.model)
        self.dtype = resolve_dtype(s.dtype, ckpt.config.torch_dtype)
        weights = None if s.weights in ("auto", None) else s.weights
        ckpt = plannable(ckpt.with_dtype(self.dtype).with_quant(s.quantize), s.world_size, weights, s.quantize)
        self.config, self.quantize = ckpt.config, ckpt.quant_label
        self.tokenizer: Tokenizer = load_tokenizer(ckpt.folder, self.config)
        self.fingerprint = checkpoint_fingerprint(s.model)
        warm_kernels()  # the first verification or batched step must not pay for compiling them
        self.rank0 = Rank0(ckpt, s.memory_budget_mb, s.split_dir, s.keep_page_cache)
        self.planner = Planner(ckpt, self.fingerprint, s.world_size, weights, s.weights == "auto", s.split_dir,
                               lambda w, dims0: self.rank0.load(w, dims0))
        plain = s.allreduce == "star" and (s.link is None or not s.link.active)
        self.roster = Roster(s.world_size, self.fingerprint, s.secret, s.link, self.planner, self._on_rank_ready,
                             self._on_attention_node, plain and s.world_size > 1, s.step_timeout,
                             on_lost=lambda device: self.replanner.on_lost(device))
        self.attention = (AttentionPool(s.model, self.config, s.attention_nodes, s.secret, s.link, s.step_timeout)
                          if s.attention_nodes else None)
        self._lock = asyncio.Lock()  # one cluster-wide step (or relink, or re-plan) at a time
        self.relinker = Relinker(self.roster, s.allreduce, s.step_timeout, self.attention, self._lock,
                                 lambda: self.planner.dims[0], self.missing_ranks, lambda: self.planner.devices)
        self._wire(self.planner.devices)
        self.replanner = Replanner(self.planner, self.roster, self._lock, self.rank0.prepare, self._adopted)
        self.failover = Failover(self._forward, self._rebuild_locally, lambda: not self.missing_ranks(),
                                 self.offload_ready, self.replanner.recover)
        self.batcher = StepBatcher(self._run_batch, s.max_batch,
                                   alone=lambda e: e.session.offload and not self.offload_ready())
        self.sessions: set[ClusterSession] = set()  # open requests
        self._steps, self._rids = itertools.count(1), itertools.count(1)
        self.kv_rebuilds = self.steps_run = 0  # KV rebuilds; cluster-wide forwards
        self.rows_run = 0  # request-steps they carried (rows / steps = mean decode batch)

    shard = property(lambda self: self.rank0.shard)  # ShardModel | None: rank 0's slice

    def _wire(self, devices: list[int]) -> None:
        """The all-reduces of the plan over `devices`, which index workers by position. The data
        plane (transport.fastpath) is used on plain star links only; emulated links and rings keep
        the event-loop path, which implements their delays and hops."""
        s = self.settings
        self.star = StarAllReduce(0, len(devices), ByPosition(self.roster.channels, devices), s.step_timeout)
        self.fast = FastStar(0, len(devices), ByPosition(self.roster.data_links, devices), self.star.next_seq)
        self.relinker.rewire(self.star)

    async def _adopted(self, devices: list[int]) -> None:
        """A re-plan switched to `devices` (the step lock is held): rewire, relink the ring (by the new
        positions) and the attention nodes, and rebuild every open request from its tokens (its next
        step replays them)."""
        self._wire(devices)
        if self.settings.allreduce != "star":
            await self.relinker.relink_ring()
        if self.attention is not None and not self.attention.missing():
            await self.attention.link({d: self.roster.channels[d] for d in devices[1:]}, self.planner.dims[0])
        for session in list(self.sessions):
            await session.rebuild(self.shard.new_cache(session.capacity))
            await self.command(session.open_command())
        self.replanner.stats.replayed += len(self.sessions)

    async def start(self) -> int:
        """Listen for workers and start the step runner; returns the port."""
        self.batcher.start()
        self.port = await self.roster.start(self.settings.host, self.settings.port)
        return self.port

    async def _on_rank_ready(self, device: int) -> None:
        if self.replanner.serving:
            await self.replanner.on_joined(device)  # grows the plan back (and relinks the nodes)
        else:
            await self.relinker.after_join()
            self.replanner.serving = self.replanner.serving or not self.missing_ranks()

    async def _on_attention_node(self, ch: TcpChannel, join: Join) -> None:
        if self.attention is None:
            await send(ch, Refused("this cluster runs without attention nodes (start it with --attention-nodes K)"))
            return
        await self.attention.serve_node(ch, join, self.relinker.link_attention)

    async def command(self, msg: Message, ignore_errors: bool = False) -> None:
        """A command to every worker of the plan served now."""
        await self.roster.command(msg, self.planner.devices, ignore_errors)

    # --- what the front end reads --------------------------------------------------------------

    def missing_ranks(self) -> list[int]:
        """Devices of the plan that cannot take part: not connected, not planned (0), or not linked in the ring."""
        if self.shard is None:
            return [0, *self.roster.missing()]
        ranks = self.roster.missing(self.planner.devices)
        return ranks or ([] if self.relinker.ring_ok else self.planner.devices[1:])

    def offload_ready(self) -> bool:
        return self.attention is not None and self.attention.ready and not self.missing_ranks()

    def status(self) -> EngineStatus:
        planned = self.shard is not None
        return EngineStatus(
            self.missing_ranks(), free_kv_bytes(self.roster, self.star, self.planner) if planned else 0,
            offload_status(self.attention, self.offload_ready()),
            lost_ranks=[d for d in range(self.settings.world_size) if d not in self.planner.devices],
            plan=plan_table(self.planner) if planned else [], replan_refused=self.replanner.stats.refused)

    def counters(self) -> ClusterCounters:
        """Live counters for /metrics: bytes on each link, resident weights, window and step timing."""
        records, shard, stats = self.roster.records, self.shard, self.replanner.stats
        meta = peer_meta_by_device(self.star, self.planner.devices)
        window = {0: shard.stats(), **meta} if shard is not None and shard.window else {}
        timing = ({0: shard.timing} if shard else {}) | {r: m for r, m in meta.items() if "forward_s" in m}
        weights = {0: self.rank0.nbytes()} | {r: rec.weight_bytes for r, rec in records.items()}
        return ClusterCounters(
            links=link_bytes(self.roster), weight_bytes=weights, timing=timing, window=window,
            fixed_rss={r: rec.fixed_rss for r, rec in records.items()},
            fetched={r: rec.fetched for r, rec in records.items()},
            attention=self.attention.snapshot() if self.attention else None,
            kv_rebuilds=self.kv_rebuilds, steps=self.steps_run, step_rows=self.rows_run,
            plan=plan_table(self.planner) if shard else [], replans=stats.replans, replan_seconds=stats.seconds,
            last_replan_seconds=stats.last_seconds, last_replan_started_at=stats.last_started_at,
            last_replan_load_seconds=stats.last_load_seconds, replayed=stats.replayed,
            devices=self.roster.device_table(), budget_bytes=self.rank0.budget_bytes)

    def offloaded(self) -> OffloadedEngine | None:
        return OffloadedEngine(self) if self.attention is not None else None

    async def run_local(self, fn):
        return await self.shard.run(fn)  # rank 0's compute thread

    async def wait_ready(self, timeout: float, with_attention_nodes: bool = False) -> None:
        """Until every rank has joined (and, if asked, the attention nodes are linked); TimeoutError."""
        async with asyncio.timeout(timeout):
            while self.missing_ranks() or (with_attention_nodes and not self.offload_ready()):
                await asyncio.sleep(0.05)

    # --- requests ------------------------------------------------------------------------------

    async def open_session(self, capacity: int = 64, offload: bool = False) -> ClusterSession:
        """A request's session, its KV reserved for `capacity` positions; on the attention nodes if
        `offload`. A request arriving during a re-plan waits for it."""
        await self.replanner.settled()
        missing = self.missing_ranks()
        if missing:
            refused = self.replanner.stats.refused
            raise EngineUnavailable(f"worker rank(s) {missing} not connected; the cluster cannot serve"
                                    + (f" (and cannot re-plan without them: {refused})" if refused else ""))
        if offload and not self.offload_ready():
            status = offload_status(self.attention, False)
            raise EngineUnavailable(status.reason if status else "no attention nodes are configured")
        rid = f"r{next(self._rids)}"
        kv = (RemoteKV(self.attention.links, rid, capacity, asyncio.get_running_loop()) if offload
              else self.shard.new_cache(capacity))
        session = ClusterSession(rid, kv, capacity, self.batcher, self.command, self.sessions,
                                 self.config.max_position_embeddings)
        await self.command(session.open_command())
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
        parts = [torch.from_numpy(p) for p in np.split(stats, len(self.planner.devices), axis=-1)]
        return combine_scores(parts, k)

    async def _run_batch(self, batch: list[StepRequest]) -> None:
        async with self._lock:
            await self.failover.run(batch)

    async def _rebuild_locally(self, session: ClusterSession, reason: str) -> None:
        """Move an offloaded request's KV to the compute ranks; the next step replays its history."""
        log.warning("request %s: attention offload failed (%s); rebuilding %d positions of KV on the "
                    "compute ranks", session.rid, reason, len(session.history))
        await session.rebuild(self.shard.new_cache(session.capacity))
        self.kv_rebuilds += 1
        await self.command(session.open_command())

    async def _forward(self, sessions: list[ClusterSession], tokens: list[list[int]], score_k: int | None = None,
                       every: list[bool] | None = None) -> list[np.ndarray]:
        """One cluster-wide forward (the caller holds the lock), rows as `step_rows` makes them -> per
        session its logits [V] (with `every`: [S, V]) or a scoring pass's stats. Aborts on failure."""
        missing = self.missing_ranks()
        if missing:
            raise EngineUnavailable(f"worker rank(s) {missing} disconnected during the request")
        self.shard.mark("step_begun")
        rows, starts, wanted, wide = step_rows(sessions, tokens, every)
        step, fast = next(self._steps), self.roster.data_plane_up(self.planner.devices)
        ids = torch.tensor(rows, dtype=torch.long)  # [B, S]
        for session, start in zip(sessions, starts, strict=True):
            session.kv.rewind(start)
        h = await self.rank0.embedded(ids)  # [B, S, D]
        self.shard.mark("rows_embedded")
        score = None
        if score_k is not None:  # one session, no replay: its tokens are the prompt to score
            score = (torch.tensor(rows[0][1:], dtype=torch.long), score_k)
        await self.command(Step([s.rid for s in sessions], step, pack_tensor(h), fast,
                                score_k, rows[0][1:] if score else None, starts, wide))
        collective = self.relinker.collective
        collective.begin(step)
        try:
            full = await self.shard.forward(h, [s.kv for s in sessions], collective,
                                            self.settings.step_timeout, score, self.fast if fast else None, wide)
        except STEP_ERRORS:
            await collective.abort(f"step {step} failed")
            if fast:  # workers waiting for a sum wait on their data links
                self.fast.report(ABORT, self.star.seq, f"step {step} failed")
            raise
        for s, t in zip(sessions, tokens, strict=True):
            s.history += t
            s.replay = False
        self.steps_run += 1
        self.rows_run += len(sessions)
        return [full] if score is not None else [full[b] if w is None else full[b][w] for b, w in enumerate(wanted)]

    async def aclose(self) -> None:
        await self.batcher.aclose()
        await self.replanner.aclose()
        await self.roster.aclose()
        if self.attention is not None:
            await self.attention.aclose()
        self.rank0.close()
