"""The cluster's plan: how the model is split (device weights -> each rank's heads and MLP columns),
decided once, and the Plan message each joining worker gets (with its shard files to fetch when it
has no checkpoint of its own).

With `--weights auto` the plan waits until every device has sent its measured profile.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

from edge.fetch import serve_fetches
from edge.messages import Plan
from edge.profile import measure_device, weights_from_profiles
from edge.split import MANIFEST, default_split_dir, rank_dir, split_model
from models.checkpoint import Checkpoint
from models.dtypes import dtype_name
from models.quant import check_quantizable
from models.sharding import LocalDims, PlanError, local_dims
from transport.channel import Channel

log = logging.getLogger("edge_llm.master")
PLAN_WAIT_S = 600.0  # how long a joining worker waits for the others' profiles under --weights auto


def plannable(ckpt: Checkpoint, world_size: int, weights: list[float] | None, quantize: str) -> Checkpoint:
    """The checkpoint as the cluster will hold it. Under --quantize auto, stored blocks whose groups
    this plan would cut (a head narrower than a group, say) are served as floats instead, with a
    warning; an explicit int4 that cannot be planned raises PlanError / CheckpointError at start."""
    check_quantizable(ckpt.config, ckpt.quant)
    try:
        local_dims(ckpt.config, world_size, weights, ckpt.plan_align())
    except PlanError as e:
        if quantize != "auto" or ckpt.plan_align() == (1, 1):
            raise
        log.warning("%s; serving the checkpoint's quantized blocks dequantized to %s instead", e, dtype_name(ckpt.dtype))
        return ckpt.with_quant("none")
    return ckpt


class Planner:
    """Decides the device weights once (given, or from every device's profile) and calls
    `on_decided(weights, rank 0's dims)` (which loads rank 0's slice); then answers each worker's
    join with the plan."""

    def __init__(self, ckpt: Checkpoint, world_size: int, weights: list[float] | None, auto: bool,
                 split_dir: str | None, on_decided: Callable[[list[float], LocalDims], None]):
        self.ckpt, self.world_size, self.auto = ckpt, world_size, auto
        self.align = ckpt.plan_align()  # slices of o_proj / down_proj never cut a quantization group
        self.split_dir = Path(split_dir) if split_dir else default_split_dir(ckpt.folder, dtype_name(ckpt.dtype),
                                                                             ckpt.quant_label)
        self._on_decided = on_decided
        self._profiles: dict[int, dict] = {}
        self._verified: dict[int, tuple] = {}  # rank -> state of its split files when last verified
        self._decided = asyncio.Event()
        self.weights: list[float] = []
        self.dims: list[LocalDims] = []
        if auto:  # the plan waits for every device's measurements
            local_dims(ckpt.config, world_size, align=self.align)  # refuse impossible worker counts now
            self._profiles[0] = measure_device()
        else:
            self._decide(weights)  # PlanError / BudgetTooSmall at start

    @property
    def decided(self) -> bool:
        return self._decided.is_set()

    def _decide(self, weights: list[float] | None) -> None:
        self.weights = weights or [1.0] * self.world_size
        self.dims = local_dims(self.ckpt.config, self.world_size, self.weights, self.align)
        self._on_decided(self.weights, self.dims[0])
        self._decided.set()

    async def plan_for(self, rank: int, profile: object, fetch: bool) -> Plan:
        """The plan for a worker that joined (waiting for the others' profiles under auto); with
        `fetch`, the names and checksums of its shard files and config.json."""
        if self.auto and not self.decided:
            await self._add_profile(rank, profile)
        plan = Plan(self.world_size, self.weights, dtype_name(self.ckpt.dtype), self.ckpt.quant_label,
                    list(self.align))
        if not fetch:
            return plan
        files, split_plan = await self._fetch_offer(rank)
        config = json.loads((self.ckpt.folder / "config.json").read_text())
        return Plan(**{**vars(plan), "fetch": {"files": files, "plan": split_plan}, "config": config})

    async def serve_fetch(self, ch: Channel, plan: Plan) -> None:
        """Serve the files offered in `plan` until the worker says it is done."""
        if plan.fetch is not None:
            await serve_fetches(ch, self.split_dir, set(plan.fetch["files"]))

    async def _add_profile(self, rank: int, profile: object) -> None:
        self._profiles[rank] = profile if isinstance(profile, dict) else {}
        if len(self._profiles) == self.world_size:
            profiles = [self._profiles[r] for r in range(self.world_size)]
            weights: list[float] | None = weights_from_profiles(profiles, self.ckpt.model_bytes())
            try:
                local_dims(self.ckpt.config, self.world_size, weights, self.align)
            except PlanError as e:
                log.warning("measured weights %s cannot work (%s); splitting evenly", weights, e)
                weights = None
            log.info("--weights auto: profiles %s -> weights %s", profiles, weights)
            await asyncio.to_thread(self._decide, weights)
        async with asyncio.timeout(PLAN_WAIT_S):
            await self._decided.wait()

    def _rank_files_state(self, rank: int) -> tuple:
        """(name, size, mtime) of a rank's split files and the manifest: unchanged means still verified."""
        folder = self.split_dir / rank_dir(self.world_size, rank)
        paths = [self.split_dir / MANIFEST, *sorted(folder.glob("*"))] if folder.is_dir() else []
        return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file())

    async def _fetch_offer(self, rank: int) -> tuple[dict, dict]:
        """Split `rank`'s files here if needed -> (their manifest entries, the split's plan).

        Files verified (sha256) at an earlier join are not hashed again while their sizes and
        modification times are unchanged: a rejoining worker costs no read of its shard.
        """
        state = await asyncio.to_thread(self._rank_files_state, rank)
        if not state or self._verified.get(rank) != state:
            await asyncio.to_thread(split_model, self.ckpt.folder, self.world_size, self.weights, self.split_dir,
                                    [rank], True, dtype_name(self.ckpt.dtype), self.ckpt.quant_label)
            self._verified[rank] = await asyncio.to_thread(self._rank_files_state, rank)
        manifest = json.loads((self.split_dir / MANIFEST).read_text())
        prefix = rank_dir(self.world_size, rank) + "/"
        return {n: e for n, e in manifest["files"].items() if n.startswith(prefix)}, manifest["plan"]
