"""y = x @ W^T: numba-compiled GEMV kernels for decode (quantized W, and float32 W up to 8 rows),
dequantize + GEMM (or torch's own GEMM) otherwise.

Why numba: decode streams every weight once per token, so the kernel must read the quantized bytes
at memory speed. torch 2.13's stock CPU kernels for int8/int4 weights run at 0.8-1.3 Gparam/s on
these hosts, slower than its own float32 GEMV (4.5); these loops run at 22-43 Gparam/s per thread
from memory on the Zen 5 host (README, "Quantized weights"). Each task is one tile of output
channels (models.quant), the channels the vectorized inner loop, x broadcast. They accumulate in
float32: for the grouped formats a partial sum per group of 32, then scale (int4: and a min term
times the group's sum of x) once per group; for per-channel int8 one sum over K, then the channel's
scale. With AVX-512 VNNI, int4 and int8g take models.vnni_kernels' integer kernels.

More rows of x (a prefill, a batch of decode steps; int4 and int8g: past CHUNKED_ROWS) dequantize W to
float32 a block at a time for torch's GEMM, whose speed the format does not limit (models.dequant_kernels).
Without numba (a platform with no wheel) every call takes torch's GEMM: always correct, only slower."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from models import vnni_kernels
from models.decode_kernels import warm_decode_kernels
from models.dequant_kernels import prefill_linear
from models.numba_target import amd_cores, compiled_for, numba
from models.quant import GROUP, QuantWeight, kernel_array, words_readable
from models.step_attention import warm_step_attention
from models.threads import in_passing_thread, kernel_threads

GEMV_ROWS = 8  # rows of x a GEMV kernel call takes
CHUNKED_ROWS = 16  # int4 / int8g: rows up to which GEMV passes beat dequantize + GEMM (README)

if numba is not None:
    from numba import njit, prange

    from models.f32_kernels import bits_as_float32, f32_channels, half_bits_as_float32
    from models.prefetch import PREFETCH_ROWS, prefetch_ahead

    tile_jit = njit(fastmath=True, cache=True, nogil=True)

    # Tiles c0..c1-1 of T output channels each: a tile's codes are one contiguous block, read front to
    # back, with x broadcast and the T channels as the vectorized inner loop; the tiles are read side
    # by side (one pass over K feeds all of them), as STREAMS concurrent memory streams: one stream
    # reads 6-7 GB/s on a core of an Intel Xeon host where four read 10-12 (README, "Quantized
    # weights"). Each channel's sum is the same sequence of operations as with one tile at a time.
    # Two input features per pass halve the loads and stores of the accumulators (10-20% faster).

    @tile_jit
    def int8_tiles(q, scale, x, out, c0, c1, ahead):  # q [C, K, T] int8, scale [N] f32, x [R, K] f32
        k_in, tw = q.shape[1], q.shape[2]
        acc = np.empty((c1 - c0, tw), np.float32)
        for t in range(x.shape[0]):
            acc[:] = 0.0
            for k in range(0, k_in - 1, 2):
                x0, x1 = x[t, k], x[t, k + 1]
                for s in range(c1 - c0):
                    if ahead:  # models.prefetch: the rows `ahead` input features on, asked for now
                        prefetch_ahead(q, c0 + s, k + ahead, 2)
                    q0, q1, a = q[c0 + s, k], q[c0 + s, k + 1], acc[s]
                    for i in range(tw):
                        a[i] += np.float32(q0[i]) * x0 + np.float32(q1[i]) * x1
            if k_in % 2:
                xk = x[t, k_in - 1]
                for s in range(c1 - c0):
                    qk, a = q[c0 + s, k_in - 1], acc[s]
                    for i in range(tw):
                        a[i] += np.float32(qk[i]) * xk
            for s in range(c1 - c0):
                n0 = (c0 + s) * tw
                for i in range(tw):
                    out[t, n0 + i] = acc[s, i] * scale[n0 + i]

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def signed_byte(word, b):
        """Byte b of a uint32 as a signed integer, in float32 (exact): shifted to the top, then back down
        with the sign (in-lane shifts where widening bytes to 32-bit lanes is a shuffle per vector)."""
        return np.float32(np.int32(word << np.uint32(24 - 8 * b)) >> np.int32(24))

    @tile_jit
    def int8g_tiles(q, scale, x, out, c0, c1):  # q [C, G, 8, T] uint32 (4 codes each), scale [C, G, T] f16 bits
        groups, words, tw = q.shape[1], q.shape[2], q.shape[3]
        sums, acc = np.empty((c1 - c0, tw), np.float32), np.empty((c1 - c0, tw), np.float32)
        for t in range(x.shape[0]):
            acc[:] = 0.0
            for g in range(groups):
                sums[:] = 0.0
                for r in range(words):  # word r: elements 4r .. 4r + 3 of the group
                    j = g * GROUP + 4 * r
                    a0, a1, a2, a3 = x[t, j], x[t, j + 1], x[t, j + 2], x[t, j + 3]
                    for s in range(c1 - c0):
                        row, sm = q[c0 + s, g, r], sums[s]
                        for i in range(tw):
                            v = row[i]
                            sm[i] += ((signed_byte(v, 0) * a0 + signed_byte(v, 1) * a1)
                                      + (signed_byte(v, 2) * a2 + signed_byte(v, 3) * a3))
                for s in range(c1 - c0):
                    sc, a, sm = scale[c0 + s, g], acc[s], sums[s]
                    for i in range(tw):
                        a[i] += half_bits_as_float32(sc[i]) * sm[i]
            for s in range(c1 - c0):
                out[t, (c0 + s) * tw:(c0 + s + 1) * tw] = acc[s]

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def sixteenths(word, shift):
        """1 + (the code at bits shift..shift+3 of a uint32) / 16, exactly: the code moved into the top
        of a float32's mantissa under the exponent of 1.0 (a shift and a mask-and-or per vector; no
        byte widening, no int-to-float conversion)."""
        if shift <= 19:
            bits = (word << np.uint32(19 - shift)) & np.uint32(0xF << 19)
        else:
            bits = (word >> np.uint32(shift - 19)) & np.uint32(0xF << 19)
        return bits_as_float32(bits | np.uint32(0x3F800000))

    # int4: f = 1 + q / 16 is exact, so q x = 16 f x - 16 x, and a group's sum is
    #   sum_j (scale q_j + min) x_j = 16 scale sum_j f_j x_j + (min - 16 scale) sum_j x_j.
    # A channel's four bytes of a group row block (8 codes) are one uint32 (models.quant.interleaved).
    # Rounding: the sums run over f x (|f| < 2) instead of q x, so the float32 error bound is taken over
    # 16 |scale| f + |min - 16 scale| per weight instead of |w| (tests/test_quant.py derives it).

    @tile_jit
    def int4_tiles(q, scale, minimum, x, out, c0, c1):  # q [C, G, 4, T] uint32, scale/min [C, G, T] f16 bits
        groups, words, tw = q.shape[1], q.shape[2], q.shape[3]
        sums, acc = np.empty((c1 - c0, tw), np.float32), np.empty((c1 - c0, tw), np.float32)
        sixteen = np.float32(16.0)
        for t in range(x.shape[0]):
            acc[:] = 0.0
            for g in range(groups):
                sums[:] = 0.0
                xsum = np.float32(0.0)  # the min term: (min - 16 scale) x the sum of the group's x
                for r in range(words):  # word r: elements 4r + b (low nibbles) and 4r + b + 16 (high)
                    j = g * GROUP + 4 * r
                    a0, a1, a2, a3 = x[t, j], x[t, j + 1], x[t, j + 2], x[t, j + 3]
                    b0, b1, b2, b3 = x[t, j + 16], x[t, j + 17], x[t, j + 18], x[t, j + 19]
                    xsum += ((a0 + b0) + (a1 + b1)) + ((a2 + b2) + (a3 + b3))
                    for s in range(c1 - c0):
                        row, sm = q[c0 + s, g, r], sums[s]
                        for i in range(tw):
                            v = row[i]
                            sm[i] += (((sixteenths(v, 0) * a0 + sixteenths(v, 4) * b0)
                                       + (sixteenths(v, 8) * a1 + sixteenths(v, 12) * b1))
                                      + ((sixteenths(v, 16) * a2 + sixteenths(v, 20) * b2)
                                         + (sixteenths(v, 24) * a3 + sixteenths(v, 28) * b3)))
                for s in range(c1 - c0):
                    sc, mn, a, sm = scale[c0 + s, g], minimum[c0 + s, g], acc[s], sums[s]
                    for i in range(tw):
                        s16 = half_bits_as_float32(sc[i]) * sixteen
                        a[i] += s16 * sm[i] + (half_bits_as_float32(mn[i]) - s16) * xsum
            for s in range(c1 - c0):
                out[t, (c0 + s) * tw:(c0 + s + 1) * tw] = acc[s]


F32_BLOCK = 64  # output channels per task of the float32 kernel
PARALLEL_MIN_PARAMS = 1 << 17  # smaller float32 matrices run on one thread (the pool's fork and join: 3-5 us)
SPREAD_ONE_ROW = not amd_cores()  # one row of float32: four channel streams per pass (models.f32_kernels)

STREAMS = 4  # tiles of a quantized weight read side by side (concurrent memory streams)
# Grouped formats (int4, int8g) read a tile's scales (and mins) as streams of their own beside its codes:
# on AMD Zen cores one tile at a time was the faster (Zen 5, one thread, int4 41-43 Gparam/s against 16
# with four), on the Intel Xeon host four (int4, two processes at once: 16-18 each against 13-15 with
# one); per-channel int8 reads four everywhere. A channel's sum is the same operations either way.
GROUPED_STREAMS = 1 if amd_cores() else STREAMS


def _kernels(parallel: bool) -> dict:
    """The GEMV kernels over all tiles, compiled (once, cached on disk) serial or with `prange` over
    `parts` (one contiguous run of tiles per thread, each read STREAMS or GROUPED_STREAMS tiles at a
    time). The tile loops are plain functions: numba vectorizes them worse inside a parfor."""
    jit = njit(parallel=parallel, cache=True, nogil=True)
    rng = prange if parallel else range

    @jit
    def int8(q, scale, x, out, parts, ahead):  # q [C, K, T] -> out [R, N]
        for p in rng(parts):
            lo, hi = p * q.shape[0] // parts, (p + 1) * q.shape[0] // parts
            for c in range(lo, hi, STREAMS):
                int8_tiles(q, scale, x, out, c, min(hi, c + STREAMS), ahead)

    @jit
    def int8g(q, scale, x, out, parts):  # q [C, G, 8, T] uint32, scale [C, G, T]
        for p in rng(parts):
            lo, hi = p * q.shape[0] // parts, (p + 1) * q.shape[0] // parts
            for c in range(lo, hi, GROUPED_STREAMS):
                int8g_tiles(q, scale, x, out, c, min(hi, c + GROUPED_STREAMS))

    @jit
    def int4(q, scale, minimum, x, out, parts):  # q [C, G, 4, T] uint32, scale/min [C, G, T]
        for p in rng(parts):
            lo, hi = p * q.shape[0] // parts, (p + 1) * q.shape[0] // parts
            for c in range(lo, hi, GROUPED_STREAMS):
                int4_tiles(q, scale, minimum, x, out, c, min(hi, c + GROUPED_STREAMS))

    @jit
    def f32(w, x, out, spread, bf16):  # w [N, K] float32 | uint16 (bf16 / fp16 bits) -> out [R, N]
        n = w.shape[0]
        for b in rng((n + F32_BLOCK - 1) // F32_BLOCK):
            f32_channels(w, x, out, b * F32_BLOCK, min(n, (b + 1) * F32_BLOCK), spread, bf16)

    return {"int8": int8, "int8g": int8g, "int4": int4, "f32": f32} | vnni_kernels.kernels(parallel)


_COMPILED: dict[bool, dict] = {}


def _kernel(kind: str, small: bool = False):
    """The kernel for `kind` at the process's thread count (models.threads; serial for one thread,
    or for a `small` matrix, whose microseconds of work waking the thread pool would double)."""
    return compiled_for(kernel_threads(), _COMPILED, _kernels, parallel=not small)[kind]


def warm_kernels() -> None:
    """Compile (or load from numba's cache) the float32 kernels for this thread count and a decode step's
    small-op kernels (models.decode_kernels) now: no request waits for the compiler, and their memory
    (LLVM, ~50 MB) counts in a device's fixed overhead. On a thread that ends with it (no OpenMP team)."""
    if numba is not None:
        in_passing_thread(_warm)


def _warm() -> None:
    x, out = np.ones((2, 1), np.float32), np.empty((2, 1), np.float32)
    for w in (np.ones((1, 1), np.float32), np.ones((1, 1), np.uint16)):  # float32; bf16 / fp16 bits
        for small in (True, False):
            _kernel("f32", small)(w, x, out, SPREAD_ONE_ROW, False)
    warm_decode_kernels()
    warm_step_attention()


FLOAT_WEIGHTS = (torch.float32, torch.bfloat16, torch.float16)


def kernel_serves(w: torch.Tensor | QuantWeight) -> bool:
    """True when `gemv_rows` applies w: numba present, and w quantized (int4 and int8g read a channel's four
    code bytes as one little-endian uint32: not on big-endian hosts) or a contiguous float32/bf16/fp16."""
    if numba is None:
        return False
    if isinstance(w, QuantWeight):
        return words_readable(w)
    return w.dtype in FLOAT_WEIGHTS and w.is_contiguous() and not w.requires_grad


def gemv_rows(x: np.ndarray, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """x [R, K] float32, C-contiguous, R >= 1; w with `kernel_serves(w)` -> [R, N] float32 (+ bias), W
    streamed once by its format's kernel per GEMV_ROWS rows (bf16 / fp16 widened exactly as it is read),
    into `out` ([R, N] float32, C-contiguous) when given. Arrays in, arrays out: a decode step's
    layer (models.decode_step) calls this without a torch op around it, into buffers it reuses."""
    if out is None:
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
    if x.shape[0] > GEMV_ROWS:  # up to CHUNKED_ROWS (`linear`): a pass of the kernel per GEMV_ROWS rows
        for r in range(0, x.shape[0], GEMV_ROWS):
            gemv_rows(x[r:r + GEMV_ROWS], w, bias, out[r:r + GEMV_ROWS])
        return out
    if isinstance(w, QuantWeight):
        kernel, tail = _bound(w.kind, w.tile, kernel_threads(), vnni_kernels.ENABLED)
        kernel(*w.arrays, x, out, *tail)
    else:
        small = w.shape[0] * w.shape[1] < PARALLEL_MIN_PARAMS
        _kernel("f32", small)(kernel_array(w), x, out, SPREAD_ONE_ROW, w.dtype == torch.bfloat16)
    if bias is not None:
        out += bias.float().numpy()
    return out


@functools.cache
def _bound(kind: str, tile: int, threads: int, vnni: bool) -> tuple[Callable, tuple]:
    """The GEMV for a `kind` weight in tiles of `tile` channels on `threads` (a run of tiles each) and its
    arguments after x and out, looked up once: in each GEMV it cost 1-2 us (SmolLM2 rank: 4.1 -> 3.8 ms)."""
    if kind == "int8":
        return _kernel(kind), (threads, PREFETCH_ROWS)  # rows ahead to prefetch (models.prefetch)
    if vnni and (integer := vnni_kernels.kernel_for(kind, tile)):
        return _kernel(integer), (threads, vnni_kernels.GROUPS_AHEAD)
    return _kernel(kind), (threads,)


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for plain or quantized weights: x [..., K] -> [..., N] in x's dtype.

    1..GEMV_ROWS rows (int4, int8g: CHUNKED_ROWS) go through `gemv_rows` (a strided x is copied, so one
    compiled signature serves every call); more rows, or a weight no kernel serves, through torch's
    GEMM (W dequantized first). x in bf16 / fp16 is widened exactly and the float32 result rounded
    once to x's dtype, as torch's own 16-bit GEMV does."""
    n, k = w.shape
    rows = x.numel() // k if k and x.shape[-1] == k else 0  # a mismatch goes to torch, which names it
    # x goes to the kernel with a quantized weight, or one of its own dtype (F.linear names mixed ones)
    limit = CHUNKED_ROWS if isinstance(w, QuantWeight) and w.kind != "int8" else GEMV_ROWS
    if 1 <= rows <= limit and kernel_serves(w) and (isinstance(w, QuantWeight) or x.dtype == w.dtype):
        flat = np.ascontiguousarray(x.detach().float().numpy().reshape(rows, k))
        y = torch.from_numpy(gemv_rows(flat, w, bias))
        return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*x.shape[:-1], n)
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = prefill_linear(x.reshape(-1, k).float(), w)
    if bias is not None:
        y += bias.float()
    return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*x.shape[:-1], n)
