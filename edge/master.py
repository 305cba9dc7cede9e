"""Rank 0: accepts workers, hands out the plan, embeds, runs its own slice, samples, streams.

`ClusterEngine` implements models.generation.Engine, so the same generation loop serves one
device or a cluster. Decode steps of concurrent requests run as one batched forward.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import psutil
import torch

from edge.attention_pool import AttentionPool
from edge.engine import ShardModel, load_shard
from edge.fetch import serve_fetches
from edge.offload import AttentionNodeFailed, RemoteKV
from edge.profile import kv_room, measure_device, weights_from_profiles
from edge.ring import link_ring_from_master
from edge.split import MANIFEST, SplitError, default_split_dir, rank_dir, split_model
from edge.tensors import pack_tensor
from edge.weights import EmbeddingRows
from edge.worker import HEARTBEAT_TIMEOUT
from models.checkpoint import Checkpoint, checkpoint_fingerprint
from models.dtypes import dtype_name, resolve_dtype
from models.llama import KVCache
from models.quant import check_quantizable
from models.scoring import combine_scores
from models.sharding import PlanError, local_dims
from models.tokenizer import Tokenizer, load_tokenizer
from transport.collectives import StarAllReduce, StepCollective
from transport.errors import FrameError, PeerFailed, TransportError
from transport.fastpath import ABORT, DataLink, DataServer, FastStar
from transport.link import LinkSpec
from transport.tcp import ChannelServer, TcpChannel

log = logging.getLogger("edge_llm.master")
# How long the step runner waits for the requests of the last step to ask for their next one
# (their sampling and streaming take about a millisecond), so they batch instead of alternating.
FOLLOW_WINDOW_S = 0.005


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
    attention_nodes: int = 0
    max_batch: int = 16  # decode steps of concurrent requests that run as one forward
    dtype: str = "auto"  # weights (and activations, KV) in: auto = the checkpoint's torch_dtype
    quantize: str = "auto"  # Linear weights: auto (as stored) | none | int8 | int4 (models.quant)


@dataclass
class _StepRequest:
    """A session's step waiting for the step runner; `result` gets its logits [V] or an error."""

    session: ClusterSession
    tokens: list[int]
    result: asyncio.Future
    score_k: int | None = None  # score the tokens (echo + logprobs) instead of predicting the next

    @property
    def decode(self) -> bool:
        return len(self.tokens) == 1 and not self.session.replay and self.score_k is None


class ClusterSession:
    """A request's KV caches: rank 0's here, the others' on the workers under the same id; or,
    offloaded, all of them on the attention nodes.

    Keeps the token ids fed so far, so KV lost with an attention node is rebuilt by replaying them.
    """

    def __init__(self, engine: ClusterEngine, rid: str, offload: bool, capacity: int):
        self.engine, self.rid, self.capacity = engine, rid, capacity
        self.offload = offload
        self.kv: KVCache | RemoteKV = (RemoteKV(engine.attention.links, rid, capacity, asyncio.get_running_loop())
                                       if offload else engine.shard.new_cache(capacity))
        self.history: list[int] = []  # every token fed so far
        self.replay = False  # the next step feeds the history first (KV rebuilt on the compute ranks)
        self.failed = False
        self.closed = False

    def ctl_open(self) -> dict:
        return {"op": "open", "rid": self.rid, "cap": self.capacity, "offload": self.offload}

    async def step(self, tokens: list[int]) -> torch.Tensor:
        return await self.engine.step(self, tokens)

    async def close(self) -> None:
        self.closed = True
        self.engine.wake_runner()  # it may be waiting for this request's next step
        await self.engine.broadcast_ctl({"op": "close", "rid": self.rid}, ignore_errors=True)
        if isinstance(self.kv, RemoteKV):
            await self.kv.close()


class OffloadedEngine:
    """The cluster seen through the offload route (a models.generation.Engine): every session it
    opens keeps its KV cache on the attention nodes."""

    def __init__(self, engine: ClusterEngine):
        self.engine, self.config, self.tokenizer = engine, engine.config, engine.tokenizer

    async def open_session(self, capacity: int = 64) -> ClusterSession:
        return await self.engine.open_session(capacity, offload=True)

    async def score(self, prompt_ids: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
        return await self.engine.score(prompt_ids, k, offload=True)


def _deliver(result: asyncio.Future, value: object = None, error: BaseException | None = None) -> None:
    """Hand a step's outcome to its request, unless that request already left (its client
    disconnected and its handler was cancelled, which cancels the future it waited on)."""
    if result.done():
        return
    if error is not None:
        result.set_exception(error)
    else:
        result.set_result(value)


def _plannable(ckpt: Checkpoint, settings: MasterSettings) -> Checkpoint:
    """The checkpoint as the cluster will hold it. Under --quantize auto, stored blocks whose groups
    this plan would cut (a head narrower than a group, say) are served as floats instead, with a
    warning; an explicit int4 that cannot be planned raises PlanError / CheckpointError at start."""
    check_quantizable(ckpt.config, ckpt.quant)
    weights = None if settings.weights == "auto" else settings.weights
    try:
        local_dims(ckpt.config, settings.world_size, weights, ckpt.plan_align())
    except PlanError as e:
        if settings.quantize != "auto" or ckpt.plan_align() == (1, 1):
            raise
        log.warning("%s; serving the checkpoint's quantized blocks dequantized to %s instead", e, dtype_name(ckpt.dtype))
        return ckpt.with_quant("none")
    return ckpt


class ClusterEngine:
    """The master of a tensor-parallel cluster; raises WorkerUnavailable when a rank is gone."""

    def __init__(self, settings: MasterSettings):
        self.settings = settings
        ckpt = Checkpoint(settings.model)
        self.dtype = resolve_dtype(settings.dtype, ckpt.config.torch_dtype)
        ckpt = _plannable(ckpt.with_dtype(self.dtype).with_quant(settings.quantize), settings)
        self.quantize = ckpt.quant_label
        self.align = ckpt.plan_align()  # slices of o_proj / down_proj never cut a quantization group
        self.config = ckpt.config
        self.tokenizer: Tokenizer = load_tokenizer(ckpt.folder, self.config)
        self.fingerprint = checkpoint_fingerprint(settings.model)
        self._ckpt = ckpt
        self.auto = settings.weights == "auto"
        self._profiles: dict[int, dict] = {}
        self._planned: asyncio.Event | None = None
        self.shard: ShardModel | None = None
        if self.auto:  # the plan waits for every device's measurements
            local_dims(self.config, settings.world_size, align=self.align)  # refuse impossible worker counts now
            self._profiles[0] = measure_device()
        else:
            self._decide(settings.weights)  # PlanError / BudgetTooSmall at start
        self.workers: dict[int, TcpChannel] = {}
        self.star = StarAllReduce(0, settings.world_size, self.workers, settings.step_timeout)
        # The all-reduce data plane (transport.fastpath): on plain star links only; emulated links
        # and rings keep the event-loop path, which implements their delays and hops.
        self.data_links: dict[int, DataLink] = {}
        self.fast = FastStar(0, settings.world_size, self.data_links, self.star.next_seq)
        plain = settings.allreduce == "star" and (settings.link is None or not settings.link.active)
        self._data_server = DataServer(settings.secret, settings.step_timeout, self._on_data_link) \
            if plain and settings.world_size > 1 else None
        self._data_task: asyncio.Task[None] | None = None
        self.collective = StepCollective(self.star)
        self.listen: dict[int, list] = {}  # where each worker accepts its ring predecessor
        self._ring_epoch = 0
        self.ring_ok = settings.allreduce == "star" or settings.world_size == 1
        self._server = ChannelServer(settings.secret, self._on_worker, settings.link)
        self._lock = asyncio.Lock()  # one cluster-wide step (or relink) at a time
        self._steps = itertools.count(1)
        self._pending: list[_StepRequest] = []  # steps waiting for the step runner
        self._work = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._rids = itertools.count(1)
        self.worker_bytes: dict[int, int] = {}
        self.worker_fixed_rss: dict[int, int] = {}
        self.worker_fetched: dict[int, int] = {}
        self._verified: dict[int, tuple] = {}  # rank -> state of its split files when last verified
        self.worker_free: dict[int, int] = {}  # free memory per rank: at join, then after every step
        self.attention = (AttentionPool(settings.model, self.config, settings.attention_nodes, settings.secret,
                                        settings.link, settings.step_timeout) if settings.attention_nodes else None)
        self.kv_rebuilds = 0
        self.steps_run = 0  # cluster-wide forwards
        self.rows_run = 0  # request-steps they carried (rows / steps = mean decode batch)

    def _decide(self, weights: list[float] | None) -> None:
        """Fix the plan and load rank 0's shard (and embedding) for it."""
        s = self.settings
        self.weights = weights or [1.0] * s.world_size
        self.plans = local_dims(self.config, s.world_size, self.weights, self.align)
        self.shard = load_shard(self._ckpt, self.plans[0], s.world_size, self.weights, s.memory_budget_mb,
                                s.split_dir, split_all=True, drop_cache=not s.keep_page_cache)
        self.embed_bytes = 0  # resident embedding table bytes (none when mapped from the split)
        if self.shard.window is not None:  # rows mapped from the split, outside the budget
            self.embed = EmbeddingRows(self.shard.window.folder, s.world_size)
        else:
            table = self._ckpt.read("model.embed_tokens.weight")  # [V, D]: rank 0 embeds every token
            self.embed = partial(torch.nn.functional.embedding, weight=table)
            self.embed_bytes = table.nbytes

    async def start(self) -> int:
        """Listen for workers and start the step runner; returns the port."""
        self._runner = asyncio.create_task(self._run_steps(), name="step-runner")
        if self._data_server is not None:
            self.data_port = self._data_server.start(self.settings.host)
            self._data_task = asyncio.create_task(self._data_server.serve(), name="data-links")
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
                local_dims(self.config, self.settings.world_size, weights, self.align)
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
            if join.get("role") == "attention":
                await self._on_attention_node(ch, join)
                return
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
            plan = {"t": "plan", "world_size": self.settings.world_size, "weights": self.weights,
                    "dtype": dtype_name(self.dtype), "quantize": self.quantize, "align": list(self.align)}
            if self._data_server is not None:
                plan["data_port"] = self.data_port
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
        profile = join.get("profile")
        if isinstance(profile, dict) and isinstance(profile.get("free_bytes"), int | float):
            self.worker_free[rank] = int(profile["free_bytes"])
        if old is not None:
            await old.aclose()
        log.info("rank %d ready (%s)", rank, ch.peer)
        if self.settings.allreduce != "star":
            await self._link_ring()
        await self._link_attention()
        await self._watch(rank, ch)

    def _on_data_link(self, rank: int, link: DataLink) -> None:
        """A worker's data link (authenticated): it replaces the rank's old one."""
        if not 0 < rank < self.settings.world_size:
            raise FrameError(f"data link for rank {rank!r}, not in 1..{self.settings.world_size - 1}")
        old = self.data_links.pop(rank, None)
        if old is not None:
            old.close()
        self.data_links[rank] = link

    def _fast_ready(self) -> bool:
        """Whether this step's all-reduces can use the data plane: every worker has a live data link."""
        return self._data_server is not None and all(
            r in self.data_links and not self.data_links[r].closed for r in range(1, self.settings.world_size))

    async def _watch(self, rank: int, ch: TcpChannel) -> None:
        """Hold a worker's link while its heartbeats come; a silent (frozen) worker is dropped, so
        requests fail fast and /health names it until it rejoins."""
        try:
            while True:
                await ch.recv("hb", HEARTBEAT_TIMEOUT)
        except TransportError as e:
            if self.workers.get(rank) is ch and not ch.closed:
                log.warning("rank %d went silent (%s); dropping its link until it rejoins", rank, e)
                await ch.aclose()

    async def _on_attention_node(self, ch: TcpChannel, join: dict) -> None:
        if self.attention is None:
            await ch.send({"t": "plan", "error": "this cluster runs without attention nodes "
                                                 "(start it with --attention-nodes K)"})
            return
        await self.attention.serve_node(ch, join, self._link_attention)

    async def _link_attention(self) -> None:
        """Link every rank to the attention nodes once all ranks and nodes are up (else wait)."""
        if self.attention is None or self.attention.missing() or self.missing_ranks():
            return
        async with self._lock:
            await self.attention.link(self.workers, self.plans[0])

    def free_kv_bytes(self) -> int:
        """What one request's KV could take on the compute ranks: the tightest rank's free memory
        scaled by its share of the KV heads (each rank holds the KV of its own heads)."""
        free = {0: psutil.virtual_memory().available} | self.worker_free
        for rank, meta in self.star.peer_meta.items():
            if isinstance(meta.get("mem_available"), int):
                free[rank] = meta["mem_available"]
        heads = {d.rank: d.n_local_kv_heads for d in self.plans} if self.shard is not None else {}
        return kv_room({r: f for r, f in free.items() if r in heads}, heads)

    def offload_free_kv_bytes(self) -> int:
        return self.attention.free_kv_bytes() if self.attention is not None else 0

    def offloaded(self) -> OffloadedEngine:
        return OffloadedEngine(self)

    def offload_ready(self) -> bool:
        return self.attention is not None and self.attention.ready and not self.missing_ranks()

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
        s = self.settings
        return Path(s.split_dir) if s.split_dir else default_split_dir(s.model, dtype_name(self.dtype), self.quantize)

    def _rank_files_state(self, rank: int) -> tuple:
        """(name, size, mtime) of a rank's split files and the manifest: unchanged means still verified."""
        folder = self.split_dir / rank_dir(self.settings.world_size, rank)
        paths = [self.split_dir / MANIFEST, *sorted(folder.glob("*"))] if folder.is_dir() else []
        return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file())

    async def _fetch_offer(self, rank: int) -> dict:
        """Split `rank`'s files here if needed; offer their names and checksums plus config.json.

        Files verified (sha256) at an earlier join are not hashed again while their sizes and
        modification times are unchanged: a rejoining worker costs no read of its shard.
        """
        s = self.settings
        state = await asyncio.to_thread(self._rank_files_state, rank)
        if not state or self._verified.get(rank) != state:
            await asyncio.to_thread(split_model, s.model, s.world_size, self.weights, self.split_dir, [rank], True,
                                    dtype_name(self.dtype), self.quantize)
            self._verified[rank] = await asyncio.to_thread(self._rank_files_state, rank)
        manifest = json.loads((self.split_dir / MANIFEST).read_text())
        prefix = rank_dir(s.world_size, rank) + "/"
        files = {n: e for n, e in manifest["files"].items() if n.startswith(prefix)}
        config = json.loads((Path(s.model) / "config.json").read_text())
        return {"fetch": {"files": files, "plan": manifest["plan"]}, "config": config}

    def snapshot(self) -> dict:
        """Live counters for /metrics: bytes on each link, resident weights, weight-window counters."""
        links = {r: {"sent": ch.bytes_sent, "received": ch.bytes_received} for r, ch in self.workers.items()}
        for r, data in list(self.data_links.items()):  # the all-reduce data plane of the same link
            if r in links:
                links[r] = {"sent": links[r]["sent"] + data.bytes_sent,
                            "received": links[r]["received"] + data.bytes_received}
        shard = self.shard
        window = {0: shard.stats(), **self.star.peer_meta} if shard is not None and shard.window else {}
        timing = {0: shard.timing} if shard is not None else {}
        timing |= {r: m for r, m in self.star.peer_meta.items() if "forward_s" in m}
        rank0 = shard.nbytes() + self.embed_bytes if shard else 0
        return {"links": links, "weight_bytes": {0: rank0, **self.worker_bytes}, "timing": timing,
                "window": window, "fixed_rss": self.worker_fixed_rss, "fetched": self.worker_fetched,
                "attention": self.attention.snapshot() if self.attention else None,
                "kv_rebuilds": self.kv_rebuilds, "steps": self.steps_run, "step_rows": self.rows_run}

    async def wait_ready(self, timeout: float, with_attention_nodes: bool = False) -> None:
        """Until every rank has joined (and, if asked, the attention nodes are linked); TimeoutError."""
        async with asyncio.timeout(timeout):
            while self.missing_ranks() or (with_attention_nodes and not self.offload_ready()):
                await asyncio.sleep(0.05)

    async def broadcast_ctl(self, msg: dict, ignore_errors: bool = False) -> None:
        for rank, ch in list(self.workers.items()):
            try:
                await ch.send({"t": "ctl", **msg})
            except TransportError as e:
                if not ignore_errors:
                    raise WorkerUnavailable(f"worker rank {rank} is unavailable: {e}") from e

    async def open_session(self, capacity: int = 64, offload: bool = False) -> ClusterSession:
        """A request's session, its KV reserved for `capacity` positions; on the attention nodes if `offload`."""
        missing = self.missing_ranks()
        if missing:
            raise WorkerUnavailable(f"worker rank(s) {missing} not connected; the cluster cannot serve")
        if offload and not self.offload_ready():
            raise WorkerUnavailable(self.offload_unavailable_reason())
        session = ClusterSession(self, f"r{next(self._rids)}", offload, capacity)
        await self.broadcast_ctl(session.ctl_open())
        return session

    async def score(self, prompt_ids: list[int], k: int, offload: bool = False
                    ) -> list[tuple[float, list[tuple[int, float]]]]:
        """Natural-log probability of every prompt token after the first given those before it, and
        the top k at each position (`echo` with `logprobs`); one extra prefill, nothing generated."""
        if len(prompt_ids) < 2:
            return []
        session = await self.open_session(len(prompt_ids), offload)
        try:
            entry = _StepRequest(session, list(prompt_ids), asyncio.get_running_loop().create_future(), k)
            self._pending.append(entry)
            self._work.set()
            stats = await entry.result  # [S-1, N x (3 + 2k)]: every rank's slice side by side
        finally:
            await session.close()
        parts = [torch.from_numpy(p) for p in np.split(stats, self.settings.world_size, axis=-1)]
        return combine_scores(parts, k)

    def offload_unavailable_reason(self) -> str:
        if self.attention is None:
            return "no attention nodes are configured"
        missing = self.attention.missing()
        return (f"attention node(s) {missing} not connected" if missing
                else "the attention nodes are not linked to every rank yet")

    async def step(self, session: ClusterSession, tokens: list[int]) -> torch.Tensor:
        """New tokens -> next-token logits [V].

        Steps go through one runner: a prefill runs alone; decode steps of concurrent requests
        run together as one batched forward (weights read once for all of them). A cancelled
        request never interrupts a step that others share.
        """
        if session.failed:
            raise WorkerUnavailable("this request lost a worker earlier")
        entry = _StepRequest(session, tokens, asyncio.get_running_loop().create_future())
        self._pending.append(entry)
        self._work.set()
        return torch.from_numpy(await entry.result)  # [V]

    async def _run_steps(self) -> None:
        """The step runner (owned by the engine, cancelled by aclose): batches and runs pending steps."""
        ran: list[ClusterSession] = []
        while True:
            await self._work.wait()
            self._work.clear()
            while True:
                await self._await_followers(ran)
                batch = self._take_batch()
                if not batch:
                    break
                ran = [e.session for e in batch]
                async with self._lock:
                    try:
                        await self._run_batch(batch)
                    except BaseException as e:  # never leave a waiter hanging, even when cancelled
                        if isinstance(e, Exception):
                            log.exception("step runner: a step failed unexpectedly")
                        for entry in batch:
                            if not entry.result.done():
                                entry.result.set_exception(WorkerUnavailable(f"the step failed: {e!r}"))
                        if not isinstance(e, Exception):
                            raise

    def wake_runner(self) -> None:
        self._work.set()

    async def _await_followers(self, ran: list[ClusterSession]) -> None:
        """Give the requests of the step just run a moment (FOLLOW_WINDOW_S) to ask for their next
        one, so concurrent requests decode together instead of alternating one step each."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FOLLOW_WINDOW_S
        waiting = {id(e.session) for e in self._pending}
        while any(not (s.closed or s.failed) and id(s) not in waiting for s in ran):
            self._work.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._work.wait()
            except TimeoutError:
                return
            waiting = {id(e.session) for e in self._pending}

    def _take_batch(self) -> list[_StepRequest]:
        """The next step: a prefill (or replay) alone, else up to max_batch decode steps in order."""
        self._pending = [e for e in self._pending if not e.result.done() and not e.session.closed]
        batch: list[_StepRequest] = []
        for entry in list(self._pending):
            solo = not entry.decode or (entry.session.offload and not self.offload_ready())
            if solo and batch:
                break
            batch.append(entry)
            self._pending.remove(entry)
            if solo or len(batch) >= self.settings.max_batch:
                break
        return batch

    async def _run_batch(self, batch: list[_StepRequest]) -> None:
        """Run one step for every request of `batch` and set each one's logits [V] or error.

        A batched step that lost an attention node rebuilds every request of the batch on the
        compute ranks (the workers dropped them all) and steps each alone; any other failure fails all.
        """
        if len(batch) == 1:
            await self._settle(batch[0], self._step_with_recovery(batch[0].session, batch[0].tokens,
                                                                  batch[0].score_k))
            return
        try:
            full = await self._forward([e.session for e in batch], [e.tokens for e in batch])  # [B, V]
        except (TransportError, TimeoutError, KeyError, SplitError) as error:
            attention = any(e.session.offload for e in batch) and self._attention_failed(error)
            for entry in batch:
                if not attention or self.missing_ranks():
                    entry.session.failed = True
                    _deliver(entry.result, error=WorkerUnavailable(f"a worker failed during the step: {error}"))
                    continue
                await self._rebuild_locally(entry.session, str(error) or type(error).__name__)
                await self._settle(entry, self._step_with_recovery(entry.session, entry.tokens))
            return
        for b, entry in enumerate(batch):
            _deliver(entry.result, full[b])

    @staticmethod
    async def _settle(entry: _StepRequest, step: Awaitable[np.ndarray]) -> None:
        """Give a waiting request the outcome of its own step: logits [V] (or its prompt scores)."""
        try:
            out = await step
        except WorkerUnavailable as e:
            _deliver(entry.result, error=e)
            return
        _deliver(entry.result, out if entry.score_k is not None else out[0])

    async def _step_with_recovery(self, session: ClusterSession, tokens: list[int],
                                  score_k: int | None = None) -> np.ndarray:
        """One request's step -> logits [1, V] (or prompt scores); an offloaded request whose
        attention node fails gets its KV rebuilt on the compute ranks from the tokens fed so far and
        goes on; any other failure raises WorkerUnavailable."""
        if session.offload and not self.offload_ready() and not self.missing_ranks():
            await self._rebuild_locally(session, self.offload_unavailable_reason())
        try:
            return await self._forward([session], [tokens], score_k)
        except (TransportError, TimeoutError, KeyError, SplitError) as e:
            if not (session.offload and self._attention_failed(e)) or self.missing_ranks():
                session.failed = True
                who = "rank 0" if isinstance(e, SplitError) else "a worker"
                raise WorkerUnavailable(f"{who} failed during the step: {e or type(e).__name__}") from e
            await self._rebuild_locally(session, str(e) or type(e).__name__)
            try:
                return await self._forward([session], [tokens], score_k)
            except (TransportError, TimeoutError, KeyError, SplitError) as e2:
                session.failed = True
                raise WorkerUnavailable(f"the request lost its attention node ({e}) and rebuilding its "
                                        f"KV on the compute ranks failed too: {e2}") from e2

    def _attention_failed(self, error: Exception) -> bool:
        """Whether a failed step lost an attention node (here, or as a worker reported it to the hub)."""
        return (isinstance(error, AttentionNodeFailed) or not self.offload_ready()
                or (isinstance(error, PeerFailed) and AttentionNodeFailed.MARK in str(error)))

    async def _rebuild_locally(self, session: ClusterSession, reason: str) -> None:
        """Move an offloaded request's KV to the compute ranks; the next step replays its history."""
        log.warning("request %s: attention offload failed (%s); rebuilding %d positions of KV on the "
                    "compute ranks", session.rid, reason, len(session.history))
        if isinstance(session.kv, RemoteKV):
            await session.kv.close()
        session.offload, session.replay = False, True
        session.kv = self.shard.new_cache(session.capacity)
        self.kv_rebuilds += 1
        await self.broadcast_ctl(session.ctl_open())

    async def _forward(self, sessions: list[ClusterSession], tokens: list[list[int]],
                       score_k: int | None = None) -> np.ndarray:
        """One cluster-wide forward (the caller holds the lock): one row per session (its history
        first if its KV was just rebuilt) -> logits [B, V]. Aborts the step on failure."""
        missing = self.missing_ranks()
        if missing:
            for s in sessions:
                s.failed = True
            raise WorkerUnavailable(f"worker rank(s) {missing} disconnected during the request")
        rows = [s.history + t if s.replay else t for s, t in zip(sessions, tokens, strict=True)]
        step = next(self._steps)
        ids = torch.tensor(rows, dtype=torch.long)  # [B, S]; S == 1 when B > 1
        h = await self.shard.run(lambda: self.embed(ids))  # [B, S, D]
        fast = self._fast_ready()
        ctl = {"op": "step", "rids": [s.rid for s in sessions], "step": step, "h": pack_tensor(h), "fast": fast}
        score = None
        if score_k is not None:  # one session, no replay: its tokens are the prompt to score
            ctl |= {"score": score_k, "targets": rows[0][1:]}
            score = (torch.tensor(rows[0][1:], dtype=torch.long), score_k)
        await self.broadcast_ctl(ctl)
        self.collective.begin(step)
        try:
            full = await self.shard.forward(h, [s.kv for s in sessions], self.collective,
                                            self.settings.step_timeout, score, self.fast if fast else None)
        except (TransportError, TimeoutError, KeyError, SplitError):
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
        for task in (self._runner, self._data_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._data_server is not None:
            self._data_server.close()
        for link in list(self.data_links.values()):
            link.close()
        await self._server.aclose()
        if self.attention is not None:
            await self.attention.aclose()
        for ch in list(self.workers.values()):
            await ch.aclose()
        if self.shard is not None:
            self.shard.close()
