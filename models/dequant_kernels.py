"""A prefill through quantized weights: W dequantized a block of output channels at a time into a
cache-sized float32 buffer, each block multiplied by torch's GEMM.

Why: a prefill (more rows than the GEMV kernels serve) needs W in float32 for the GEMM. Building all
of W with torch ops (QuantWeight.dequantize: untile, unpack, convert, scale, transpose: six passes
over a float32 copy of the matrix) made a 16-token prompt on SmolLM2-135M (int4) cost as much as
20 decode steps, and held a float32 copy of each matrix (113 MB for its LM head) while it ran.
Here one compiled pass writes each block's weights straight into the buffer, which the GEMM reads
while it is still in cache; the whole float32 matrix never exists.

The values are QuantWeight.dequantize's exactly (one float32 product, and for int4 a separate
sum with the min: no fused multiply-add, no fastmath), so a prefill computes with the same weights
as before and as the reference the tests build from `dequantize()`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.numba_target import numba
from models.quant import QuantWeight

BLOCK_PARAMS = 1 << 18  # weights per block (1 MB of float32): at least one tile of output channels

njit = numba.njit if numba is not None else None


if njit is not None:
    @njit(cache=True, nogil=True)
    def _int8(q, scale, c0, c1, out):  # pragma: no cover - compiled
        """q [C, K, T] int8, scale [N] float32 -> out [(c1 - c0) x T, K]: W's rows of tiles c0..c1-1."""
        k_in, tw = q.shape[1], q.shape[2]
        for c in range(c0, c1):
            for i in range(tw):
                row, s = out[(c - c0) * tw + i], scale[c * tw + i]
                for k in range(k_in):
                    row[k] = np.float32(q[c, k, i]) * s

    @njit(cache=True, nogil=True)
    def _int8g(q, scale, c0, c1, out):  # pragma: no cover - compiled
        """q [C, G, 8, T, 4] int8 (element j = [j // 4, channel, j % 4], models.quant.interleaved),
        scale [C, G, T] float32 -> out [(c1 - c0) x T, G x 32]."""
        groups, words, tw, word = q.shape[1], q.shape[2], q.shape[3], q.shape[4]
        width = words * word
        for c in range(c0, c1):
            for i in range(tw):
                row = out[(c - c0) * tw + i]
                for g in range(groups):
                    s = scale[c, g, i]
                    for j in range(width):
                        row[g * width + j] = np.float32(q[c, g, j // word, i, j % word]) * s

    @njit(cache=True, nogil=True)
    def _int4(q, scale, minimum, c0, c1, out):  # pragma: no cover - compiled
        """q [C, G, 4, T, 4] uint8 (byte j = [j // 4, channel, j % 4]: element j low nibble, j + 16
        high; models.quant.interleaved), scale/min [C, G, T] float32 -> out [(c1 - c0) x T, G x 32]:
        code x scale, then + min (two roundings, as torch)."""
        groups, words, tw, word = q.shape[1], q.shape[2], q.shape[3], q.shape[4]
        half = words * word
        for c in range(c0, c1):
            for i in range(tw):
                row = out[(c - c0) * tw + i]
                for g in range(groups):
                    s, m, base = scale[c, g, i], minimum[c, g, i], g * 2 * half
                    for j in range(half):
                        v = q[c, g, j // word, i, j % word]
                        low = np.float32(v & np.uint8(15)) * s
                        high = np.float32(v >> np.uint8(4)) * s
                        row[base + j] = low + m
                        row[base + half + j] = high + m


def _kernel_args(w: QuantWeight) -> tuple:
    """The kernel and its array arguments before (c0, c1, out): scales as float32 (exact)."""
    if w.kind == "int8":
        return _int8, (w.q.numpy(), w.scale.numpy())
    scales = [t.float().numpy() for t in (w.scale, w.min) if t is not None]
    return (_int8g if w.kind == "int8g" else _int4), (w.q.numpy(), *scales)


def prefill_linear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [R, K] float32 -> x @ W^T [R, N] float32, W dequantized block by block (without numba: all
    of W by `dequantize`, always correct, slower)."""
    if njit is None:
        return F.linear(x, w.dequantize())
    n, k = w.shape
    tile = w.tile
    tiles = min(n // tile, max(1, BLOCK_PARAMS // (tile * k)))
    kernel, args = _kernel_args(w)
    buffer = torch.empty(tiles * tile, k)
    out = torch.empty(x.shape[0], n)
    for c0 in range(0, n // tile, tiles):
        c1 = min(n // tile, c0 + tiles)
        block = buffer[: (c1 - c0) * tile]
        kernel(*args, c0, c1, block.numpy())
        out[:, c0 * tile:c1 * tile] = F.linear(x, block)
    return out
