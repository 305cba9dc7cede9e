"""A worker device (rank >= 1): joins the master, loads its slice, runs every step it is sent.

On the one channel to the master (messages in edge.messages): Join -> Plan (or PlanRefused) ->
Ready, then the master's commands (OpenRequest, CloseRequest, Step, LinkRing, LinkAttention),
each handled by the method the COMMANDS table names; Heartbeat every HEARTBEAT_S while it
serves (silence for HEARTBEAT_TIMEOUT drops it). The all-reduces of each layer run on the same
channel (transport.collectives) or on the data link (transport.fastpath).
If the master goes away the worker reconnects and joins again, so a restarted master or a
restarted worker both heal without operator action.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch

from edge.engine import ShardModel
from edge.kv_stores import KVStores
from edge.messages import (
    HEARTBEAT_S,
    AttentionLinked,
    CloseRequest,
    FetchRequest,
    Heartbeat,
    Join,
    LinkAttention,
    LinkRing,
    Message,
    OpenRequest,
    Plan,
    Ready,
    Refused,
    Replan,
    Replanned,
    RingLinked,
    Step,
    receive_command,
    receive_plan,
    send,
)
from edge.offload import AttentionNodeFailed
from edge.profile import measure_device
from edge.rejoin import MASTER_GONE_S, stay_joined
from edge.ring import PeerLinks
from edge.slices import PlanRefused, SliceLoader, SliceSettings
from edge.split import SplitError
from edge.tensors import unpack_tensor
from models.checkpoint import Checkpoint
from models.errors import CheckpointError
from models.files import checkpoint_fingerprint
from models.quant_kernels import warm_kernels
from models.sharding import PlanError
from models.threads import to_passing_thread
from transport.collectives import StarAllReduce, StepCollective
from transport.errors import ChannelClosed, FailureCause, FrameError, PeerFailed, TransportError
from transport.fastpath import ERROR, DataLink, FastStar, open_data_link
from transport.link import LinkSpec
from transport.tcp import TcpChannel, connect

log = logging.getLogger("edge_llm.worker")
IDLE_TIMEOUT = 3600.0


@dataclass(frozen=True)
class WorkerSettings:
    model: str | None
    rank: int | None  # None: the master gives it the lowest rank not connected
    master_host: str
    master_port: int
    secret: bytes
    step_timeout: float = 5.0
    link: LinkSpec | None = None
    memory_budget_mb: float | None = None
    split_dir: str | None = None
    keep_page_cache: bool = False
    dtype: str | None = None  # refuse a master that holds weights in another dtype (None: follow it)
    quantize: str | None = None  # refuse a master that quantizes otherwise (None: follow it)
    master_timeout: float = MASTER_GONE_S  # give up after the master is unreachable this long


class Worker:
    """One device's process state: its shard (loaded once per plan) and per-request KV caches."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        # Without a local checkpoint the worker fetches its own shard files from the master.
        has_model = settings.model is not None and any(Path(settings.model).glob("*.safetensors"))
        ckpt = Checkpoint(settings.model) if has_model else None
        self.slice = SliceLoader(SliceSettings(settings.rank, settings.dtype, settings.quantize,
                                               settings.memory_budget_mb, settings.split_dir,
                                               settings.keep_page_cache), ckpt)
        self.fingerprint = checkpoint_fingerprint(settings.model) if has_model else None
        warm_kernels()  # the fixed overhead (runtime, compiled kernels) a memory budget comes on top of
        self.fixed_rss = psutil.Process().memory_info().rss
        log.info("rank %s fixed overhead %.0f MB RSS", settings.rank or "(to be assigned)", self.fixed_rss / (1 << 20))
        self.profile = measure_device()  # for --weights auto on the master
        self.links: PeerLinks | None = None
        self.kv = KVStores(settings.rank, settings.secret, settings.link, settings.step_timeout)
        self.data: DataLink | None = None  # the all-reduce data plane to the master, when offered
        self.fast: FastStar | None = None
        self.master: TcpChannel | None = None  # the control channel of the current join
        self.collective: StepCollective | None = None  # what this rank's steps all-reduce with

    async def _join(self) -> TcpChannel:
        s = self.settings
        ch = await connect(s.master_host, s.master_port, s.secret, link=s.link, timeout=5.0)
        if self.links is None:  # where ring neighbours reach us, for --allreduce ring|auto
            self.links = PeerLinks(s.rank, s.secret)
            await self.links.start(ch.local_host)
        await send(ch, Join(rank=s.rank, fingerprint=self.fingerprint, profile=self.profile,
                            listen=list(self.links.address)))
        plan = await receive_plan(ch, Plan, 600.0)
        if isinstance(plan, Refused):
            raise PlanRefused(plan.error)
        if s.rank is None:
            s = self._take_rank(plan.rank)
        key = self.slice.check(plan)
        if plan.fetch is not None:
            await self.slice.load_fetched(ch, plan.fetch, plan.config, key)
        else:
            await to_passing_thread(self.slice.load_local, key)
        self.kv.reset()
        await self._open_data_link(plan)
        budget = int(s.memory_budget_mb * (1 << 20)) if s.memory_budget_mb else None
        await send(ch, Ready(s.rank, self.shard.nbytes(), self.fixed_rss, self.slice.fetched_bytes, budget))
        log.info("rank %d joined the master (%d MB of weights)", s.rank, self.shard.nbytes() >> 20)
        return ch

    def _take_rank(self, rank: int | None) -> WorkerSettings:
        """The rank the master gave this device; it asks for the same one when it rejoins."""
        if rank is None:
            raise PlanRefused("the master gave this device no rank")
        self.settings = replace(self.settings, rank=rank)
        self.slice.settings = replace(self.slice.settings, rank=rank)
        self.kv.rank = self.links.rank = rank
        log.info("the master gave this device rank %d", rank)
        return self.settings

    @property
    def shard(self) -> ShardModel | None:
        return self.slice.shard

    async def _open_data_link(self, plan: Plan) -> None:
        """The data plane for all-reduces (transport.fastpath) when the master offers one; without it
        this rank's all-reduces go through the control channel (the master then uses that path)."""
        s = self.settings
        if self.data is not None:
            self.data.close()
            self.data = None
        if plan.data_port is None:
            return
        try:
            self.data = await open_data_link(s.master_host, plan.data_port, s.secret, s.rank, s.step_timeout)
        except (OSError, TimeoutError, TransportError) as e:
            log.warning("rank %d: no data link (%s); all-reduces go through the control channel", s.rank, e)

    async def _serve(self, ch: TcpChannel) -> None:
        beat = asyncio.create_task(self._heartbeat(ch), name="heartbeat")
        try:
            await self._serve_commands(ch)
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)

    async def _heartbeat(self, ch: TcpChannel) -> None:
        """Tell the master this device is alive (from the event loop, so long steps do not stop it);
        a frozen device (a laptop put to sleep) is noticed and, once awake, rejoins."""
        while True:
            await send(ch, Heartbeat())
            await asyncio.sleep(HEARTBEAT_S)

    async def _serve_commands(self, ch: TcpChannel) -> None:
        """Run the master's commands in order, each by its handler, until the channel closes."""
        self.master = ch
        self._connect_collectives()
        handlers: dict[type[Message], Callable[..., Awaitable[None]]] = {
            OpenRequest: self._open, CloseRequest: self._close, Step: self._step,
            LinkRing: self._link_ring, LinkAttention: self._link_attention, Replan: self._replan}
        while True:
            try:
                msg = await receive_command(ch, IDLE_TIMEOUT)
            except FrameError as e:  # one bad command is skipped; the channel stays in step
                log.error("rank %d: %s", self.settings.rank, e)
                continue
            await handlers[type(msg)](msg)

    def _connect_collectives(self) -> None:
        """All-reduces with the master as this device's position in the plan it serves."""
        world, position = int(self.slice.key[0]), int(self.slice.key[5])
        star = StarAllReduce(position, world, {0: self.master}, self.settings.step_timeout)
        self.collective = StepCollective(star)
        self.fast = FastStar(position, world, {0: self.data}, star.next_seq) if self.data else None

    async def _replan(self, msg: Replan) -> None:
        """Load this device's slice of the new plan (while heartbeats go on), drop every request's KV
        (the master replays them), answer Replanned with the resident bytes or the reason it failed."""
        key = (msg.world_size, tuple(float(w) for w in msg.weights), *self.slice.key[2:5], msg.position)
        unchanged = key == self.slice.key  # it holds this slice already: nothing to load or fetch
        try:
            if unchanged:
                if msg.fetch is not None:
                    await send(self.master, FetchRequest(done=True))
            elif msg.fetch is not None:
                await self.slice.load_fetched(self.master, msg.fetch, msg.config, key)
            else:
                await to_passing_thread(self.slice.load_local, key)
        except ChannelClosed:
            raise  # the master is gone: rejoin
        except (SplitError, OSError, MemoryError, PlanError, CheckpointError, TransportError) as e:
            log.error("rank %d cannot serve plan %d: %s", self.settings.rank, msg.epoch, e)
            await send(self.master, Replanned(msg.epoch, error=f"rank {self.settings.rank}: {e}"))
            return
        await self.kv.close(*list(self.kv.stores))
        self.kv.reset()
        self._connect_collectives()
        log.info("rank %d serves plan %d as %d of %d", self.settings.rank, msg.epoch, msg.position, msg.world_size)
        fetched = None if unchanged else self.slice.fetched_bytes  # None: /metrics keeps its last fetch
        await send(self.master, Replanned(msg.epoch, self.shard.nbytes(), fetched_bytes=fetched))

    async def _open(self, msg: OpenRequest) -> None:
        await self.kv.open(self.shard, msg.rid, msg.cap, msg.offload)

    async def _close(self, msg: CloseRequest) -> None:
        await self.kv.close(msg.rid)

    async def _link_ring(self, msg: LinkRing) -> None:
        world, position = int(self.slice.key[0]), int(self.slice.key[5])
        self.collective = await self.links.link(self.master, msg, position, world, self.collective.star,
                                                self.settings.step_timeout)
        await send(self.master, RingLinked(msg.epoch))

    async def _link_attention(self, msg: LinkAttention) -> None:
        error = await self.kv.link_attention(self.shard, msg.nodes, msg.node_addrs(), msg.epoch)
        await send(self.master, AttentionLinked(msg.epoch, error))

    async def _step(self, msg: Step) -> None:
        """One step for a batch of requests (rows of h). A row whose request this rank no longer
        holds (closed meanwhile) runs on a scratch cache, so every rank stays in step."""
        self.shard.mark("step_received")
        rids, rank, collective = msg.rids, self.settings.rank, self.collective
        h = unpack_tensor(msg.h)  # [B, S, D]
        collective.begin(msg.step)
        fast = self.fast if msg.fast else None
        if self.kv.unlinked.intersection(rids):
            await self._fail(rids, f"rank {rank} is not linked to the attention nodes", FailureCause.ATTENTION, fast)
            return
        if msg.fast and fast is None:
            await self._fail(rids, f"rank {rank}: no data link to the master", FailureCause.PEER, fast)
            return
        try:
            score = (torch.tensor(msg.targets or [], dtype=torch.long), msg.score) if msg.score is not None else None
            kvs = self.kv.for_step(self.shard, rids, h.shape[1], msg.starts)
            await self.shard.forward(h, kvs, collective, self.settings.step_timeout, score, fast, msg.every)
        except AttentionNodeFailed as e:  # tell the hub at once: it rebuilds the KV elsewhere
            log.warning("step %s of %s lost its attention node: %s", msg.step, rids, e)
            await self._fail(rids, f"rank {rank}: {e}", FailureCause.ATTENTION, fast)
        except PeerFailed as e:  # a ring predecessor could not finish: pass it on around the ring
            log.warning("step %s of %s failed: %s", msg.step, rids, e)
            await self._fail(rids, str(e), e.cause, fast)
        except (TransportError, TimeoutError) as e:  # a peer or ring neighbour is gone
            log.warning("step %s of %s failed: %s", msg.step, rids, e)
            await self.kv.close(*rids)
        except SplitError as e:  # our own weights failed: tell the hub, which fails the request
            log.error("rank %d: %s", rank, e)
            await self._fail(rids, f"rank {rank}: {e}", FailureCause.WEIGHTS, fast)
        except Exception as e:  # a bug must fail the step, not take the device down
            log.exception("rank %d: step %s failed unexpectedly", rank, msg.step)
            await self._fail(rids, f"rank {rank}: internal error {e!r}", FailureCause.INTERNAL, fast)

    async def _fail(self, rids: list[str], reason: str, cause: FailureCause, fast: FastStar | None = None) -> None:
        """Drop the step's requests and report why (to the hub, on the data plane when the step used
        it, and to the ring successor) so the cluster fails the step at once, not at its timeout."""
        await self.kv.close(*rids)
        if fast is not None:  # the hub's compute thread waits on the data link, not on the channel
            fast.report(ERROR, self.collective.star.seq + 1, reason, cause)
        try:
            await self.collective.fail(reason, cause)
        except TransportError as e:  # the peers are gone too: the master sees that by itself
            log.info("could not report the failure: %s", e)

    async def run(self) -> None:
        """Join, serve, and rejoin after the master disappears; PlanRefused ends it."""
        who = f"rank {self.settings.rank}" if self.settings.rank is not None else "this worker"
        await stay_joined(self._join, self._serve, who, self.settings.master_timeout)

    async def aclose(self) -> None:
        """Release the links and the shard (after `run` ended or was cancelled)."""
        if self.data is not None:
            self.data.close()
        if self.kv.attn is not None:
            await self.kv.attn.aclose()
        if self.links is not None:
            await self.links.aclose()
        self.slice.close()
