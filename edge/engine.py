"""One rank's slice of the model and its forward pass, with the two all-reduces per layer.

The math is models.llama's; this module only slices weights by the plan and bridges the
compute thread to the event loop for the collectives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil
import torch

from edge.offload import batch_attend_for
from edge.rank_reduce import RankReduce
from edge.split import SplitError, SplitPlan, default_split_dir, plan_folder, split_model
from edge.trace import FORWARD, StepTrace
from edge.weights import BudgetTooSmall, WeightWindow
from models.attention import KVCache, KVStore
from models.checkpoint import Checkpoint
from models.config import LlamaConfig
from models.dtypes import dtype_name
from models.files import checkpoint_fingerprint
from models.fusion import fuse_layer
from models.kernel_warmup import held_weights, warm_formats
from models.llama import (
    HeadWeights,
    LayerWeights,
    forward_batch,
    forward_layers,
    load_layer,
    load_output_head,
    logits,
    no_reduce,
)
from models.rope import RotaryTable
from models.scoring import slice_scores
from models.sharding import LocalDims, kv_bytes_per_token
from transport.collectives import StarAllReduce, StepCollective
from transport.fastpath import FastStar

T = TypeVar("T")
log = logging.getLogger("edge_llm.engine")
MEMORY_REFRESH_S = 0.5  # free memory is read at most this often: /proc/meminfo costs ~30 us a read
_memory = {"at": float("-inf"), "available": 0}


def memory_available() -> int:
    """This machine's available memory (bytes) for the router, at most MEMORY_REFRESH_S old: every
    step reports it, and reading it fresh took 2% of a small model's decode step."""
    now = time.monotonic()
    if now - _memory["at"] > MEMORY_REFRESH_S:
        _memory["at"], _memory["available"] = now, psutil.virtual_memory().available
    return _memory["available"]


class ShardModel:
    """This rank's layers (its heads and MLP columns) and LM-head rows; torch runs on one thread.

    All torch work of the process goes through `run`, so a single OpenMP pool serves it: a
    second pool on the event-loop thread would spin and steal the cores of the first.
    """

    def __init__(self, config: LlamaConfig, dims: LocalDims, layers: Callable[[int], LayerWeights],
                 output: HeadWeights, nbytes: int, window: WeightWindow | None = None):
        self.config, self.dims = config, dims
        self.dtype = output.norm.dtype  # the weight (and activation, KV) dtype
        self.layers, self.output, self.window = layers, output, window
        self._nbytes = nbytes
        self.rotary = RotaryTable(self.config)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-r{dims.rank}")
        # Where a step's time goes on this rank (/metrics, scripts/profile_decode.py): the whole
        # forward on the compute thread, and the part of it spent in all-reduces (send + wait).
        self.timing = {"forward_s": 0.0, "allreduce_s": 0.0, "allreduces": 0, "forwards": 0}
        self.trace = StepTrace.from_env(dims.rank)  # None unless profiling (edge.trace)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dims: LocalDims) -> ShardModel:
        """Every layer resident, sliced straight from the Hugging Face files."""
        layers = [fuse_layer(load_layer(ckpt, i, dims)) for i in range(ckpt.config.num_layers)]
        output = load_output_head(ckpt, dims)
        nbytes = sum(w.nbytes() for w in layers) + output.lm_head.nbytes + output.norm.nbytes
        warm_formats(held_weights(layers, output))  # compiled now, not in the first request
        return cls(ckpt.config, dims, layers.__getitem__, output, nbytes)

    @classmethod
    def from_split(cls, config: LlamaConfig, dims: LocalDims, folder: Path, plan: SplitPlan,
                   budget_bytes: int, drop_cache: bool = True, kv_reserve_tokens: int = 2048,
                   verified: dict[str, dict] | None = None, in_memory: dict[str, dict] | None = None,
                   ) -> ShardModel:
        """Layers from per-layer shard files through a window that fits `budget_bytes`; `verified`:
        the manifest entries of files the caller has just checked (fetched), not hashed again;
        `in_memory`: the weights of some of those files, already in memory (not read back; a layer's
        entry is taken out of the dict as the window takes the layer)."""
        reserve = kv_bytes_per_token(config, dims, plan.element_bytes) * min(kv_reserve_tokens,
                                                                             config.max_position_embeddings)
        window = WeightWindow(folder, plan, dims.rank, config.num_layers, budget_bytes, reserve,
                              drop_cache=drop_cache, verified=verified, in_memory=in_memory)
        warm_formats(held_weights(window.resident_layers(), window.head))  # compiled now, not in a request
        return cls(config, dims, window, window.head, window.nbytes(), window)

    def new_cache(self, capacity: int = 64) -> KVCache:
        """A request's local KV cache, reserved for `capacity` positions (pages fill as it grows)."""
        capacity = max(1, min(capacity, self.config.max_position_embeddings))
        return KVCache(self.config.num_layers, self.dims.n_local_kv_heads, self.config.head_dim, capacity,
                       self.dtype)

    def nbytes(self) -> int:
        """Resident weight bytes (with a window: what stays, not what streams)."""
        return self._nbytes

    def stats(self) -> dict[str, float]:
        """Counters that ride along with every step's gather: weight window and step timing."""
        window = self.window.stats.as_dict() if self.window is not None else {}
        return window | self.timing

    async def run(self, fn: Callable[[], T]) -> T:
        """Run torch work on this rank's compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn)

    async def forward(self, h: torch.Tensor, kvs: list[KVStore], star: StarAllReduce | StepCollective,
                      timeout: float, score: tuple[torch.Tensor, int] | None = None,
                      fast: FastStar | None = None, every: bool = False) -> np.ndarray | None:
        """h: [B, S, D], one row per request -> next-token logits [B, V] at rank 0 (None elsewhere), or
        with `every` the logits after each of the S positions [B, S, V]; raises collective and
        attention-node errors.

        With `score` (targets [S-1], k; B == 1): each rank's slice scores of positions 0..S-2
        (models.scoring) instead, gathered side by side at rank 0: [S-1, N x (3 + 2k)]. With `fast`
        the all-reduces and the gather run on the compute thread over the data plane (every rank
        must agree).
        """
        loop = asyncio.get_running_loop()

        # One device has nothing to sum: no hop to the event loop and back.
        reduce = (no_reduce if self.dims.world_size == 1 else
                  RankReduce(star, fast, loop, timeout, self.timing, self.trace))

        def run() -> np.ndarray:
            began, entered = time.perf_counter(), self.trace.now() if self.trace else 0
            try:
                return forward()
            finally:
                self.timing["forward_s"] += time.perf_counter() - began
                self.timing["forwards"] += 1
                if self.trace:
                    self.trace.add(FORWARD, entered, self.trace.now())
                    self.trace.flush()

        def forward() -> np.ndarray:
            with torch.inference_mode():
                if len(kvs) == 1:
                    out = forward_layers(h, self.layers, self.config, self.dims, kvs[0], self.rotary, reduce)
                else:
                    attend = batch_attend_for(kvs, self.config, self.dims, h.shape[1])
                    out = forward_batch(h, self.layers, self.config, self.dims, kvs, self.rotary, reduce, attend)
                if score is not None:  # every position of the prompt but the last predicts the next token
                    full = logits(out[:, :-1], self.output, self.config.rms_norm_eps)[0]  # [S-1, V_local]
                    return slice_scores(full, score[0], self.dims.vocab_start, score[1]).numpy()
                if every:  # verifying drafted tokens: the prediction after each of them
                    return logits(out, self.output, self.config.rms_norm_eps).numpy()  # [B, S, V_local]
                return logits(out[:, -1:], self.output, self.config.rms_norm_eps)[:, -1].numpy()

        if fast is not None:  # the gather too, on the compute thread over the data plane
            full, metas = await self.run(lambda: self._gathered(run(), fast))
            self.mark("on_loop")
            star.peer_meta.update(metas)
            return full
        local = await self.run(run)  # [B, V_local] or [B, S, V_local]: this rank's vocabulary slice
        self.mark("on_loop")
        full = await star.gather(local, self._meta())
        self.mark("gathered")
        return full

    def _gathered(self, local: np.ndarray, fast: FastStar) -> tuple[np.ndarray | None, dict[int, dict]]:
        """On the compute thread: every rank's slice side by side at rank 0 (FastStar.gather)."""
        out = fast.gather(local, self._meta())
        self.mark("gathered")
        return out

    def _meta(self) -> dict:
        """What a worker reports with each step: its counters and free memory (the router's input).
        Rank 0 reports nothing: the hub reads its own counters directly and drops its own meta."""
        if self.dims.rank == 0:
            return {}
        return self.stats() | {"mem_available": memory_available()}

    def mark(self, stage: str) -> None:
        """A moment of a step outside the forward, when profiling (edge.trace.STAGES)."""
        if self.trace:
            self.trace.mark(stage)

    def close(self) -> None:
        self.compute.shutdown(wait=False, cancel_futures=True)
        if self.window is not None:
            self.window.close()


def load_shard(ckpt: Checkpoint, dims: LocalDims, world_size: int, weights: list[float] | None,
               budget_mb: float | None, split_dir: str | Path | None, split_all: bool = False,
               drop_cache: bool = True) -> ShardModel:
    """This rank's shard, in the checkpoint's read dtype and quantization (`ckpt.with_dtype`,
    `with_quant`): resident from the checkpoint, or windowed from split files (of that format) under a budget.

    Splits on first start (every rank with `split_all`, as the emulated cluster's master does;
    else only this rank) and repairs a damaged split the same way. Raises SplitError / BudgetTooSmall.
    """
    if budget_mb is None:
        return ShardModel.from_checkpoint(ckpt, dims)
    dtype, quantize = dtype_name(ckpt.dtype), ckpt.quant_label
    folder = Path(split_dir) if split_dir else default_split_dir(ckpt.folder, dtype, quantize)
    plan = SplitPlan(world_size, tuple(weights or [1.0] * world_size), checkpoint_fingerprint(ckpt.folder), dtype,
                     quantize, ckpt.plan_align())
    budget = int(budget_mb * (1 << 20))
    folder = plan_folder(folder, plan)
    try:
        return ShardModel.from_split(ckpt.config, dims, folder, plan, budget, drop_cache)
    except BudgetTooSmall:
        raise
    except SplitError as e:
        log.info("%s; splitting %s into %s", e, ckpt.folder, folder)
    split_model(ckpt.folder, world_size, weights, folder, ranks=None if split_all else [dims.rank], dtype=dtype,
                quantize=quantize)
    return ShardModel.from_split(ckpt.config, dims, folder, plan, budget, drop_cache)
