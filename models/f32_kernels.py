"""The float32 GEMV tile kernel: out[:, start:stop] = x @ w[start:stop]^T for 1..GEMV_ROWS rows of x,
called by models.quant_kernels (one block of output channels per task).

Why numba for plain float32 weights: torch's GEMM costs 2-2.6x a GEMV for 2-8 rows on these hosts
(it packs W first), this streams W once; four output channels per pass for several rows: four
independent sums keep the FMA units busy. One row (a decode step) streams W in one of two ways,
chosen by the host (models.numba_target.amd_cores; README, "Quantized weights"): one vectorized
dot per channel on AMD cores, where it was measured fastest (15-23% ahead of torch's MKL GEMV on the
EPYC host); elsewhere four channels a quarter of the block apart per pass, four memory streams: on
the Intel Xeon host one stream read 10.2-11.6 GB/s on one thread and four 13.4-14.2 (torch's MKL
GEMV 13.4-14.8). Either way each channel's sum is one sequence of operations, the same in every
call, on every rank of a cluster on one kind of host.
"""

from __future__ import annotations

import numpy as np

from models.numba_target import numba

if numba is not None:
    from numba import njit

    @njit(fastmath=True, cache=True, nogil=True, inline="always")
    def dot4(w0, w1, w2, w3, x):  # four rows [K] . x [K]: four independent sums over one pass of x
        a0, a1, a2, a3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        for k in range(x.shape[0]):
            xk = x[k]
            a0 += w0[k] * xk
            a1 += w1[k] * xk
            a2 += w2[k] * xk
            a3 += w3[k] * xk
        return a0, a1, a2, a3

    @njit(fastmath=True, cache=True, nogil=True)
    def f32_one_row(w, x0, out0, start, stop, spread):  # w [N, K], x0 [K] -> out0[start:stop]
        k_in, m = w.shape[1], start
        if spread:  # channels j, j + q, j + 2q, j + 3q of the block side by side
            q = (stop - start) // 4
            for j in range(start, start + q):
                sums = dot4(w[j], w[j + q], w[j + 2 * q], w[j + 3 * q], x0)
                out0[j], out0[j + q], out0[j + 2 * q], out0[j + 3 * q] = sums
            m = start + 4 * q
        for n in range(m, stop):  # one long vectorized dot per channel
            wn = w[n]
            acc = np.float32(0.0)
            for k in range(k_in):
                acc += wn[k] * x0[k]
            out0[n] = acc

    @njit(fastmath=True, cache=True, nogil=True)
    def f32_channels(w, x, out, start, stop, spread):  # w [N, K] f32, x [R, K] -> out[:, start:stop]
        if x.shape[0] == 1:
            f32_one_row(w, x[0], out[0], start, stop, spread)
            return
        k_in, n = w.shape[1], start
        while n + 4 <= stop:
            for t in range(x.shape[0]):
                sums = dot4(w[n], w[n + 1], w[n + 2], w[n + 3], x[t])
                out[t, n], out[t, n + 1], out[t, n + 2], out[t, n + 3] = sums
            n += 4
        for m in range(n, stop):
            for t in range(x.shape[0]):
                acc = np.float32(0.0)
                for k in range(k_in):
                    acc += w[m, k] * x[t, k]
                out[t, m] = acc
