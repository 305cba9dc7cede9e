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
from edge.split import MANIFEST, SplitPlan, default_split_dir, plan_folder, rank_dir, split_model
from models.checkpoint import Checkpoint
from models.dtypes import dtype_name
from models.quant import check_quantizable
from models.sharding import LocalDims, PlanError, local_dims
from models.threads import in_passing_thread, to_passing_thread
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
    """Decides each device's weight once (given, or from every device's profile) and calls
    `on_decided(weights, rank 0's dims)` (which loads rank 0's slice); then answers each worker's
    join with the plan. The plan covers a layout: the devices serving now, by position (device 0,
    the master, is always first); a re-plan after a device is lost or comes back adopts another."""

    def __init__(self, ckpt: Checkpoint, fingerprint: str, world_size: int, weights: list[float] | None,
                 auto: bool, split_dir: str | None, on_decided: Callable[[list[float], LocalDims], None]):
        self.ckpt, self.fingerprint, self.world_size, self.auto = ckpt, fingerprint, world_size, auto
        self.align = ckpt.plan_align()  # slices of o_proj / down_proj never cut a quantization group
        self.split_dir = Path(split_dir) if split_dir else default_split_dir(ckpt.folder, dtype_name(ckpt.dtype),
                                                                             ckpt.quant_label)
        self._on_decided = on_decided
        self._profiles: dict[int, dict] = {}
        self._verified: dict[tuple, tuple] = {}  # (folder, position) -> its split files when last verified
        self._decided = asyncio.Event()
        self.device_weights: list[float] = []  # by device, for any layout
        self.devices: list[int] = list(range(world_size))  # the layout served now: position -> device
        self.epoch = 0  # one more per re-plan
        self.weights: list[float] = []  # by position
        self.dims: list[LocalDims] = []
        if auto:  # the plan waits for every device's measurements
            local_dims(ckpt.config, world_size, align=self.align)  # refuse impossible worker counts now
            self._profiles[0] = measure_device()
        else:
            in_passing_thread(self._decide, weights)  # PlanError / BudgetTooSmall at start

    @property
    def decided(self) -> bool:
        return self._decided.is_set()

    def _decide(self, weights: list[float] | None) -> None:
        self.device_weights = weights or [1.0] * self.world_size
        self.weights, self.dims = self.layout(self.devices)
        self._on_decided(self.weights, self.dims[0])
        self._decided.set()

    def layout(self, devices: list[int]) -> tuple[list[float], list[LocalDims]]:
        """Weights and slices (by position) of a plan over `devices`; PlanError when impossible."""
        weights = [self.device_weights[d] for d in devices]
        return weights, local_dims(self.ckpt.config, len(devices), weights, self.align)

    def adopt(self, devices: list[int], weights: list[float], dims: list[LocalDims]) -> None:
        """Serve the plan over `devices` from now on (a re-plan)."""
        self.devices, self.weights, self.dims = list(devices), weights, dims
        self.epoch += 1

    async def plan_for(self, rank: int, profile: object, fetch: bool) -> Plan:
        """The plan for a worker that joined (waiting for the others' profiles under auto): the plan
        served now, or, for a device that is not in it (it comes back), the plan that adds it; with
        `fetch`, the names and checksums of its shard files and config.json."""
        if self.auto and not self.decided:
            await self._add_profile(rank, profile)
        devices = self.devices if rank in self.devices else sorted({*self.devices, rank})
        weights = self.layout(devices)[0]
        return await self.plan_message(devices.index(rank), weights, fetch)

    async def plan_message(self, position: int, weights: list[float], fetch: bool) -> Plan:
        plan = Plan(len(weights), weights, dtype_name(self.ckpt.dtype), self.ckpt.quant_label, list(self.align),
                    position=position)
        if not fetch:
            return plan
        files, split_plan = await self._fetch_offer(position, weights)
        config = json.loads((self.ckpt.folder / "config.json").read_text())
        return Plan(**{**vars(plan), "fetch": {"files": files, "plan": split_plan}, "config": config})

    async def serve_fetch(self, ch: Channel, plan: Plan) -> None:
        """Serve the files offered in `plan` until the worker says it is done."""
        if plan.fetch is not None:
            await serve_fetches(ch, self._folder(plan.weights), set(plan.fetch["files"]))

    def _folder(self, weights: list[float]) -> Path:
        """The split folder of the plan with these weights (a subfolder for a re-planned layout)."""
        plan = SplitPlan(len(weights), tuple(weights), self.fingerprint,
                         dtype_name(self.ckpt.dtype), self.ckpt.quant_label, self.align)
        return plan_folder(self.split_dir, plan)
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
            await to_passing_thread(self._decide, weights)
        async with asyncio.timeout(PLAN_WAIT_S):
            await self._decided.wait()

    def _rank_files_state(self, folder: Path, world_size: int, position: int) -> tuple:
        """(name, size, mtime) of a position's split files and the manifest: unchanged means still verified."""
        part = folder / rank_dir(world_size, position)
        paths = [folder / MANIFEST, *sorted(part.glob("*"))] if part.is_dir() else []
        return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file())

    async def _fetch_offer(self, position: int, weights: list[float]) -> tuple[dict, dict]:
        """Split `position`'s files of the plan with `weights` here if needed -> (their manifest
        entries, the split's plan).

        Files verified (sha256) at an earlier join are not hashed again while their sizes and
        modification times are unchanged: a rejoining worker costs no read of its shard.
        """
        world, folder = len(weights), self._folder(weights)
        state = await asyncio.to_thread(self._rank_files_state, folder, world, position)
        if not state or self._verified.get((folder, position)) != state:
            await to_passing_thread(split_model, self.ckpt.folder, world, weights, folder, [position], True,
                                    dtype_name(self.ckpt.dtype), self.ckpt.quant_label)
            self._verified[(folder, position)] = await asyncio.to_thread(self._rank_files_state, folder, world,
                                                                         position)
        manifest = json.loads((folder / MANIFEST).read_text())
        prefix = rank_dir(world, position) + "/"
        return {n: e for n, e in manifest["files"].items() if n.startswith(prefix)}, manifest["plan"]
