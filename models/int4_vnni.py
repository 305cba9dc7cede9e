"""The int4 GEMV on integer dot products (AVX-512 VNNI's vpdpbusd), for hosts that have them.

y[n] = sum_g scale[g, n] sum_j q[g, j, n] x[32g + j] + min[g, n] sum_j x[32g + j], q in 0..15.

The float kernel (models.quant_kernels.int4_tiles) turns every nibble into a float32 before its
multiply-add: three vector instructions per 16 weights, and it is bound by them (the Intel Xeon
host: 27 Gparam/s from cache, 13-15 from memory on one thread, where a plain read streams 19-22
GB/s of codes). Here the codes stay integers: one vpdpbusd multiplies 64 codes (unsigned bytes) by
64 bytes of x and adds them four by four into 16 int32 lanes, the output channels. A 32-bit word
of codes holds a channel's 4 bytes of a group row (models.quant.interleaved): its low nibbles meet
x[4r .. 4r+3], its high nibbles x[4r+16 .. 4r+19], each a mask (and a shift) away.

x in integers: each group of 32 of a row of x is held as X_j = round(x_j 2^S) with S = 20 - e,
where the group's largest |x_j| is below 2^e: |X_j| <= 2^20, split into three signed 7-bit digits
X = 2^14 P0 + 2^7 P1 + P2 (P1, P2 in -64..63, |P0| <= 65), one vpdpbusd per digit. The integer sums
are exact; (2^14 A0 + 2^7 A1 + A2) 2^-S is then sum_j q_j X_j 2^-S, rounded once to float32, times
the scale, plus min x (the group's float32 sum of x, added as a tree). So the one difference from
summing q x in float32 is the representation of x: |x_j - X_j 2^-S| <= 2^-(S+1) <= 2^-20 of the
group's largest |x| (2^-121 absolute at least: S is capped at 120 so 2^-S stays a float32). That
is of the order of float32's own rounding of the largest element (2^-24 of it), and tests derive
the kernel's bound from it (tests/test_quant.py). The result does not depend on the order of the
integer additions: the same bits on one thread or several.

Why not the alternatives (README, "Quantized weights"): bf16 dot products (vdpbf16ps, x split into
three bf16 parts to stay exact) ran at a third of the rate of vpdpbusd on the Xeon host; AMX tiles
need OS permission and tile configuration for a matrix-times-vector. Without AVX-512 VNNI (AVX2
hosts, ARM boards, older Xeons) the float kernel serves, and it stays the one tested everywhere.
"""

from __future__ import annotations

import math

import numpy as np

from models.numba_target import host_has, numba

LANES = 16  # int32 lanes of a 512-bit vector: output channels per vpdpbusd
DIGITS = 3  # signed 7-bit digits of x's 21-bit integers
FRACTION_BITS = 20  # |X| <= 2^20: the group's largest |x| below 2^e is held as X 2^-(20 - e)
MAX_SHIFT = 120  # S <= 120: 2^-S stays a normal float32 (groups of x below 2^-100 lose digits)
GROUPS_AHEAD = 1  # a tile's codes are asked for (llvm.prefetch) one group before they are read
HOST_HAS_VNNI = numba is not None and host_has("avx512f", "avx512bw", "avx512vnni")
ENABLED = HOST_HAS_VNNI  # tests switch it off to run the float kernel on a VNNI host too


def serves(kind: str, tile: int) -> bool:
    """True when this kernel takes an int4 weight held in tiles of `tile` output channels."""
    return ENABLED and kind == "int4" and tile % LANES == 0


def kernels(parallel: bool) -> dict:
    """{"int4v": the compiled GEMV} on a VNNI host (models.quant_kernels adds it to its own), else {}."""
    return _compile(parallel) if HOST_HAS_VNNI else {}


if numba is not None:
    from numba import njit

    from models.f32_kernels import bits_as_float32

    @njit(cache=True, nogil=True, inline="always")
    def fold(half, largest):
        """half[0] after adding (largest=False: float32 sums) or taking the larger (True) of half[j] and
        half[j + w] for w = 8, 4, 2, 1: a tree whose levels vectorize, the same order every call."""
        width = 8
        while width:
            for j in range(width):
                half[j] = max(half[j], half[j + width]) if largest else half[j] + half[j + width]
            width //= 2
        return half[0]

    @njit(cache=True, nogil=True, inline="always")
    def power_of_two(e):
        """2^e as float32 for -126 < e < 128 (its bits built directly)."""
        return bits_as_float32(np.uint32((127 + e) << 23))

    @njit(cache=True, nogil=True)
    def activation_digits(x):  # x [R, K] float32, K a multiple of 32
        """x as the kernel takes it: xw [R, G, DIGITS, 8] uint32 (int8 digits, element j of a group at
        byte j of a digit's 32) and xf [R, G, 2] float32: 2^-S and the group's float32 sum (`fold`:
        element j + 16 added to j, then 8, 4, 2 and 1 apart)."""
        rows, groups = x.shape[0], x.shape[1] // 32
        digits = np.empty((rows, groups, DIGITS, 32), np.int8)
        xf, half = np.empty((rows, groups, 2), np.float32), np.empty(16, np.float32)
        for t in range(rows):
            for g in range(groups):
                j0 = 32 * g
                for j in range(16):
                    half[j] = max(abs(x[t, j0 + j]), abs(x[t, j0 + j + 16]))
                shift = min(MAX_SHIFT, FRACTION_BITS - math.frexp(fold(half, True))[1])
                for j in range(16):
                    half[j] = x[t, j0 + j] + x[t, j0 + j + 16]
                xf[t, g, 0], xf[t, g, 1] = power_of_two(-shift), fold(half, False)
                if not math.isfinite(xf[t, g, 1]):  # inf / nan in x (or a sum past float32): the row's output is nan
                    xf[t, g, 0] = np.float32(np.nan)
                    digits[t, g] = 0
                    continue
                scale = power_of_two(shift)
                for j in range(32):  # x 2^S is exact in float32 (a power of two; |.| <= 2^20), then
                    whole = np.int32(np.rint(x[t, j0 + j] * scale))  # rounded to nearest, ties to even
                    low = ((whole + 64) & 127) - 64
                    whole = (whole - low) >> 7
                    middle = ((whole + 64) & 127) - 64
                    digits[t, g, 0, j], digits[t, g, 1, j], digits[t, g, 2, j] = (whole - middle) >> 7, middle, low
        return digits.view(np.uint32), xf


if HOST_HAS_VNNI:
    from llvmlite import ir
    from numba import prange, types
    from numba.extending import intrinsic

    I32, I64 = ir.IntType(32), ir.IntType(64)
    V16I, V16F = ir.VectorType(I32, LANES), ir.VectorType(ir.FloatType(), LANES)
    V16H, V16S = ir.VectorType(ir.HalfType(), LANES), ir.VectorType(ir.IntType(16), LANES)

    def _splat(builder, value, vtype):
        undef = ir.Constant(vtype, ir.Undefined)
        one = builder.insert_element(undef, value, I32(0))
        return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(I32, LANES), [0] * LANES))

    def _vector(builder, array, index, vtype):
        """Pointer to LANES elements of a C-contiguous array from flat element `index` on."""
        return builder.bitcast(builder.gep(array.data, [index]), vtype.as_pointer())

    def _prefetch(builder, array, index):
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), I32, I32, I32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=fnty)
        address = builder.bitcast(builder.gep(array.data, [index]), ir.IntType(8).as_pointer())
        builder.call(fn, [address, I32(0), I32(3), I32(1)])  # read, keep in all levels, data

    def _digit_sums(builder, q, xw, base, width, xbase, ahead):
        """[DIGITS] int32 vectors: sum_j q_j P_j over the group's 32 codes of 16 channels per digit."""
        fnty = ir.FunctionType(V16I, [V16I, V16I, V16I])
        dot = builder.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512", fnty=fnty)
        low = ir.Constant(V16I, [0x0F0F0F0F] * LANES)
        sums = [[ir.Constant(V16I, [0] * LANES)] * DIGITS for _ in range(2)]  # low, high: 2x the chains
        for r in range(4):  # word r: bytes 4r..4r+3 of the group (elements 4r + b and 4r + b + 16)
            row = builder.add(base, builder.mul(I64(r), width))
            with builder.if_then(builder.icmp_signed(">", ahead, I64(0))):
                _prefetch(builder, q, builder.add(row, ahead))
            word = builder.load(_vector(builder, q, row, V16I), align=4)
            halves = (builder.and_(word, low), builder.and_(builder.lshr(word, ir.Constant(V16I, [4] * LANES)), low))
            for h, codes in enumerate(halves):
                for d in range(DIGITS):
                    x4 = builder.load(builder.gep(xw.data, [builder.add(xbase, I64(8 * d + 4 * h + r))]))
                    sums[h][d] = builder.call(dot, [sums[h][d], codes, _splat(builder, x4, V16I)])
        return [builder.add(lo, hi) for lo, hi in zip(*sums, strict=True)]

    def _group_codegen(context, builder, signature, args):
        q, scale, minimum, xw, xf, acc = (context.make_array(signature.args[k])(context, builder, args[k])
                                          for k in range(6))
        t, c, g, i, ahead = (builder.sext(a, I64) if a.type.width < 64 else a for a in args[6:])
        groups, width = builder.extract_value(q.shape, 1), builder.extract_value(q.shape, 3)
        cg = builder.add(builder.mul(c, groups), g)  # tile c's group g
        column = builder.mul(i, I64(LANES))
        base = builder.add(builder.mul(builder.mul(cg, I64(4)), width), column)  # q [C, G, 4, T]
        row_group = builder.add(builder.mul(t, groups), g)  # row t of x, group g
        sums = _digit_sums(builder, q, xw, base, width, builder.mul(row_group, I64(8 * DIGITS)),
                           builder.mul(ahead, builder.mul(I64(4), width)))
        total = sums[DIGITS - 1]
        for d in range(DIGITS - 1):  # |2^14 A0| <= 2^14 * 65 * 15 * 32 < 2^31: no overflow
            total = builder.add(total, builder.shl(sums[d], ir.Constant(V16I, [7 * (DIGITS - 1 - d)] * LANES)))
        xs, xsum = (builder.load(builder.gep(xf.data, [builder.add(builder.mul(row_group, I64(2)), I64(k))]))
                    for k in (0, 1))
        at = builder.add(builder.mul(cg, width), column)  # scale / min [C, G, T]
        scales, mins = (builder.fpext(builder.bitcast(builder.load(_vector(builder, a, at, V16S), align=2), V16H), V16F)
                        for a in (scale, minimum))
        out = _vector(builder, acc, column, V16F)
        exact = builder.fmul(builder.sitofp(total, V16F), _splat(builder, xs, V16F))  # times 2^-S: exact
        value = builder.fadd(builder.load(out, align=4), builder.fmul(scales, exact))
        builder.store(builder.fadd(value, builder.fmul(mins, _splat(builder, xsum, V16F))), out, align=4)
        return context.get_dummy_value()

    @intrinsic
    def add_group(typingctx, q, scale, minimum, xw, xf, acc, t, c, g, i, ahead):  # pragma: no cover - compiled
        """acc[16i .. 16i + 15] += channel block i of tile c's group g applied to row t of x: q [C, G, 4, T]
        uint32, scale / min [C, G, T] float16 bits, xw [R, G, DIGITS, 8] uint32 and xf [R, G, 2] from
        `activation_digits`, acc [T] float32; all C-contiguous. Prefetches `ahead` groups further."""
        arrays = (q, scale, minimum, xw, xf, acc)
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays):
            return None
        return types.void(q, scale, minimum, xw, xf, acc, t, c, g, i, ahead), _group_codegen

    @njit(cache=True, nogil=True)
    def vnni_tiles(q, scale, minimum, xw, xf, out, c0, c1, ahead):
        """out[t, tiles c0..c1-1] for every row t; a tile at a time, its groups in order."""
        groups, width = q.shape[1], q.shape[3]
        acc = np.empty(width, np.float32)
        for c in range(c0, c1):
            for t in range(xw.shape[0]):
                acc[:] = 0.0
                for g in range(groups):
                    for i in range(width // LANES):
                        add_group(q, scale, minimum, xw, xf, acc, t, c, g, i, ahead)
                out[t, c * width:(c + 1) * width] = acc


def _compile(parallel: bool) -> dict:
    rng = prange if parallel else range

    @njit(parallel=parallel, cache=True, nogil=True)
    def int4v(q, scale, minimum, x, out, parts, ahead):  # q [C, G, 4, T] uint32 -> out [R, N]
        xw, xf = activation_digits(x)
        for p in rng(parts):
            vnni_tiles(q, scale, minimum, xw, xf, out, p * q.shape[0] // parts, (p + 1) * q.shape[0] // parts, ahead)

    return {"int4v": int4v}
