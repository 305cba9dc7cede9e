"""A software prefetch for the compiled GEMV kernels: `prefetch(block, offset)` asks the core to bring
the cache line holding element `offset` of an array into its caches now, without waiting for it
(LLVM's llvm.prefetch: a read, kept in every cache level; PREFETCHT0 on x86, PRFM on ARM). It
changes no value: what a kernel computes is the same with or without it.

Why: the per-channel int8 kernel (models.quant_kernels.int8_tiles) does three vector instructions
per 16 weights (a sign-extending load, a conversion, a multiply-add), too few loads in flight for
the hardware prefetchers to keep up with memory on the Intel Xeon host: it read 10-12 Gparam/s
from memory on one thread where a plain read streams 16-20 GB/s. Asking for the rows PREFETCH_ROWS
ahead, alternating in one process with the kernel without it (12 matrices of 5632 x 2048, scratch):
one process 12.4 -> 16.8 and 11.4 -> 15.4 Gparam/s, two processes at once 10.4-10.5 -> 12.4-12.7
each (distance 32) and 10.0-10.9 -> 13.2-13.5 (48). Distances side by side in one process (Gparam/s
at 4, 8, 12, 16, 24, 32 rows): 16.7, 17.1, 17.3, 16.9, 16.3, 16.2; two processes at once
14.4-15.3, 14.7-15.8, 14.5-15.9, 14.5-15.6, 13.9-14.7, 13.9-14.6: 16 it is
(4 KB ahead in a tile of 256 channels). The int4 kernel, bound by its arithmetic,
gained nothing (14.9 -> 15.6, 17.3 -> 17.3, 20.7 -> 19.7 at 1, 2 and 4 groups ahead), GGUF's Q8_0
lost 3-11% (a group or two ahead) and float32, whose long rows the hardware prefetcher follows,
lost 18-19% (a row ahead): not used there.
Not measured on AMD cores, whose int8 kernel already read at 27-29 GB/s against 37-38 for a plain
read: off there (PREFETCH_ROWS 0) until it is.
"""

from __future__ import annotations

from models.numba_target import amd_cores, numba

PREFETCH_ROWS = 0 if amd_cores() else 16  # input features ahead (rows of a [C, K, T] int8 tile)
CACHE_LINE = 64  # bytes

if numba is not None:
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    def emit_prefetch(builder, data, offset) -> None:
        """LLVM IR asking for the cache line of element `offset` (an i64 value) from pointer `data`
        on: a read, kept in every cache level. For kernels that write their own IR too
        (models.vnni_kernels)."""
        address = builder.bitcast(builder.gep(data, [offset]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=fnty)
        builder.call(fn, [address, i32(0), i32(3), i32(1)])  # read, keep in all levels, data

    @intrinsic
    def prefetch(typingctx, block, offset):  # pragma: no cover - compiled
        """Prefetch the cache line of element `offset` of a C-contiguous array (in C order)."""
        if not (isinstance(block, types.Array) and block.layout == "C" and isinstance(offset, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            array = context.make_array(signature.args[0])(context, builder, args[0])
            emit_prefetch(builder, array.data, args[1])
            return context.get_dummy_value()
        return types.void(block, offset), codegen

    @njit(cache=True, nogil=True, inline="always")
    def prefetch_ahead(q, c, k, count):  # pragma: no cover - compiled
        """Prefetch q[c, k] .. q[c, k + count - 1], those inside q (q C-contiguous: int8 tiles
        [C, K, T], their rows; grouped tiles [C, G, 8, T], their groups)."""
        for j in range(k, min(k + count, q.shape[1])):
            block = q[c, j]
            for offset in range(0, block.size, max(1, CACHE_LINE // block.itemsize)):
                prefetch(block, offset)
