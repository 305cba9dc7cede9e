"""The small ops of a decode step in float32, one numba-compiled call each: attention of a few new
positions over the KV cache, RMSNorm, RoPE, SiLU(gate) x up.

Why: a step's GEMVs stream the weights (models.quant_kernels); everything between them is a few
microseconds of arithmetic spread over many torch ops, each paying its own dispatch.

Attention of one query per head over the cache is ten small torch ops per layer (the cache writes,
two matmuls, the scale, the softmax, the reshapes): 49 us per layer for SmolLM2-135M on one
thread, about 1.5 ms per token over 30 layers, where the arithmetic takes a few microseconds. The
kernel (models.attention_kernels) does the same math in one call (17 us with the call's own cost).

RMSNorm (5 torch ops, 15 us) and RoPE of q and k (3 ops and a view each, 13 us) are one call of
3-4 us. SiLU(gate) x up is 3 us a layer for SmolLM2-135M's 768 columns of a rank in two (torch's
silu and mul there: 8 us), 13 us for the `large` preset's 2816 (torch: 37): measured inside a
rank's decode step, where the weights just streamed have pushed the ops' own state out of cache.
Prefills (more than `MAX_POSITIONS` new positions a row) and other dtypes keep the torch path
(models.attention.grouped_attention, models.llama.rms_norm, models.rope.apply_rope_tables), whose
multi-threaded ops they need and which the kernels must agree with to rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.attention_kernels import CHUNK, attend_arrays
from models.numba_target import numba

MAX_POSITIONS = 8  # new positions a row up to which the kernels run (a decode step, a verification)

njit = numba.njit if numba is not None else None


if njit is not None:
    @njit(fastmath=True, cache=True, nogil=True)
    def _rms_norm(x, weight, eps, out):  # pragma: no cover - compiled
        """x [R, D] -> out [R, D] = weight * x / sqrt(mean(x^2) + eps), summed in float32."""
        for r in range(x.shape[0]):
            xr = x[r]
            total = np.float32(0.0)
            for d in range(xr.shape[0]):
                total += xr[d] * xr[d]
            inv = np.float32(1.0) / np.sqrt(total / np.float32(xr.shape[0]) + eps)
            for d in range(xr.shape[0]):
                out[r, d] = weight[d] * (xr[d] * inv)

    @njit(cache=True, nogil=True)
    def _silu_mul(gate, up):  # pragma: no cover - compiled
        """gate, up [R, N] -> gate = silu(gate) * up, in place: gate / (1 + exp(-gate)) as torch's
        F.silu writes it, times up, each operation rounded to float32 (no fast-math)."""
        for r in range(gate.shape[0]):
            for c in range(gate.shape[1]):
                g = gate[r, c]
                gate[r, c] = (g / (np.float32(1.0) + np.float32(math.exp(-g)))) * up[r, c]

    @njit(cache=True, nogil=True)
    def _rope(x, cos, signed_sin, out):  # pragma: no cover - compiled
        """x [B, S, H, hd]; cos, signed_sin [1 | B, S, hd] -> out [B, S, H, hd]:
        x * cos + roll(x, hd / 2) * signed_sin (rotate_half, as models.rope.apply_rope_tables)."""
        rows, seqlen, n_heads = x.shape[:3]
        for b in range(rows):
            tb = b if cos.shape[0] > 1 else 0
            for s in range(seqlen):
                for h in range(n_heads):
                    rope_head(x[b, s, h], cos[tb, s], signed_sin[tb, s], out[b, s, h])

    @njit(cache=True, nogil=True)
    def rope_head(x, c, sn, out):  # pragma: no cover - compiled
        """One head at one position: x, c, sn [hd] -> out [hd]. No fast-math: each product rounded,
        then the sum, with no fused multiply-add, so every caller (models.step_attention too) gets
        the same bits wherever the compiler inlines it; elementwise, it vectorizes all the same."""
        half = x.shape[0] // 2
        for i in range(half):
            out[i] = x[i] * c[i] + x[i + half] * sn[i]
        for i in range(half, x.shape[0]):
            out[i] = x[i] * c[i] + x[i - half] * sn[i]


def small_float32(x: torch.Tensor) -> bool:
    """True when the kernels serve x [..., D]: numba present, float32, at most MAX_POSITIONS rows."""
    rows = x.numel() // max(x.shape[-1], 1)
    return njit is not None and x.dtype == torch.float32 and rows <= MAX_POSITIONS


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D] float32 -> [..., D]: models.llama.rms_norm in one call."""
    d = x.shape[-1]
    rows = np.ascontiguousarray(x.numpy().reshape(-1, d))  # a view of a strided x is copied
    return torch.from_numpy(rms_norm_array(rows, weight.numpy(), eps)).view(x.shape)


def rms_norm_array(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """x [R, D] float32, C-contiguous; weight [D] float32 -> [R, D] (into `out`, C-contiguous, when given)."""
    out = np.empty_like(x) if out is None else out
    _rms_norm(x, weight, np.float32(eps), out)
    return out


def silu_mul_array(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gate, up [R, N] float32 (gate C-contiguous, written) -> gate = silu(gate) * up.

    Against torch's F.silu(gate) * up: the same operations in the same order, with the C library's
    exp where torch has its own vectorized one (both within an ulp): the results agree to 2 ulp."""
    _silu_mul(gate, up)
    return gate


def silu_mul_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: [..., N] float32 -> silu(gate) * up (a new tensor; models.llama.mlp's activation)."""
    n = gate.shape[-1]
    rows = np.array(gate.numpy().reshape(-1, n), copy=True)  # [R, N], written by the kernel
    ups = np.ascontiguousarray(up.numpy().reshape(-1, n))  # one compiled signature for every call
    return torch.from_numpy(silu_mul_array(rows, ups)).view(gate.shape)


def rope_heads(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, hd] float32 (heads not yet moved before positions); cos, signed_sin: the step's
    tables ([S, hd] or [B, 1, S, hd], models.rope.rope_tables) -> rotated [B, S, H, hd]."""
    seqlen, head_dim = x.shape[1], x.shape[3]
    tables = [t.numpy().reshape(-1, seqlen, head_dim) for t in (cos, signed_sin)]  # [1 | B, S, hd]
    return torch.from_numpy(rope_array(np.ascontiguousarray(x.numpy()), *tables))


def rope_array(x: np.ndarray, cos: np.ndarray, signed_sin: np.ndarray) -> np.ndarray:
    """x [B, S, H, hd] float32, C-contiguous; cos, signed_sin [1 | B, S, hd] -> rotated [B, S, H, hd]."""
    out = np.empty_like(x)
    _rope(x, cos, signed_sin, out)
    return out


def warm_decode_kernels() -> None:
    """Compile (or load from numba's cache) every kernel here for the one signature the wrappers
    call them with (contiguous float32 arrays), so no request waits for a compiler."""
    if njit is None:
        return
    x = torch.ones(1, 1, 2, 2)  # [B, S, H, hd]
    rope_heads(x, torch.ones(1, 2), torch.ones(1, 2))
    rms_norm_rows(x[0, 0], torch.ones(2), 1e-5)
    silu_mul_rows(x[0, 0], x[0, 0])
    q = x.transpose(1, 2)  # [1, H, S, hd]
    for start in (0, CHUNK):  # one chunk, and the chunked kernel for long contexts
        cache = np.zeros((1, start + 1, 2), np.float32)  # [KV, capacity, hd]
        attend_cached(q, q[:, :1], q[:, :1], cache, cache.copy(), np.zeros(2, np.int64), start, None)


def kernel_applies(q: torch.Tensor, cache_dtype: torch.dtype) -> bool:
    """True when `attend_cached` serves this call: numba, one row, float32, a few positions."""
    return (njit is not None and q.shape[0] == 1 and q.shape[2] <= MAX_POSITIONS
            and q.dtype == cache_dtype == torch.float32)


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: np.ndarray,
                  values: np.ndarray, kv_map: np.ndarray, start: int, window: int | None) -> torch.Tensor:
    """q: [1, H, S, hd], k, v: [1, KV, S, hd] at positions start..start+S-1; keys, values: the cache
    buffers' numpy views [KV, capacity >= start + S, hd] (models.attention.KVCache.arrays) holding
    positions 0..start-1 -> [1, H, S, hd], with k and v written into the cache: causal (and
    sliding-window) attention, as models.attention.grouped_attention computes it."""
    arrays = [np.ascontiguousarray(t[0].numpy()) for t in (q, k, v)]  # copies only for S > 1
    out = attend_arrays(*arrays, keys, values, kv_map, start, window)
    return torch.from_numpy(out)[None]

