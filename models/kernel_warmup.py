"""Compile a loaded model's quantized-weight kernels when it is loaded, not at its first request.

Why: numba compiles a kernel at its first call, or loads it from its on-disk cache then.
`warm_kernels` (models.quant_kernels) covers the float32 GEMV and a decode step's small ops. The
GEMV and prefill kernels of the quantized formats (int8, int8g, int4, and the VNNI variants on
hosts that have it) were compiled in the middle of the first request instead, on every device.
With numba's cache cleared, as on a fresh clone, the default model's first answer in
`bash scripts/quickstart.sh` took 7.0 s instead of 1.2 s.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import fields

import numpy as np
import torch

from models.numba_target import numba
from models.quant import QuantWeight
from models.quant_kernels import CHUNKED_ROWS, gemv_rows, kernel_serves, linear
from models.threads import in_passing_thread

_warmed: set[tuple[str, int]] = set()  # (format, tile width) run through both paths in this process
_lock = threading.Lock()


def held_weights(layers: Iterable[object], *heads: object) -> list[object]:
    """Every field of the given layer and head weight records (models.llama's dataclasses)."""
    return [getattr(record, f.name) for record in (*layers, *heads) for f in fields(record)]


def warm_formats(weights: Iterable[object]) -> None:
    """Run each quantized format among `weights` once through the decode GEMV (one row) and the
    prefill path (dequantize + GEMM), on its smallest weight of each tile width (the VNNI kernel
    depends on it): the kernels a step will call are then compiled, or loaded from numba's
    cache. A format this process ran before is skipped. On a thread that ends with it
    (models.threads.in_passing_thread)."""
    if numba is None:
        return
    with _lock:
        smallest: dict[tuple[str, int], QuantWeight] = {}
        for w in weights:
            if isinstance(w, QuantWeight) and kernel_serves(w) and (w.kind, w.tile) not in _warmed:
                key = (w.kind, w.tile)
                if key not in smallest or w.nbytes < smallest[key].nbytes:
                    smallest[key] = w
        if smallest:
            in_passing_thread(_run, list(smallest.values()))
            _warmed.update(smallest)


def _run(weights: list[QuantWeight]) -> None:
    for w in weights:
        k = w.shape[1]
        gemv_rows(np.ones((1, k), np.float32), w)  # [1, K] -> [1, N]: a decode step's GEMV
        linear(torch.ones(CHUNKED_ROWS + 1, k), w)  # more rows than GEMV passes take: a prefill's path
