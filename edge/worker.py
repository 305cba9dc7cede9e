"""A worker device (rank >= 1): joins the master, loads its slice, runs every step it is sent.

Protocol on the one channel to the master (tags):
  join   worker -> master  {rank, fingerprint}
  plan   master -> worker  {world_size, weights} or {error}
  ready  worker -> master  {rank, weight_bytes}
  ctl    master -> worker  {op: open|step|close, rid, step, h?, offload?, cap?}
         master -> worker  {op: ring, ...} (edge/ring.py), {op: attn, epoch, nodes, addrs} (edge/offload.py)
  ar / ar.sum              the star all-reduce of each layer
  ring.ok / attn.ok        worker -> master: linked to its ring neighbours / the attention nodes
  hb     worker -> master  every HEARTBEAT_S while it serves; silence for HEARTBEAT_TIMEOUT drops it
If the master goes away the worker reconnects and joins again, so a restarted master or a
restarted worker both heal without operator action.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from edge.engine import ShardModel, load_shard
from edge.fetch import fetch_files
from edge.offload import AttentionLinks, AttentionNodeFailed, RemoteKV, check_node_addrs
from edge.profile import measure_device
from edge.rejoin import stay_joined
from edge.ring import PeerLinks
from edge.split import SplitError, SplitPlan
from edge.tensors import unpack_tensor
from models.checkpoint import Checkpoint, checkpoint_fingerprint
from models.config import config_from_hf
from models.dtypes import DTYPES
from models.llama import KVCache
from models.quant import QUANT_CHOICES
from models.sharding import local_dims
from transport.collectives import StarAllReduce, StepCollective
from transport.errors import PeerFailed, TransportError
from transport.fastpath import ERROR, DataLink, FastStar, open_data_link
from transport.link import LinkSpec
from transport.tcp import TcpChannel, connect

log = logging.getLogger("edge_llm.worker")
IDLE_TIMEOUT = 3600.0
HEARTBEAT_S = 0.5  # a worker says it is alive this often; the master gives up after HEARTBEAT_TIMEOUT
HEARTBEAT_TIMEOUT = 10.0


class PlanRefused(Exception):
    """The master refused this worker (wrong checkpoint, bad rank); fatal, reported and exit 2."""


@dataclass(frozen=True)
class WorkerSettings:
    model: str | None
    rank: int
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


class Worker:
    """One device's process state: its shard (loaded once per plan) and per-request KV caches."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        # Without a local checkpoint the worker fetches its own shard files from the master.
        has_model = settings.model is not None and any(Path(settings.model).glob("*.safetensors"))
        self.ckpt = Checkpoint(settings.model) if has_model else None
        self.fingerprint = checkpoint_fingerprint(settings.model) if has_model else None
        # The runtime's own memory (Python, torch, tokenizer-free imports), before any weight:
        # the fixed overhead that a memory budget comes on top of.
        self.fixed_rss = psutil.Process().memory_info().rss
        log.info("rank %d fixed overhead %.0f MB RSS", settings.rank, self.fixed_rss / (1 << 20))
        self.fetched_bytes = 0
        self.profile = measure_device()  # for --weights auto on the master
        self.links: PeerLinks | None = None
        self.shard: ShardModel | None = None
        self._plan: tuple | None = None  # world size, weights, dtype, quantize, alignment
        self.sessions: dict[str, KVCache | RemoteKV] = {}
        self.attn: AttentionLinks | None = None  # channels to the attention nodes, when linked
        self.unlinked: set[str] = set()  # offloaded requests opened while the nodes were unreachable
        self.data: DataLink | None = None  # the all-reduce data plane to the master, when offered
        self.fast: FastStar | None = None

    async def _join(self) -> TcpChannel:
        s = self.settings
        ch = await connect(s.master_host, s.master_port, s.secret, link=s.link, timeout=5.0)
        if self.links is None:  # where ring neighbours reach us, for --allreduce ring|auto
            self.links = PeerLinks(s.rank, s.secret)
            await self.links.start(ch.local_host)
        await ch.send({"t": "join", "rank": s.rank, "fingerprint": self.fingerprint, "profile": self.profile,
                       "listen": list(self.links.address)})
        plan = await ch.recv("plan", 600.0)
        if "error" in plan:
            raise PlanRefused(plan["error"])
        dtype = str(plan.get("dtype", "float32"))
        if dtype not in DTYPES:
            raise PlanRefused(f"the master holds weights in {dtype!r}, which this worker does not support")
        if s.dtype not in (None, "auto", dtype):
            raise PlanRefused(f"the master holds weights in {dtype}, this worker was started with --dtype {s.dtype}")
        quantize = str(plan.get("quantize", "none"))
        if quantize not in QUANT_CHOICES:
            raise PlanRefused(f"the master quantizes weights as {quantize!r}, which this worker does not support")
        if s.quantize not in (None, "auto", quantize):
            raise PlanRefused(f"the master quantizes weights as {quantize}, this worker was started with "
                              f"--quantize {s.quantize}")
        align = plan.get("align", [1, 1])
        if not (isinstance(align, list) and len(align) == 2 and all(isinstance(a, int) and a > 0 for a in align)):
            raise PlanRefused(f"the master's plan has alignment {align!r}, expected two positive integers")
        key = (int(plan["world_size"]), tuple(float(w) for w in plan["weights"]), dtype, quantize, tuple(align))
        if "fetch" in plan:
            await self._load_fetched(ch, plan, key)
        elif self._plan != key:  # load (or reload) only when the plan changes
            dims = local_dims(self.ckpt.config, key[0], list(key[1]), key[4])[s.rank]
            if self.shard is not None:
                self.shard.close()
            self.shard = load_shard(self.ckpt.with_dtype(DTYPES[dtype]).with_quant(quantize), dims, key[0], list(key[1]),
                                    s.memory_budget_mb, s.split_dir, drop_cache=not s.keep_page_cache)
            self._plan = key
        self.sessions.clear()
        self.unlinked.clear()
        await self._open_data_link(plan)
        await ch.send({"t": "ready", "rank": s.rank, "weight_bytes": self.shard.nbytes(),
                       "fixed_rss_bytes": self.fixed_rss, "fetched_bytes": self.fetched_bytes})
        log.info("rank %d joined the master (%d MB of weights)", s.rank, self.shard.nbytes() >> 20)
        return ch

    async def _open_data_link(self, plan: dict) -> None:
        """The data plane for all-reduces (transport.fastpath) when the master offers one; without it
        this rank's all-reduces go through the control channel (the master then uses that path)."""
        s = self.settings
        if self.data is not None:
            self.data.close()
            self.data = None
        port = plan.get("data_port")
        if not isinstance(port, int):
            return
        try:
            self.data = await open_data_link(s.master_host, port, s.secret, s.rank, s.step_timeout)
        except (OSError, TimeoutError, TransportError) as e:
            log.warning("rank %d: no data link (%s); all-reduces go through the control channel", s.rank, e)

    async def _load_fetched(self, ch: TcpChannel, plan: dict, key: tuple) -> None:
        """Fetch this rank's shard files from the master (only what is missing or stale), then load."""
        s = self.settings
        fetch = plan["fetch"]
        dest = Path(s.split_dir or f"edge-llm-shards/{fetch['plan']['fingerprint']}")
        self.fetched_bytes = await fetch_files(ch, fetch["files"], fetch["plan"], dest)
        log.info("rank %d: fetched %d bytes of shard files into %s", s.rank, self.fetched_bytes, dest)
        config = config_from_hf(plan["config"])
        dims = local_dims(config, key[0], list(key[1]), key[4])[s.rank]
        split_plan = SplitPlan(key[0], key[1], fetch["plan"]["fingerprint"], key[2], key[3], key[4])
        budget = int(s.memory_budget_mb * (1 << 20)) if s.memory_budget_mb else 1 << 62
        if self.shard is not None:
            self.shard.close()
        self.shard = ShardModel.from_split(config, dims, dest, split_plan, budget, not s.keep_page_cache)
        self._plan = key

    async def _serve(self, ch: TcpChannel) -> None:
        beat = asyncio.create_task(self._heartbeat(ch), name="heartbeat")
        try:
            await self._serve_ctl(ch)
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)

    async def _heartbeat(self, ch: TcpChannel) -> None:
        """Tell the master this device is alive (from the event loop, so long steps do not stop it);
        a frozen device (a laptop put to sleep) is noticed and, once awake, rejoins."""
        while True:
            await ch.send({"t": "hb"})
            await asyncio.sleep(HEARTBEAT_S)

    async def _serve_ctl(self, ch: TcpChannel) -> None:
        world, timeout = int(self._plan[0]), self.settings.step_timeout
        star = StarAllReduce(self.settings.rank, world, {0: ch}, timeout)
        collective = StepCollective(star)
        self.fast = FastStar(self.settings.rank, world, {0: self.data}, star.next_seq) if self.data else None
        while True:
            msg = await ch.recv("ctl", IDLE_TIMEOUT)
            op, rid = msg.get("op"), str(msg.get("rid"))
            if op == "open":
                await self._open(rid, msg)
            elif op == "close":
                await self._close(rid)
            elif op == "step":
                await self._step(collective, msg)
            elif op == "ring":
                collective = await self.links.link(ch, msg, world, star, timeout)
                await ch.send({"t": "ring.ok", "epoch": msg["epoch"]})
            elif op == "attn":
                await self._link_attention(ch, msg)

    async def _open(self, rid: str, msg: dict) -> None:
        """A request's KV store: local, or on the attention nodes when the master offloads it."""
        await self._close(rid)  # a re-open (KV rebuilt after an attention node died) starts over
        cap = int(msg.get("cap") or 64)
        self.unlinked.discard(rid)
        if msg.get("offload"):
            if self.attn is None or not self.attn.up:
                log.error("rank %d: offloaded request %s but no attention nodes linked", self.settings.rank, rid)
                self.unlinked.add(rid)  # its step reports an attention failure: the master rebuilds it
                return
            self.sessions[rid] = RemoteKV(self.attn, rid, cap, asyncio.get_running_loop())
        else:
            self.sessions[rid] = self.shard.new_cache(cap)

    async def _close(self, rid: str) -> None:
        self.unlinked.discard(rid)
        kv = self.sessions.pop(rid, None)
        if isinstance(kv, RemoteKV):
            await kv.close()

    async def _link_attention(self, ch: TcpChannel, msg: dict) -> None:
        """(Re)connect to the attention nodes for a new epoch; answer attn.ok (with an error if it failed)."""
        s, epoch = self.settings, msg.get("epoch")
        if self.attn is not None:
            await self.attn.aclose()
            self.attn = None
        try:
            self.attn = await AttentionLinks.connect(self.shard.config, self.shard.dims, int(msg["nodes"]),
                                                     check_node_addrs(msg), int(epoch), s.secret, s.link,
                                                     s.step_timeout)
        except (OSError, TimeoutError, TransportError, KeyError, ValueError) as e:
            log.warning("rank %d could not reach the attention nodes: %s", s.rank, e)
            await ch.send({"t": "attn.ok", "epoch": epoch, "error": str(e)})
            return
        await ch.send({"t": "attn.ok", "epoch": epoch})

    async def _step(self, collective: StepCollective, msg: dict) -> None:
        """One step for a batch of requests (rows of h). A row whose request this rank no longer
        holds (closed meanwhile) runs on a scratch cache, so every rank stays in step."""
        rids = [str(r) for r in msg.get("rids") or [msg.get("rid")]]
        h = unpack_tensor(msg["h"])  # [B, S, D]
        kvs = [self.sessions.get(rid) or self.shard.new_cache(h.shape[1]) for rid in rids]
        collective.begin(int(msg["step"]))
        fast = self.fast if msg.get("fast") else None
        if self.unlinked.intersection(rids) or (msg.get("fast") and fast is None):
            failure = AttentionNodeFailed(-1, f"rank {self.settings.rank} is not linked to the attention nodes") \
                if self.unlinked.intersection(rids) else "no data link to the master"
            await self._fail(collective, rids, f"rank {self.settings.rank}: {failure}", fast)
            return
        try:
            score = (torch.tensor(msg["targets"], dtype=torch.long), int(msg["score"])) if "score" in msg else None
            await self.shard.forward(h, kvs, collective, self.settings.step_timeout, score, fast)
        except AttentionNodeFailed as e:  # tell the hub at once: it rebuilds the KV elsewhere
            log.warning("step %s of %s lost its attention node: %s", msg["step"], rids, e)
            await self._fail(collective, rids, f"rank {self.settings.rank}: {e}", fast)
        except PeerFailed as e:  # a ring predecessor could not finish: pass it on around the ring
            log.warning("step %s of %s failed: %s", msg["step"], rids, e)
            await self._fail(collective, rids, str(e), fast)
        except (TransportError, TimeoutError) as e:  # a peer or ring neighbour is gone
            log.warning("step %s of %s failed: %s", msg["step"], rids, e)
            await self._close_all(rids)
        except SplitError as e:  # our own weights failed: tell the hub, which fails the request
            log.error("rank %d: %s", self.settings.rank, e)
            await self._fail(collective, rids, f"rank {self.settings.rank}: {e}", fast)
        except Exception as e:  # a bug must fail the step, not take the device down
            log.exception("rank %d: step %s failed unexpectedly", self.settings.rank, msg["step"])
            await self._fail(collective, rids, f"rank {self.settings.rank}: internal error {e!r}", fast)

    async def _fail(self, collective: StepCollective, rids: list[str], reason: str,
                    fast: FastStar | None = None) -> None:
        """Drop the step's requests and report why (to the hub, on the data plane when the step used
        it, and to the ring successor) so the cluster fails the step at once, not at its timeout."""
        await self._close_all(rids)
        if fast is not None:  # the hub's compute thread waits on the data link, not on the channel
            fast.report(ERROR, collective.star.seq + 1, reason)
        try:
            await collective.fail(reason)
        except TransportError as e:  # the peers are gone too: the master sees that by itself
            log.info("could not report the failure: %s", e)

    async def _close_all(self, rids: list[str]) -> None:
        for rid in rids:
            await self._close(rid)

    async def run(self) -> None:
        """Join, serve, and rejoin after the master disappears; PlanRefused ends it."""
        await stay_joined(self._join, self._serve, f"rank {self.settings.rank}")
