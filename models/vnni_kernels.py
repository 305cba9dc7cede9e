"""The int4 and int8g (GGUF Q8_0) GEMVs on integer dot products (AVX-512 VNNI's vpdpbusd), for
hosts that have them.

int4:  y[n] = sum_g scale[g, n] sum_j q[g, j, n] x[32g + j] + min[g, n] sum_j x[32g + j], q in 0..15
int8g: y[n] = sum_g scale[g, n] sum_j c[g, j, n] x[32g + j], c in -127..127

The float kernels (models.quant_kernels.int4_tiles, int8g_tiles) turn every code into a float32
before its multiply-add, and are bound by those instructions (int4 on the Intel Xeon host: 27
Gparam/s from cache, 13-15 from memory on one thread, where a plain read streams 19-22 GB/s of
codes). Here the codes stay integers: one vpdpbusd multiplies 64 unsigned bytes of codes by 64
signed bytes of x and adds them four by four into 16 int32 lanes, the output channels. A 32-bit
word of codes holds a channel's 4 bytes of a group row (models.quant.interleaved): int4's low
nibbles meet x[4r .. 4r+3], its high nibbles x[4r+16 .. 4r+19], each a mask (and a shift) away;
int8g's signed codes become unsigned by flipping their sign bits (c + 128), and 128 times the
sum of x's digits (exact) is taken away again.

x in integers: each group of 32 of a row of x is held as X_j = round(x_j 2^S) with S = 20 - e,
where the group's largest |x_j| is below 2^e: |X_j| <= 2^20, split into three signed 7-bit digits
X = 2^14 P0 + 2^7 P1 + P2 (P1, P2 in -64..63, |P0| <= 65), one vpdpbusd per digit. The integer sums
are exact; (2^14 A0 + 2^7 A1 + A2) 2^-S is then sum_j q_j X_j 2^-S, rounded once to float32 (int8g:
2^7 A1 + A2 rounded once, 2^14 A0 exact, their sum rounded once), times the scale, plus (int4)
min x the group's float32 sum of x, added as a tree. So the one difference from summing q x in
float32 is the representation of x: |x_j - X_j 2^-S| <= 2^-(S+1) <= 2^-20 of the group's largest
|x| (2^-121 absolute at least: S is capped at 120 so 2^-S stays a float32). That is of the order
of float32's own rounding of the largest element (2^-24 of it), and tests derive the kernels'
bound from it (tests/test_quant.py). The result does not depend on the order of the integer
additions: the same bits on one thread or several.

Why not the alternatives (README, "Quantized weights"): bf16 dot products (vdpbf16ps, x split into
three bf16 parts to stay exact) ran at a quarter of the rate of vpdpbusd on the Xeon host; AMX
tiles need OS permission and tile configuration for a matrix-times-vector. Without AVX-512 VNNI
(AVX2 hosts, ARM boards, older Xeons) the float kernels serve, and they stay tested everywhere.
"""
from __future__ import annotations

import functools
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


def kernel_for(kind: str, tile: int) -> str | None:
    """The kernel here ("int4v" | "int8gv") that takes a `kind` weight held in tiles of `tile` output
    channels, or None (another kind, tiles that are not whole vectors, no VNNI, or switched off)."""
    if ENABLED and kind in ("int4", "int8g") and tile % LANES == 0:
        return kind + "v"
    return None


def kernels(parallel: bool) -> dict:
    """{"int4v", "int8gv": the compiled GEMVs} on a VNNI host (models.quant_kernels adds them to its
    own), else {}."""
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
        """x as the kernels take it: xw [R, G, DIGITS, 8] uint32 (int8 digits, element j of a group at
        byte j of a digit's 32) and xf [R, G, 2 + DIGITS] float32: 2^-S, the group's float32 sum
        (`fold`: element j + 16 added to j, then 8, 4, 2 and 1 apart) and each digit's sum (exact)."""
        rows, groups = x.shape[0], x.shape[1] // 32
        digits = np.empty((rows, groups, DIGITS, 32), np.int8)
        xf, half = np.empty((rows, groups, 2 + DIGITS), np.float32), np.empty(16, np.float32)
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
                    xf[t, g, 0], xf[t, g, 2:] = np.float32(np.nan), 0.0
                    digits[t, g] = 0
                    continue
                scale, tops, middles, lows = power_of_two(shift), 0, 0, 0
                for j in range(32):  # x 2^S is exact in float32 (a power of two; |.| <= 2^20), then
                    whole = np.int32(np.rint(x[t, j0 + j] * scale))  # rounded to nearest, ties to even
                    low = ((whole + 64) & 127) - 64
                    whole = (whole - low) >> 7
                    middle = ((whole + 64) & 127) - 64
                    top = (whole - middle) >> 7
                    digits[t, g, 0, j], digits[t, g, 1, j], digits[t, g, 2, j] = top, middle, low
                    tops, middles, lows = tops + top, middles + middle, lows + low
                xf[t, g, 2], xf[t, g, 3], xf[t, g, 4] = tops, middles, lows
        return digits.view(np.uint32), xf


if HOST_HAS_VNNI:
    from llvmlite import ir
    from numba import prange, types
    from numba.extending import intrinsic

    from models.prefetch import emit_prefetch

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

    def _digit_sums(builder, q, xw, base, width, xbase, ahead, kind):
        """[DIGITS] int32 vectors over a group of 16 channels: sum_j u_j P_j per digit, u the codes
        as unsigned bytes (int4: 0..15; int8g: code + 128, the sign bit flipped)."""
        fnty = ir.FunctionType(V16I, [V16I, V16I, V16I])
        dot = builder.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512", fnty=fnty)
        low = ir.Constant(V16I, [0x0F0F0F0F] * LANES)
        flip = ir.Constant(V16I, [0x80808080 - (1 << 32)] * LANES)  # each byte's sign bit (as an int32)
        words, parts = (4, 2) if kind == "int4" else (8, 1)
        sums = [[ir.Constant(V16I, [0] * LANES)] * DIGITS for _ in range(parts)]  # int4: low, high nibbles
        for r in range(words):  # word r: bytes 4r..4r+3 of the group (int4: elements 4r + b and 4r + b + 16)
            row = builder.add(base, builder.mul(I64(r), width))
            with builder.if_then(builder.icmp_signed(">", ahead, I64(0))):
                emit_prefetch(builder, q.data, builder.add(row, ahead))
            word = builder.load(_vector(builder, q, row, V16I), align=4)
            if kind == "int4":
                codes = (builder.and_(word, low), builder.and_(builder.lshr(word, ir.Constant(V16I, [4] * LANES)), low))
            else:
                codes = (builder.xor(word, flip),)
            for h, unsigned in enumerate(codes):
                for d in range(DIGITS):
                    x4 = builder.load(builder.gep(xw.data, [builder.add(xbase, I64(8 * d + 4 * h + r))]))
                    sums[h][d] = builder.call(dot, [sums[h][d], unsigned, _splat(builder, x4, V16I)])
        return [functools.reduce(builder.add, column) for column in zip(*sums, strict=True)]

    def _shifted(builder, v, bits):
        return builder.shl(v, ir.Constant(V16I, [bits] * LANES))

    def _int4_total(builder, sums, xf_at):
        """sum_j q_j X_j as float32 (one rounding): |2^14 A0| <= 2^14 * 65 * 15 * 32 < 2^31, no overflow."""
        return builder.sitofp(builder.add(builder.add(_shifted(builder, sums[0], 14), _shifted(builder, sums[1], 7)),
                                          sums[2]), V16F)

    def _int8g_total(builder, sums, xf_at):
        """sum_j c_j X_j as float32 for signed codes c: each digit's sum less 128 x its digit sum
        (exact), then 2^14 A0 (exact in float32: |A0| < 2^18) plus 2^7 A1 + A2 (< 2^26, rounded once)."""
        signed = []
        for d in range(DIGITS):
            offset = builder.fptosi(builder.fmul(builder.load(xf_at(2 + d)), ir.Constant(ir.FloatType(), 128.0)), I32)
            signed.append(builder.sub(sums[d], _splat(builder, offset, V16I)))
        top = builder.fmul(builder.sitofp(signed[0], V16F), ir.Constant(V16F, [2.0**14] * LANES))
        return builder.fadd(top, builder.sitofp(builder.add(_shifted(builder, signed[1], 7), signed[2]), V16F))

    def _group_codegen(kind):
        def codegen(context, builder, signature, args):
            arrays = 6 if kind == "int4" else 5  # q, scale, (min,) xw, xf, acc
            q, *scales, xw, xf, acc = (context.make_array(signature.args[k])(context, builder, args[k])
                                       for k in range(arrays))
            t, c, g, i, ahead = (builder.sext(a, I64) if a.type.width < 64 else a for a in args[arrays:])
            groups, words, width = (builder.extract_value(q.shape, k) for k in (1, 2, 3))
            cg = builder.add(builder.mul(c, groups), g)  # tile c's group g
            column = builder.mul(i, I64(LANES))
            base = builder.add(builder.mul(builder.mul(cg, words), width), column)  # q [C, G, 4 | 8, T]
            row_group = builder.add(builder.mul(t, groups), g)  # row t of x, group g
            sums = _digit_sums(builder, q, xw, base, width, builder.mul(row_group, I64(8 * DIGITS)),
                               builder.mul(ahead, builder.mul(words, width)), kind)

            def xf_at(k):
                return builder.gep(xf.data, [builder.add(builder.mul(row_group, I64(2 + DIGITS)), I64(k))])

            total = (_int4_total if kind == "int4" else _int8g_total)(builder, sums, xf_at)
            at = builder.add(builder.mul(cg, width), column)  # scale / min [C, G, T]
            scales = [builder.fpext(builder.bitcast(builder.load(_vector(builder, a, at, V16S), align=2), V16H), V16F)
                      for a in scales]
            out = _vector(builder, acc, column, V16F)
            exact = builder.fmul(total, _splat(builder, builder.load(xf_at(0)), V16F))  # times 2^-S: exact
            value = builder.fadd(builder.load(out, align=4), builder.fmul(scales[0], exact))
            if kind == "int4":  # plus min x the group's sum of x
                value = builder.fadd(value, builder.fmul(scales[1], _splat(builder, builder.load(xf_at(1)), V16F)))
            builder.store(value, out, align=4)
            return context.get_dummy_value()
        return codegen

    def _contiguous(*arrays):
        return all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)

    @intrinsic
    def add_group(typingctx, q, scale, minimum, xw, xf, acc, t, c, g, i, ahead):  # pragma: no cover - compiled
        """acc[16i .. 16i + 15] += channel block i of int4 tile c's group g applied to row t of x: q
        [C, G, 4, T] uint32, scale / min [C, G, T] float16 bits, xw and xf from `activation_digits`,
        acc [T] float32; all C-contiguous. Prefetches the codes `ahead` groups further."""
        if not _contiguous(q, scale, minimum, xw, xf, acc):
            return None
        return types.void(q, scale, minimum, xw, xf, acc, t, c, g, i, ahead), _group_codegen("int4")

    @intrinsic
    def add_group8(typingctx, q, scale, xw, xf, acc, t, c, g, i, ahead):  # pragma: no cover - compiled
        """`add_group` for int8g (GGUF's Q8_0): q [C, G, 8, T] uint32 (four signed codes a word), no min."""
        if not _contiguous(q, scale, xw, xf, acc):
            return None
        return types.void(q, scale, xw, xf, acc, t, c, g, i, ahead), _group_codegen("int8g")

    @njit(cache=True, nogil=True)
    def vnni_tiles(q, scale, minimum, xw, xf, out, c0, c1, ahead):
        """out[t, tiles c0..c1-1] for every row t; a tile at a time, its groups in order (int8g:
        `minimum` is None)."""
        groups, width = q.shape[1], q.shape[3]
        acc = np.empty(width, np.float32)
        for c in range(c0, c1):
            for t in range(xw.shape[0]):
                acc[:] = 0.0
                for g in range(groups):
                    for i in range(width // LANES):
                        if minimum is None:
                            add_group8(q, scale, xw, xf, acc, t, c, g, i, ahead)
                        else:
                            add_group(q, scale, minimum, xw, xf, acc, t, c, g, i, ahead)
                out[t, c * width:(c + 1) * width] = acc


def _compile(parallel: bool) -> dict:
    rng = prange if parallel else range

    @njit(parallel=parallel, cache=True, nogil=True)
    def int4v(q, scale, minimum, x, out, parts, ahead):  # q [C, G, 4, T] uint32 -> out [R, N]
        xw, xf = activation_digits(x)
        for p in rng(parts):
            vnni_tiles(q, scale, minimum, xw, xf, out, p * q.shape[0] // parts, (p + 1) * q.shape[0] // parts, ahead)

    @njit(parallel=parallel, cache=True, nogil=True)
    def int8gv(q, scale, x, out, parts, ahead):  # q [C, G, 8, T] uint32 -> out [R, N]
        xw, xf = activation_digits(x)
        for p in rng(parts):
            vnni_tiles(q, scale, None, xw, xf, out, p * q.shape[0] // parts, (p + 1) * q.shape[0] // parts, ahead)

    return {"int4v": int4v, "int8gv": int8gv}
