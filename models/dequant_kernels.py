"""A prefill through quantized weights: W dequantized a block of output channels at a time into a
cache-sized float32 buffer, each block multiplied by torch's GEMM.

Why: a prefill (more rows than the GEMV kernels serve) needs W in float32 for the GEMM. Building all
of W with torch ops (QuantWeight.dequantize: untile, unpack, convert, scale, transpose: six passes
over a float32 copy of the matrix) made a 16-token prompt on SmolLM2-135M (int4) cost as much as
20 decode steps, and held a float32 copy of each matrix (113 MB for its LM head) while it ran.
Here one compiled pass writes each block's weights straight into the buffer, which the GEMM reads
while it is still in cache; the whole float32 matrix never exists.

A block is written transposed, [K, channels] (W^T's columns), so the loop over a tile's channels
is the innermost one: it reads each channel's codes as one 32-bit word (int4, int8g) or byte (int8)
and its scale side by side and writes one contiguous run, which the compiler vectorizes. Written
[channels, K] instead, each channel's few codes of a group were scattered words apart and the
element's place took an integer division: a block of SmolLM2-135M's q/k/v took 309 us against 34
(one thread, Intel Xeon host), and a 16-token prompt on SmolLM2 spent most of its time there.

The values are QuantWeight.dequantize's exactly (one float32 product, and for int4 a separate
sum with the min: no fused multiply-add, no fastmath), so a prefill computes with the same weights
as before and as the reference the tests build from `dequantize()`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.numba_target import numba
from models.quant import QuantWeight, words_readable

BLOCK_PARAMS = 1 << 18  # weights per block (1 MB of float32): at least one tile of output channels

njit = numba.njit if numba is not None else None


if njit is not None:
    @njit(cache=True, nogil=True)
    def _int8(q, scale, c0, c1, out):  # pragma: no cover - compiled
        """q [C, K, T] int8, scale [N] float32 -> out [K, (c1 - c0) x T]: W^T's columns of tiles c0..c1-1."""
        k_in, tw = q.shape[1], q.shape[2]
        for c in range(c0, c1):
            col, s = (c - c0) * tw, scale[c * tw:(c + 1) * tw]
            for k in range(k_in):
                codes, row = q[c, k], out[k, col:col + tw]
                for i in range(tw):
                    row[i] = np.float32(codes[i]) * s[i]

    @njit(cache=True, nogil=True)
    def _int8g(q, scale, c0, c1, out):  # pragma: no cover - compiled
        """q [C, G, 8, T] uint32 (the int8 codes [C, G, 8, T, 4] as words: byte b of word r is element
        4r + b, models.quant.interleaved), scale [C, G, T] float32 -> out [G x 32, (c1 - c0) x T]."""
        groups, words, tw = q.shape[1], q.shape[2], q.shape[3]
        for c in range(c0, c1):
            col = (c - c0) * tw
            for g in range(groups):
                s = scale[c, g]
                for r in range(words):
                    qw, k0 = q[c, g, r], g * words * 4 + r * 4
                    for b in range(4):
                        row = out[k0 + b, col:col + tw]
                        for i in range(tw):  # the byte, sign-extended: shifted to the top, then back
                            row[i] = np.float32(np.int32(qw[i] << np.uint32(24 - 8 * b)) >> 24) * s[i]

    @njit(cache=True, nogil=True)
    def _int4(q, scale, minimum, c0, c1, out):  # pragma: no cover - compiled
        """q [C, G, 4, T] uint32 (the bytes [C, G, 4, T, 4] as words: byte b of word r holds element
        4r + b in its low nibble, 4r + b + 16 in its high one; models.quant.interleaved), scale/min
        [C, G, T] float32 -> out [G x 32, (c1 - c0) x T]: code x scale, then + min (two roundings,
        as torch)."""
        groups, words, tw = q.shape[1], q.shape[2], q.shape[3]
        half = words * 4
        for c in range(c0, c1):
            col = (c - c0) * tw
            for g in range(groups):
                s, m = scale[c, g], minimum[c, g]
                for r in range(words):
                    qw, k0 = q[c, g, r], g * 2 * half + r * 4
                    for b in range(4):
                        low, high = out[k0 + b, col:col + tw], out[k0 + half + b, col:col + tw]
                        for i in range(tw):
                            v = qw[i] >> np.uint32(8 * b)
                            low[i] = np.float32(v & np.uint32(15)) * s[i] + m[i]
                            high[i] = np.float32((v >> np.uint32(4)) & np.uint32(15)) * s[i] + m[i]


def _kernel_args(w: QuantWeight) -> tuple:
    """The kernel and its array arguments before (c0, c1, out): the grouped formats' codes as 32-bit
    words, scales as float32 (exact)."""
    if w.kind == "int8":
        return _int8, (w.q.numpy(), w.scale.numpy())
    words = w.q.numpy().view(np.uint32).reshape(w.q.shape[:-1])  # [C, G, R, T, 4] bytes -> [C, G, R, T]
    scales = [t.float().numpy() for t in (w.scale, w.min) if t is not None]
    return (_int8g if w.kind == "int8g" else _int4), (words, *scales)


def prefill_linear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [R, K] float32 -> x @ W^T [R, N] float32, W dequantized block by block (without numba, or
    with the codes' words unreadable on a big-endian host: all of W by `dequantize`, always correct,
    slower)."""
    if njit is None or not words_readable(w):
        return F.linear(x, w.dequantize())
    n, k = w.shape
    tile = w.tile
    tiles = min(n // tile, max(1, BLOCK_PARAMS // (tile * k)))
    kernel, args = _kernel_args(w)
    buffer = torch.empty(k * tiles * tile)
    out = torch.empty(x.shape[0], n)
    for c0 in range(0, n // tile, tiles):
        c1 = min(n // tile, c0 + tiles)
        block = buffer[: k * (c1 - c0) * tile].view(k, (c1 - c0) * tile)  # W^T's columns c0 T..c1 T
        kernel(*args, c0, c1, block.numpy())
        out[:, c0 * tile:c1 * tile] = x @ block
    return out
