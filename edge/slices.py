"""One device's slice of the model for the plan it is given: which plans it accepts, and loading
its slice from its own checkpoint (or split) or from shard files fetched from the master. A slice
it already holds for the same plan is kept, not read again; a fetching device that re-plans
fetches only what its old slice lacks (edge.reslice)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edge.engine import ShardModel, load_shard
from edge.fetch import fetch_files
from edge.messages import Plan
from edge.reslice import HeldSlice, Reslice
from edge.split import SplitPlan, plan_folder
from models.checkpoint import Checkpoint
from models.config import config_from_hf
from models.dtypes import DTYPES
from models.quant import QUANT_CHOICES
from models.sharding import local_dims
from models.threads import to_passing_thread
from transport.channel import Channel
from transport.errors import FrameError

log = logging.getLogger("edge_llm.worker")


class PlanRefused(Exception):
    """The master refused this worker (wrong checkpoint, bad rank), or its plan cannot be followed;
    fatal, reported and exit 2."""


@dataclass(frozen=True)
class SliceSettings:
    rank: int | None
    dtype: str | None  # refuse a master that holds weights in another dtype (None: follow it)
    quantize: str | None  # refuse a master that quantizes otherwise (None: follow it)
    memory_budget_mb: float | None
    split_dir: str | None
    keep_page_cache: bool


class SliceLoader:
    """Holds `shard`, the slice of the plan `key` (world size, weights, dtype, quantize, alignment,
    position); `ckpt` is None on a device that fetches its slices."""

    def __init__(self, settings: SliceSettings, ckpt: Checkpoint | None):
        self.settings, self.ckpt = settings, ckpt
        self.shard: ShardModel | None = None
        self.key: tuple | None = None
        self.fetched_bytes = 0
        self.held: HeldSlice | None = None  # the files of a fetched slice, to assemble the next one from

    def check(self, plan: Plan) -> tuple:
        """The plan's key (world size, weights, dtype, quantize, alignment); PlanRefused when this
        worker cannot or was told not to follow it."""
        s = self.settings
        if plan.dtype not in DTYPES:
            raise PlanRefused(f"the master holds weights in {plan.dtype!r}, which this worker does not support")
        if s.dtype not in (None, "auto", plan.dtype):
            raise PlanRefused(f"the master holds weights in {plan.dtype}, this worker was started with --dtype {s.dtype}")
        if plan.quantize not in QUANT_CHOICES:
            raise PlanRefused(f"the master quantizes weights as {plan.quantize!r}, which this worker does not support")
        if s.quantize not in (None, "auto", plan.quantize):
            raise PlanRefused(f"the master quantizes weights as {plan.quantize}, this worker was started with "
                              f"--quantize {s.quantize}")
        if len(plan.align) != 2 or min(plan.align) < 1:
            raise PlanRefused(f"the master's plan has alignment {plan.align!r}, expected two positive integers")
        position = s.rank if plan.position is None else plan.position
        if not 0 <= position < plan.world_size or len(plan.weights) != plan.world_size:
            raise PlanRefused(f"the master's plan puts this device at {position} of {plan.world_size} "
                              f"with {len(plan.weights)} weights")
        return (plan.world_size, tuple(float(w) for w in plan.weights), plan.dtype, plan.quantize, tuple(plan.align),
                position)

    def load_local(self, key: tuple) -> None:
        """This device's slice for the plan `key` from its own checkpoint (or split), unless held already."""
        if self.key == key:
            return
        s = self.settings
        world, weights, dtype, quantize, align, position = key
        dims = local_dims(self.ckpt.config, world, list(weights), align)[position]
        shard = load_shard(self.ckpt.with_dtype(DTYPES[dtype]).with_quant(quantize), dims, world, list(weights),
                           s.memory_budget_mb, s.split_dir, drop_cache=not s.keep_page_cache)
        if self.shard is not None:
            self.shard.close()
        self.shard, self.key, self.held, self.fetched_bytes = shard, key, None, 0

    async def load_fetched(self, ch: Channel, fetch: dict, config_json: dict | None, key: tuple) -> None:
        """Fetch this device's shard files from the master (only what is missing or stale), then load."""
        s = self.settings
        try:
            files, fetch_plan, fingerprint = fetch["files"], fetch["plan"], fetch["plan"]["fingerprint"]
            config = config_from_hf(config_json or {})
        except (KeyError, TypeError, ValueError) as e:
            raise FrameError(f"the master's fetch offer is malformed: {e!r}") from e
        split_plan = SplitPlan(*key[:2], fingerprint, *key[2:5])
        dest = plan_folder(Path(s.split_dir or f"edge-llm-shards/{fingerprint}"), split_plan)
        dims = local_dims(config, key[0], list(key[1]), key[4])[key[5]]
        reslice = None  # a re-plan: assemble from the slice held, keeping the result when all stays resident
        if self.held is not None and self.key[2:5] == key[2:5]:
            reslice = Reslice(self.held, dims, keep=not s.memory_budget_mb)
        self.fetched_bytes = await fetch_files(ch, files, fetch_plan, dest, reslice)
        log.info("rank %d: fetched %d bytes of shard files into %s", s.rank, self.fetched_bytes, dest)
        budget = int(s.memory_budget_mb * (1 << 20)) if s.memory_budget_mb else 1 << 62
        shard = await to_passing_thread(ShardModel.from_split, config, dims, dest, split_plan, budget,
                                        not s.keep_page_cache, verified=files,  # fetch_files checked them
                                        in_memory=reslice.kept if reslice is not None else None)
        if self.shard is not None:
            self.shard.close()
        self.shard, self.key, self.held = shard, key, HeldSlice(dest, key[0], dims)

    def close(self) -> None:
        if self.shard is not None:
            self.shard.close()
