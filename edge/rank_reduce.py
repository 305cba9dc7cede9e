"""A rank's `reduce` for one forward: each layer's partial output summed over the cluster, on the
compute thread, over the data plane (transport.fastpath) or through the event loop's StarAllReduce.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch

from edge.trace import ALLREDUCE, StepTrace
from transport.collectives import StarAllReduce, StepCollective
from transport.fastpath import FastStar


class RankReduce:
    """Callable as models.llama's `reduce` (a partial tensor [B, S, D] -> the sum), and as `arrays`
    (a float32 array -> the sum), which models.decode_step takes when it is there.

    Why the array form: a decode step computes on arrays, and the tensor round trip around the sum
    (two conversions each way) cost 30-35 us of each all-reduce's ~80 us on a 2-device `large` int4
    decode, with the caches cold after each GEMV (scratch timing inside the cluster, medians).
    """

    def __init__(self, star: StarAllReduce | StepCollective, fast: FastStar | None, loop: asyncio.AbstractEventLoop,
                 timeout: float, timing: dict, trace: StepTrace | None):
        self.star, self.fast, self.loop, self.timeout = star, fast, loop, timeout
        self.timing, self.trace = timing, trace

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        # bf16/fp16 partials travel as float32 (exact) and are summed in float32 in rank order;
        # every rank rounds the same sum to the activation dtype, so all ranks stay identical.
        summed = self.arrays(partial.detach().float().contiguous().numpy())
        return torch.from_numpy(summed).view(partial.shape).to(partial.dtype)

    def arrays(self, partial: np.ndarray) -> np.ndarray:
        """float32 partial (any shape) -> the float32 sum of every rank's partial, in rank order."""
        began, entered = time.perf_counter(), self.trace.now() if self.trace else 0
        if self.fast is not None:
            summed = self.fast.allreduce(partial)
        else:
            future = asyncio.run_coroutine_threadsafe(self.star.allreduce(partial), self.loop)
            summed = future.result(self.timeout + 1.0)
        self.timing["allreduce_s"] += time.perf_counter() - began
        self.timing["allreduces"] += 1
        if self.trace:
            self.trace.add(ALLREDUCE, entered, self.trace.now())
        return np.asarray(summed).reshape(partial.shape)
