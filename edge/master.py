"""Rank 0: accepts workers, hands out the plan, embeds, runs its own slice, samples, streams.

`ClusterEngine` implements models.generation.Engine, so the same generation loop serves one
device or a cluster. Steps of concurrent requests interleave one at a time over the cluster.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from edge.engine import ShardModel, load_shard
from edge.fetch import serve_fetches
from edge.profile import measure_device, weights_from_profiles
from edge.ring import link_ring_from_master
from edge.split import MANIFEST, SplitError, default_split_dir, rank_dir, split_model
from edge.weights import EmbeddingRows
from models.checkpoint import Checkpoint, checkpoint_fingerprint
from models.llama import KVCache
from models.sharding import PlanError, local_dims
from models.tokenizer import Tokenizer, load_tokenizer
from transport.codec import pack_array
from transport.collectives import StarAllReduce, StepCollective
from transport.errors import TransportError
from transport.link import LinkSpec
from transport.tcp import ChannelServer, TcpChannel

log = logging.getLogger("edge_llm.master")


class WorkerUnavailable(Exception):
    """A rank is missing or failed mid-step; the request fails with 503 and the message names it."""


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


class ClusterSession:
    """A request's KV caches: rank 0's here, the others' on the workers under the same id."""

    def __init__(self, engine: ClusterEngine, rid: str):
        self.engine, self.rid = engine, rid
        self.kv: KVCache = engine.shard.new_cache()
        self.failed = False

    async def step(self, tokens: list[int]) -> torch.Tensor:
        return await self.engine.step(self, tokens)

    async def close(self) -> None:
        await self.engine.broadcast_ctl({"op": "close", "rid": self.rid}, ignore_errors=True)


class ClusterEngine:
    """The master of a tensor-parallel cluster; raises WorkerUnavailable when a rank is gone."""

    def __init__(self, settings: MasterSettings):
        self.settings = settings
        ckpt = Checkpoint(settings.model)
        self.config = ckpt.config
        self.tokenizer: Tokenizer = load_tokenizer(ckpt.folder, self.config)
        self.fingerprint = checkpoint_fingerprint(settings.model)
        self._ckpt = ckpt
        self.auto = settings.weights == "auto"
        self._profiles: dict[int, dict] = {}
        self._planned: asyncio.Event | None = None
        self.shard: ShardModel | None = None
        if self.auto:  # the plan waits for every device's measurements
            local_dims(self.config, settings.world_size)  # still refuse impossible worker counts now
            self._profiles[0] = measure_device()
        else:
            self._decide(settings.weights)  # PlanError / BudgetTooSmall at start
        self.workers: dict[int, TcpChannel] = {}
        self.star = StarAllReduce(0, settings.world_size, self.workers, settings.step_timeout)
        self.collective = StepCollective(self.star)
        self.listen: dict[int, list] = {}  # where each worker accepts its ring predecessor
        self._ring_epoch = 0
        self.ring_ok = settings.allreduce == "star" or settings.world_size == 1
        self._server = ChannelServer(settings.secret, self._on_worker, settings.link)
        self._lock = asyncio.Lock()
        self._steps = itertools.count(1)
        self._rids = itertools.count(1)
        self.worker_bytes: dict[int, int] = {}
        self.worker_fixed_rss: dict[int, int] = {}
        self.worker_fetched: dict[int, int] = {}

    def _decide(self, weights: list[float] | None) -> None:
        """Fix the plan and load rank 0's shard (and embedding) for it."""
        s = self.settings
        self.weights = weights or [1.0] * s.world_size
        self.plans = local_dims(self.config, s.world_size, self.weights)
        self.shard = load_shard(self._ckpt, self.plans[0], s.world_size, self.weights, s.memory_budget_mb,
                                s.split_dir, split_all=True, drop_cache=not s.keep_page_cache)
        if self.shard.window is not None:  # rows mapped from the split, outside the budget
            self.embed = EmbeddingRows(self.shard.window.folder, s.world_size)
        else:
            table = self._ckpt.read("model.embed_tokens.weight")  # [V, D]: rank 0 embeds every token
            self.embed = partial(torch.nn.functional.embedding, weight=table)

    async def start(self) -> int:
        """Listen for workers; returns the port."""
        self._planned = asyncio.Event()
        if not self.auto:
            self._planned.set()
        self.port = await self._server.start(self.settings.host, self.settings.port)
        return self.port

    async def _auto_plan(self, rank: int, profile: object) -> None:
        """Collect each device's profile; once all are in, choose the weights and load rank 0."""
        assert self._planned is not None
        if self._planned.is_set():
            return
        self._profiles[rank] = profile if isinstance(profile, dict) else {}
        if len(self._profiles) == self.settings.world_size:
            profiles = [self._profiles[r] for r in range(self.settings.world_size)]
            weights = weights_from_profiles(profiles, self._ckpt.model_bytes())
            try:
                local_dims(self.config, self.settings.world_size, weights)
            except PlanError as e:
                log.warning("measured weights %s cannot work (%s); splitting evenly", weights, e)
                weights = None
            log.info("--weights auto: profiles %s -> weights %s", profiles, weights)
            await asyncio.to_thread(self._decide, weights)
            self._planned.set()
        async with asyncio.timeout(600):
            await self._planned.wait()

    def missing_ranks(self) -> list[int]:
        """Ranks that cannot take part yet: not connected, not planned (0), or not linked in the ring."""
        ranks = [r for r in range(1, self.settings.world_size)
                 if r not in self.workers or self.workers[r].closed]
        if self.shard is None:
            return [0, *ranks]
        return ranks or ([] if self.ring_ok else list(range(1, self.settings.world_size)))

    async def _on_worker(self, ch: TcpChannel) -> None:
        try:
            join = await ch.recv("join", 10.0)
            rank, error = join.get("rank"), None
            if not isinstance(rank, int) or not 0 < rank < self.settings.world_size:
                error = f"rank {rank!r} is not in 1..{self.settings.world_size - 1}"
            elif join.get("fingerprint") not in (self.fingerprint, None):
                error = (f"rank {rank}'s checkpoint differs from the master's "
                         f"({join.get('fingerprint')} != {self.fingerprint}); give every device the same model")
            if error:
                log.error("refusing worker %s: %s", ch.peer, error)
                await ch.send({"t": "plan", "error": error})
                return
            if self.auto:
                await self._auto_plan(rank, join.get("profile"))
            plan = {"t": "plan", "world_size": self.settings.world_size, "weights": self.weights}
            if join.get("fingerprint") is None:  # no local checkpoint: it fetches its shard from us
                plan |= await self._fetch_offer(rank)
            await ch.send(plan)
            if "fetch" in plan:
                await serve_fetches(ch, self.split_dir, set(plan["fetch"]["files"]))
            ready = await ch.recv("ready", 600.0)
        except TransportError as e:
            log.warning("worker %s failed to join: %s", ch.peer, e)
            return
        old = self.workers.get(rank)
        self.workers[rank] = ch
        self.listen[rank] = list(join.get("listen") or [])
        self.worker_bytes[rank] = int(ready.get("weight_bytes", 0))
        self.worker_fixed_rss[rank] = int(ready.get("fixed_rss_bytes", 0))
        self.worker_fetched[rank] = int(ready.get("fetched_bytes", 0))
        if old is not None:
            await old.aclose()
        log.info("rank %d ready (%s)", rank, ch.peer)
        if self.settings.allreduce != "star":
            await self._link_ring()

    async def _link_ring(self) -> None:
        """(Re)build the worker ring once every worker is connected; until then /health says 503."""
        self.ring_ok = False
        if any(r not in self.workers or self.workers[r].closed for r in range(1, self.settings.world_size)):
            return
        async with self._lock:  # no step runs while the ring changes
            self._ring_epoch += 1
            try:
                self.collective = await link_ring_from_master(
                    self.workers, self.listen, self._ring_epoch, self.settings.allreduce, self.star,
                    self.settings.step_timeout)
            except (TransportError, TimeoutError) as e:
                log.warning("could not link the ring: %s", e)
                return
            self.ring_ok = True
            log.info("ring linked (epoch %d, %s)", self._ring_epoch, self.settings.allreduce)

    @property
    def split_dir(self) -> Path:
        return Path(self.settings.split_dir) if self.settings.split_dir else default_split_dir(self.settings.model)

    async def _fetch_offer(self, rank: int) -> dict:
        """Split `rank`'s files here if needed; offer their names and checksums plus config.json."""
        s = self.settings
        await asyncio.to_thread(split_model, s.model, s.world_size, self.weights, self.split_dir, [rank], True)
        manifest = json.loads((self.split_dir / MANIFEST).read_text())
        prefix = rank_dir(s.world_size, rank) + "/"
        files = {n: e for n, e in manifest["files"].items() if n.startswith(prefix)}
        config = json.loads((Path(s.model) / "config.json").read_text())
        return {"fetch": {"files": files, "plan": manifest["plan"]}, "config": config}

    def snapshot(self) -> dict:
        """Live counters for /metrics: bytes on each link, resident weights, weight-window counters."""
        links = {r: {"sent": ch.bytes_sent, "received": ch.bytes_received} for r, ch in self.workers.items()}
        shard = self.shard
        window = {0: shard.stats(), **self.star.peer_meta} if shard is not None and shard.window else {}
        return {"links": links, "weight_bytes": {0: shard.nbytes() if shard else 0, **self.worker_bytes},
                "window": window, "fixed_rss": self.worker_fixed_rss, "fetched": self.worker_fetched}

    async def wait_ready(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while self.missing_ranks():
                await asyncio.sleep(0.05)

    async def broadcast_ctl(self, msg: dict, ignore_errors: bool = False) -> None:
        for rank, ch in list(self.workers.items()):
            try:
                await ch.send({"t": "ctl", **msg})
            except TransportError as e:
                if not ignore_errors:
                    raise WorkerUnavailable(f"worker rank {rank} is unavailable: {e}") from e

    async def open_session(self) -> ClusterSession:
        missing = self.missing_ranks()
        if missing:
            raise WorkerUnavailable(f"worker rank(s) {missing} not connected; the cluster cannot serve")
        session = ClusterSession(self, f"r{next(self._rids)}")
        await self.broadcast_ctl({"op": "open", "rid": session.rid})
        return session

    async def step(self, session: ClusterSession, tokens: list[int]) -> torch.Tensor:
        """New tokens -> next-token logits [V]; one cluster-wide step at a time."""
        if session.failed:
            raise WorkerUnavailable("this request lost a worker earlier")
        async with self._lock:
            missing = self.missing_ranks()
            if missing:
                session.failed = True
                raise WorkerUnavailable(f"worker rank(s) {missing} disconnected during the request")
            step = next(self._steps)
            ids = torch.tensor([tokens], dtype=torch.long)
            h = await self.shard.run(lambda: self.embed(ids))  # [1, S, D]
            await self.broadcast_ctl({"op": "step", "rid": session.rid, "step": step,
                                      "h": pack_array(h.numpy())})
            self.collective.begin(step)
            try:
                full = await self.shard.forward(h, session.kv, self.collective, self.settings.step_timeout)
            except (TransportError, TimeoutError, KeyError, SplitError) as e:
                session.failed = True
                await self.star.abort(f"step {step} failed")
                who = "rank 0" if isinstance(e, SplitError) else "a worker"
                raise WorkerUnavailable(f"{who} failed during the step: {e or type(e).__name__}") from e
        return torch.from_numpy(full)  # [V]

    async def aclose(self) -> None:
        await self._server.aclose()
        for ch in list(self.workers.values()):
            await ch.aclose()
        if self.shard is not None:
            self.shard.close()
