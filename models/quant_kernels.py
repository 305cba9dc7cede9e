"""y = x @ W^T for quantized W: numba-compiled GEMV kernels for decode, dequantize + GEMM otherwise.

Why numba: decode streams every weight once per token, so the kernel must read the quantized bytes
at memory speed. torch 2.13's stock CPU kernels for int8/int4 weights run at 0.8-1.3 Gparam/s on
these hosts, slower than its own float32 GEMV; these loops run at 8-21 Gparam/s (README, "Quantized
weights"). They accumulate in float32: per group of 32 for the grouped formats (the partial sums of
one row's groups, then scale and min once per group), per row for per-channel int8.

Rows of x beyond `GEMV_ROWS` (a prefill) dequantize W to float32 and use torch's GEMM, whose speed
the weight format does not limit. Without numba (a platform with no wheel) every call takes that
path: always correct, only slower.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from models.quant import QuantWeight

log = logging.getLogger("edge_llm.quant")
GEMV_ROWS = 8  # rows of x up to which the GEMV kernel beats dequantize + GEMM

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba ships wheels for every platform we target
    numba = None


def _kernels(parallel: bool) -> dict:
    """The three GEMV kernels, compiled (once, cached on disk) serial or with `prange` over rows."""
    jit = njit(parallel=parallel, fastmath=True, cache=True, nogil=True)
    rng = prange if parallel else range

    @jit
    def int8(q, scale, x, out):  # q [N, K] int8, scale [N] f32, x [T, K] f32 -> out [T, N]
        n_rows, k_in = q.shape
        for r in rng(n_rows):
            row = q[r]
            for t in range(x.shape[0]):
                xt = x[t]
                acc = np.float32(0.0)
                for k in range(k_in):
                    acc += np.float32(row[k]) * xt[k]
                out[t, r] = acc * scale[r]

    @jit
    def int8g(q, scale, x, half, out):  # q [N, 32, G] int8, scale [N, G] f16 bits, x [T, K] f32 -> [T, N]
        n_rows, width, groups = q.shape
        rows = x.shape[0]
        xg = np.empty((rows, width, groups), np.float32)  # x in q's j-major order
        for t in range(rows):
            for g in range(groups):
                for j in range(width):
                    xg[t, j, g] = x[t, g * width + j]
        for r in rng(n_rows):
            sums = np.empty(groups, np.float32)
            for t in range(rows):
                sums[:] = 0.0
                for j in range(width):
                    qj, xj = q[r, j], xg[t, j]
                    for g in range(groups):
                        sums[g] += np.float32(qj[g]) * xj[g]
                acc = np.float32(0.0)
                for g in range(groups):
                    acc += half[scale[r, g]] * sums[g]
                out[t, r] = acc

    @jit
    def int4(q, scale, minimum, x, half, out):  # q [N, 16, G] uint8, scale/min [N, G] f16 bits, x [T, K]
        n_rows, width, groups = q.shape
        rows = x.shape[0]
        lo = np.empty((rows, width, groups), np.float32)  # x[t, 32g + j], j-major like q's low nibbles
        hi = np.empty((rows, width, groups), np.float32)  # x[t, 32g + 16 + j]: the high nibbles
        xsum = np.zeros((rows, groups), np.float32)  # the min term: min * sum of the group's x
        for t in range(rows):
            for g in range(groups):
                for j in range(width):
                    a, b = x[t, g * 2 * width + j], x[t, g * 2 * width + width + j]
                    lo[t, j, g], hi[t, j, g] = a, b
                    xsum[t, g] += a + b
        for r in rng(n_rows):
            sums = np.empty(groups, np.float32)
            for t in range(rows):
                sums[:] = 0.0
                for j in range(width):
                    qj, xl, xh = q[r, j], lo[t, j], hi[t, j]
                    for g in range(groups):
                        v = np.int32(qj[g])
                        sums[g] += np.float32(v & 15) * xl[g] + np.float32(v >> 4) * xh[g]
                acc = np.float32(0.0)
                for g in range(groups):
                    acc += half[scale[r, g]] * sums[g] + half[minimum[r, g]] * xsum[t, g]
                out[t, r] = acc

    return {"int8": int8, "int8g": int8g, "int4": int4}


_COMPILED: dict[bool, dict] = {}


def _kernel(kind: str):
    """The kernel for `kind` at torch's thread count (serial for one thread: no pool to wake)."""
    threads = torch.get_num_threads()
    parallel = threads > 1
    if parallel not in _COMPILED:
        _COMPILED[parallel] = _kernels(parallel)
    if parallel and numba.get_num_threads() != min(threads, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return _COMPILED[parallel][kind]


# float16 bits -> float32 (numba has no float16): 256 KB, stays in L2; read once per group of 32.
_HALF = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _bits(t: torch.Tensor) -> np.ndarray:
    """A float16 tensor's bits as uint16 (no copy)."""
    return t.view(torch.int16).numpy().view(np.uint16)


def gemv(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [T, K] float32 contiguous -> [T, N] float32 through the numba kernel for w's format."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    if w.kind == "int8":
        _kernel("int8")(w.q.numpy(), w.scale.numpy(), x.numpy(), out)
    elif w.kind == "int8g":
        _kernel("int8g")(w.q.numpy(), _bits(w.scale), x.numpy(), _HALF, out)
    else:
        _kernel("int4")(w.q.numpy(), _bits(w.scale), _bits(w.min), x.numpy(), _HALF, out)
    return torch.from_numpy(out)


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for plain or quantized weights: x [..., K] -> [..., N] in x's dtype."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    n, k = w.shape
    flat = x.reshape(-1, k)
    if numba is not None and flat.shape[0] <= GEMV_ROWS:
        y = gemv(flat.float().contiguous(), w)
    else:
        y = F.linear(flat.float(), w.dequantize())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], n)
