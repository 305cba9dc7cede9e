"""One rank's slice of the model and its forward pass, with the two all-reduces per layer.

The math is models.llama's; this module only slices weights by the plan and bridges the
compute thread to the event loop for the collectives.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from models.checkpoint import Checkpoint
from models.llama import KVCache, LayerWeights, forward_layers, load_layer, load_output_head, logits
from models.rope import RotaryTable
from models.sharding import LocalDims
from transport.collectives import StarAllReduce

T = TypeVar("T")


def checkpoint_fingerprint(folder: Path | str) -> str:
    """Identifies a checkpoint by its config and weight-file headers (cheap: no tensor data read)."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            digest.update(path.name.encode() + fh.read(min(size, 1 << 24)))
        digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]


class ShardModel:
    """This rank's layers (its heads and MLP columns) and LM-head rows; torch runs on one thread.

    All torch work of the process goes through `run`, so a single OpenMP pool serves it: a
    second pool on the event-loop thread would spin and steal the cores of the first.
    """

    def __init__(self, ckpt: Checkpoint, dims: LocalDims):
        self.config = ckpt.config
        self.dims = dims
        self.layers: list[LayerWeights] = [load_layer(ckpt, i, dims) for i in range(self.config.num_layers)]
        self.output = load_output_head(ckpt, dims)
        self.rotary = RotaryTable(self.config)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-r{dims.rank}")

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_layers, self.dims.n_local_kv_heads, self.config.head_dim)

    def nbytes(self) -> int:
        return sum(w.nbytes() for w in self.layers) + self.output.lm_head.nbytes

    async def run(self, fn: Callable[[], T]) -> T:
        """Run torch work on this rank's compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn)

    async def forward(self, h: torch.Tensor, kv: KVCache, star: StarAllReduce,
                      timeout: float) -> np.ndarray | None:
        """h: [1, S, D] -> next-token logits [V] at rank 0 (None elsewhere); raises collective errors."""
        loop = asyncio.get_running_loop()

        def reduce(partial: torch.Tensor) -> torch.Tensor:  # runs on the compute thread
            arr = partial.detach().contiguous().numpy()
            fut = asyncio.run_coroutine_threadsafe(star.allreduce(arr), loop)
            return torch.from_numpy(np.asarray(fut.result(timeout + 1.0))).view(partial.shape)

        def run() -> np.ndarray:
            with torch.inference_mode():
                out = forward_layers(h, self.layers.__getitem__, self.config, self.dims, kv,
                                     self.rotary, reduce)
                return logits(out[:, -1:], self.output, self.config.rms_norm_eps)[0, -1].numpy()

        local = await self.run(run)  # [V_local]: this rank's vocabulary slice
        return await star.gather(local)

    def close(self) -> None:
        self.compute.shutdown(wait=False, cancel_futures=True)
