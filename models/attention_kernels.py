"""Attention of a few new positions over a float32 KV cache, in one numba-compiled call.

Why: a decode step attends one query per head over the cache. In torch that is ten small ops per
layer (the cache writes, two matmuls, the scale, the softmax, the reshapes), each paying its own
dispatch: 49 us per layer for SmolLM2-135M on one thread, about 1.5 ms per token over 30 layers,
where the arithmetic takes a few microseconds. This kernel does the same math in one call: for
each query head h (KV head kv_map[h]) and new position p, softmax over the visible keys t (t <= p,
and t > p - window for a sliding layer) of q.k_t / sqrt(head_dim), then the weighted sum of v_t.
Sums run in float32 in key order (torch's GEMM sums in another order: the two agree to rounding).

Prefills (more than `MAX_POSITIONS` new positions) and other dtypes keep the torch path
(models.attention.grouped_attention), whose multi-threaded matmuls they need.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_POSITIONS = 8  # new positions per row up to which the kernel runs (a decode step, a verification)

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba ships wheels for every platform we target
    njit = None


if njit is not None:
    @njit(fastmath=True, cache=True, nogil=True)
    def _attend(q, k, v, keys, values, kv_map, start, window, out):  # pragma: no cover - compiled
        """q [H, S, hd], k, v [KV, S, hd] (RoPE applied) at positions start..start+S-1; keys/values
        [KV, cap, hd] holding 0..start-1 (k, v are written after them); kv_map [H] int64; window
        (0: none) -> out [H, S, hd]."""
        n_heads, seqlen, head_dim = q.shape
        keys[:, start:start + seqlen] = k
        values[:, start:start + seqlen] = v
        scale = np.float32(1.0 / math.sqrt(head_dim))
        scores = np.empty(start + seqlen, np.float32)
        acc = np.empty(head_dim, np.float32)
        for h in range(n_heads):
            kh, vh = keys[kv_map[h]], values[kv_map[h]]
            for s in range(seqlen):
                pos = start + s
                first = max(0, pos - window + 1) if window > 0 else 0
                qs = q[h, s]
                best = np.float32(-np.inf)
                for t in range(first, pos + 1):
                    kt = kh[t]
                    dot = np.float32(0.0)
                    for d in range(head_dim):
                        dot += qs[d] * kt[d]
                    dot *= scale
                    scores[t] = dot
                    best = max(best, dot)
                total = np.float32(0.0)
                for t in range(first, pos + 1):
                    e = np.float32(math.exp(scores[t] - best))
                    scores[t] = e
                    total += e
                acc[:] = 0.0
                for t in range(first, pos + 1):
                    p, vt = scores[t] / total, vh[t]
                    for d in range(head_dim):
                        acc[d] += p * vt[d]
                out[h, s] = acc


def kernel_applies(q: torch.Tensor, cache_dtype: torch.dtype) -> bool:
    """True when `attend_cached` serves this call: numba present, one row, float32, a few positions."""
    return njit is not None and q.shape[0] == 1 and q.shape[2] <= MAX_POSITIONS and q.dtype == cache_dtype == torch.float32


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  kv_map: np.ndarray, start: int, window: int | None) -> torch.Tensor:
    """q: [1, H, S, hd], k, v: [1, KV, S, hd] at positions start..start+S-1; keys, values: the cache
    buffers [1, KV, capacity >= start + S, hd] holding positions 0..start-1 -> [1, H, S, hd], with
    k and v written into the cache: causal (and sliding-window) attention, as
    models.attention.grouped_attention computes it."""
    out = torch.empty(q.shape[1:], dtype=torch.float32)
    _attend(q[0].numpy(), k[0].numpy(), v[0].numpy(), keys[0].numpy(), values[0].numpy(), kv_map, start,
            window or 0, out.numpy())
    return out[None]
