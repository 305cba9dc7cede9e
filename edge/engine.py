"""One rank's slice of the model and its forward pass, with the two all-reduces per layer.

The math is models.llama's; this module only slices weights by the plan and bridges the
compute thread to the event loop for the all-reduce.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import Checkpoint
from models.llama import KVCache, LayerWeights, forward_layers, load_layer
from models.rope import RotaryTable
from models.sharding import LocalDims
from transport.collectives import Collective


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
    """This rank's layers (its heads and MLP columns); forward runs on one compute thread."""

    def __init__(self, ckpt: Checkpoint, dims: LocalDims):
        self.config = ckpt.config
        self.dims = dims
        self.layers: list[LayerWeights] = [load_layer(ckpt, i, dims) for i in range(self.config.num_layers)]
        self.rotary = RotaryTable(self.config)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-r{dims.rank}")

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_layers, self.dims.n_local_kv_heads, self.config.head_dim)

    def nbytes(self) -> int:
        return sum(w.nbytes() for w in self.layers)

    async def forward(self, h: torch.Tensor, kv: KVCache, collective: Collective,
                      timeout: float) -> torch.Tensor:
        """h: [1, S, D] -> [1, S, D] (identical on every rank); raises what the collective raises."""
        loop = asyncio.get_running_loop()

        def reduce(partial: torch.Tensor) -> torch.Tensor:  # runs on the compute thread
            arr = partial.detach().contiguous().numpy()
            fut = asyncio.run_coroutine_threadsafe(collective.allreduce(arr), loop)
            return torch.from_numpy(np.asarray(fut.result(timeout + 1.0))).view(partial.shape)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return forward_layers(h, self.layers.__getitem__, self.config, self.dims, kv,
                                      self.rotary, reduce)

        return await loop.run_in_executor(self.compute, run)

    def close(self) -> None:
        self.compute.shutdown(wait=False, cancel_futures=True)
