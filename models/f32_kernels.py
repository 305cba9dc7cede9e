"""The float GEMV tile kernel: out[:, start:stop] = x @ w[start:stop]^T for 1..GEMV_ROWS rows of x,
called by models.quant_kernels (one block of output channels per task). W is float32, or bf16 /
fp16 held as its 16-bit patterns (uint16) and widened to float32 exactly as it is read: x and the
sums are float32 either way.

Why numba for plain float32 weights: torch's GEMM costs 2-2.6x a GEMV for 2-8 rows on these hosts
(it packs W first), this streams W once; four output channels per pass for several rows: four
independent sums keep the FMA units busy. One row (a decode step) streams W in one of two ways,
chosen by the host (models.numba_target.amd_cores; README, "Quantized weights"): one vectorized
dot per channel on AMD cores, where it was measured fastest (15-23% ahead of torch's MKL GEMV on the
EPYC host); elsewhere four channels a quarter of the block apart per pass, four memory streams: on
the Intel Xeon host one stream read 10.2-11.6 GB/s on one thread and four 13.4-14.2 (torch's MKL
GEMV 13.4-14.8). Either way each channel's sum is one sequence of operations, the same in every
call, on every rank of a cluster on one kind of host.

Why for 16-bit weights: torch 2.13's bf16 GEMV streamed 15-18 GB/s on one core of the Zen 5 host
where this loop streams the same bytes at 26-42 (and float32 weights at 35-38): a bf16 checkpoint
served as shipped decoded slower than the same model in float32 (bench/dtype.md). Widening is a
shift of the bits into a float32 (bf16), or the hardware's half-to-float conversion (fp16, LLVM's
fpext); the products and sums are those of torch's own bf16/fp16 GEMV (float32 accumulation, one
rounding of the result to the weight dtype by the caller), in another order.
"""

from __future__ import annotations

import numpy as np

from models.numba_target import numba


def widen(v, bf16):  # pragma: no cover - the compiled overload below is what kernels call
    """A weight element as float32: v itself, or a uint16 bf16 (bf16=True) / fp16 bit pattern."""
    raise NotImplementedError("widen is for compiled kernels")


def store(dst, i, v, bf16):  # pragma: no cover - the compiled overload below is what kernels call
    """dst[i] = the float32 v: as it is into a float array, or rounded to the nearest bf16
    (bf16=True) / fp16 (ties to even, as torch's .to() rounds) as its uint16 bits: `widen`'s inverse."""
    raise NotImplementedError("store is for compiled kernels")


if numba is not None:
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic, overload

    @intrinsic
    def bits_as_float32(typingctx, bits):  # pragma: no cover - compiled
        """An integer's low 32 bits -> the float32 with that bit pattern (a bitcast, no conversion)."""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
            return builder.bitcast(low, ir.FloatType())
        return types.float32(bits), codegen

    @intrinsic
    def half_bits_as_float32(typingctx, bits):  # pragma: no cover - compiled
        """An integer's low 16 bits as an IEEE half -> that value as float32, exactly (LLVM's fpext:
        one vcvtph2ps per vector on x86 with F16C)."""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            low = builder.trunc(args[0], ir.IntType(16)) if bits.bitwidth > 16 else args[0]
            return builder.fpext(builder.bitcast(low, ir.HalfType()), ir.FloatType())
        return types.float32(bits), codegen

    def _from_float32(result, emit):
        """An intrinsic of one float32 -> `result`, its IR from emit(builder, value)."""
        def typer(typingctx, value):  # pragma: no cover - compiled
            if not isinstance(value, types.Float) or value.bitwidth != 32:
                return None
            return result(value), lambda context, builder, signature, args: emit(builder, args[0])
        return intrinsic(typer)

    # a float32's bit pattern as uint32 (a bitcast, no conversion)
    float32_bits = _from_float32(types.uint32, lambda b, v: b.bitcast(v, ir.IntType(32)))
    # a float32 rounded to the nearest IEEE half (LLVM's fptrunc: ties to even) -> its 16 bits
    float32_as_half_bits = _from_float32(
        types.uint16, lambda b, v: b.bitcast(b.fptrunc(v, ir.HalfType()), ir.IntType(16)))

    @njit(cache=True, nogil=True)
    def float32_as_bf16_bits(v):  # pragma: no cover - compiled
        """c10::BFloat16's rounding: to nearest, ties to even; a NaN becomes the quiet 0x7FC0."""
        if np.isnan(v):
            return np.uint16(0x7FC0)
        bits = float32_bits(v)
        return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    @overload(store)
    def _store(dst, i, v, bf16):  # pragma: no cover - compiled
        if isinstance(dst.dtype, types.Float):
            def plain(dst, i, v, bf16):
                dst[i] = v
            return plain

        def to_bits(dst, i, v, bf16):
            if bf16:
                dst[i] = float32_as_bf16_bits(v)
            else:
                dst[i] = float32_as_half_bits(v)
        return to_bits

    @overload(widen, inline="always")
    def _widen(v, bf16):  # pragma: no cover - compiled
        if isinstance(v, types.Float):
            return lambda v, bf16: v

        def from_bits(v, bf16):
            if bf16:  # bf16 is the top half of a float32
                return bits_as_float32(np.uint32(v) << np.uint32(16))
            return half_bits_as_float32(v)
        return from_bits

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def dot4(w0, w1, w2, w3, x, bf16):  # four rows [K] . x [K]: four independent sums over one pass of x
        a0, a1, a2, a3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        for k in range(x.shape[0]):
            xk = x[k]
            a0 += widen(w0[k], bf16) * xk
            a1 += widen(w1[k], bf16) * xk
            a2 += widen(w2[k], bf16) * xk
            a3 += widen(w3[k], bf16) * xk
        return a0, a1, a2, a3

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def dot(wn, x, bf16):  # one row [K] . x [K]: one long vectorized sum
        acc = np.float32(0.0)
        for k in range(x.shape[0]):
            acc += widen(wn[k], bf16) * x[k]
        return acc

    @njit(fastmath=True, cache=True, nogil=True)
    def f32_one_row(w, x0, out0, start, stop, spread, bf16):  # w [N, K], x0 [K] -> out0[start:stop]
        m = start
        if spread:  # channels j, j + q, j + 2q, j + 3q of the block side by side
            q = (stop - start) // 4
            for j in range(start, start + q):
                sums = dot4(w[j], w[j + q], w[j + 2 * q], w[j + 3 * q], x0, bf16)
                out0[j], out0[j + q], out0[j + 2 * q], out0[j + 3 * q] = sums
            m = start + 4 * q
        for n in range(m, stop):
            out0[n] = dot(w[n], x0, bf16)

    @njit(fastmath=True, cache=True, nogil=True)
    def f32_channels(w, x, out, start, stop, spread, bf16=False):
        """w [N, K] float32 (or uint16 bits of bf16 / fp16), x [R, K] float32 -> out[:, start:stop]."""
        if x.shape[0] == 1:
            f32_one_row(w, x[0], out[0], start, stop, spread, bf16)
            return
        n = start
        while n + 4 <= stop:
            for t in range(x.shape[0]):
                sums = dot4(w[n], w[n + 1], w[n + 2], w[n + 3], x[t], bf16)
                out[t, n], out[t, n + 1], out[t, n + 2], out[t, n + 3] = sums
            n += 4
        for m in range(n, stop):
            for t in range(x.shape[0]):
                out[t, m] = dot(w[m], x[t], bf16)
