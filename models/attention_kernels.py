"""Attention of a decode step's few new positions over the KV cache, in float32, compiled. Past one
`CHUNK` of positions: the query heads of one KV head together (each key and value row read once
for all of them), the visible positions in chunks, the chunks of every KV head spread over the
process's kernel threads.

Why: at long contexts the step's attention, not its weights, is most of a token, and it ran on one
thread while the GEMVs beside it ran on all. SmolLM2-135M on one 2-thread device (scratch timing,
models.model.LocalModel, median of 20 tokens): 5.4 ms a token at 16 positions, 16.3 at 1000
(360 us a layer of attention) and 24.7 at 2000; with the chunks on both threads 11.2 and 15.4.
One thread runs the chunks one after another, as fast as before; a context of one chunk keeps the
single-pass kernel (`_whole`) and its bits, whatever the threads.

The math, for query head h (KV head kv_map[h]) and new position p, over the visible keys t (t <= p,
and t > p - window on a sliding layer), each chunk c of positions [c CHUNK, (c + 1) CHUNK):
scores q.k_t / sqrt(hd) summed in float32; the chunk's peak m_c, its sum l_c of exp(score - m_c)
and its sum a_c of exp(score - m_c) v_t; then with M the largest m_c, out = sum_c exp(m_c - M) a_c
/ sum_c exp(m_c - M) l_c, the chunks in order. Softmax then weighted sum, as
models.attention.grouped_attention computes it, to float32 rounding: its GEMMs sum in other
orders. The chunks are fixed by position, not by thread, so every thread count gives the same bits.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from models.f32_kernels import widen
from models.numba_target import compiled_for, numba
from models.threads import kernel_threads

CHUNK = 256  # positions per work item: a context up to this is one item per KV head

njit = numba.njit if numba is not None else None


if njit is not None:
    @njit(fastmath=True, cache=True, nogil=True)
    def _whole(q, keys, values, kv_map, start, window, out, bf16):  # pragma: no cover - compiled
        """A context of one chunk, in one pass per query head: q [H, S, hd] (RoPE applied) at
        positions start..start+S-1; keys/values [KV, cap, hd] holding 0..start+S-1 (the new
        positions' already written; float32, or bf16 / fp16 bits: `bf16`); kv_map [H] int64; window (0:
        none) -> out [H, S, hd]."""
        n_heads, seqlen, head_dim = q.shape
        scale = np.float32(1.0 / math.sqrt(head_dim))
        scores = np.empty(start + seqlen, np.float32)
        acc = np.empty(head_dim, np.float32)
        for h in range(n_heads):
            kh, vh = keys[kv_map[h]], values[kv_map[h]]
            for s in range(seqlen):
                pos = start + s
                first = max(0, pos - window + 1) if window > 0 else 0
                qs = q[h, s]
                best = np.float32(-np.inf)
                for t in range(first, pos + 1):
                    kt = kh[t]
                    dot = np.float32(0.0)
                    for d in range(head_dim):
                        dot += qs[d] * widen(kt[d], bf16)
                    dot *= scale
                    scores[t] = dot
                    best = max(best, dot)
                total = np.float32(0.0)
                for t in range(first, pos + 1):
                    e = np.float32(math.exp(scores[t] - best))
                    scores[t] = e
                    total += e
                acc[:] = 0.0
                for t in range(first, pos + 1):
                    p, vt = scores[t] / total, vh[t]
                    for d in range(head_dim):
                        acc[d] += p * widen(vt[d], bf16)
                out[h, s] = acc

    @njit(fastmath=True, cache=True, nogil=True)
    def _chunk(q, keys, values, heads, g, c, start, window, peak, total, acc, bf16):  # pragma: no cover
        """Chunk c of KV head g for its query heads `heads`: peak, total [H, S, C] and acc [H, S, C, hd]
        at [h, s, c] (peak -inf, total and acc 0 where the chunk holds no visible position)."""
        seqlen, head_dim, m = q.shape[1], q.shape[2], heads.shape[0]
        scale = np.float32(1.0 / math.sqrt(head_dim))
        kh, vh = keys[g], values[g]
        rows = np.empty((m, head_dim), np.float32)  # the group's queries at position s
        scores = np.empty((m, CHUNK), np.float32)
        sums = np.empty((m, head_dim), np.float32)
        for s in range(seqlen):
            pos = start + s
            lo = max(c * CHUNK, max(0, pos - window + 1) if window > 0 else 0)
            hi = min(pos + 1, (c + 1) * CHUNK)
            for j in range(m):
                rows[j] = q[heads[j], s]
            for t in range(lo, hi):  # each key row once for every query head of the group
                for j in range(m):
                    dot = np.float32(0.0)
                    for d in range(head_dim):
                        dot += rows[j, d] * widen(kh[t, d], bf16)
                    scores[j, t - lo] = dot * scale
            sums[:] = 0.0
            for j in range(m):
                best = np.float32(-np.inf)
                for i in range(hi - lo):
                    best = max(best, scores[j, i])
                mass = np.float32(0.0)
                for i in range(hi - lo):
                    e = np.float32(math.exp(scores[j, i] - best))
                    scores[j, i] = e
                    mass += e
                peak[heads[j], s, c], total[heads[j], s, c] = best, mass
            for t in range(lo, hi):  # each value row once for every query head of the group
                for j in range(m):
                    e = scores[j, t - lo]
                    for d in range(head_dim):
                        sums[j, d] += e * widen(vh[t, d], bf16)
            for j in range(m):
                acc[heads[j], s, c] = sums[j]

    @njit(fastmath=True, cache=True, nogil=True)
    def _combine(peak, total, acc, out):  # pragma: no cover - compiled
        """peak, total [H, S, C], acc [H, S, C, hd] -> out [H, S, hd], the chunks in order."""
        n_heads, seqlen, chunks = peak.shape
        for h in range(n_heads):
            for s in range(seqlen):
                top = np.float32(-np.inf)
                for c in range(chunks):
                    top = max(top, peak[h, s, c])
                mass = np.float32(0.0)
                out[h, s] = 0.0
                for c in range(chunks):
                    if total[h, s, c] != 0:  # a chunk with no visible position adds nothing
                        w = np.float32(math.exp(peak[h, s, c] - top))
                        mass += w * total[h, s, c]
                        out[h, s] += w * acc[h, s, c]
                out[h, s] /= mass

    def _compiled(parallel: bool):
        """The whole call over a cache that holds the new positions, its (KV head, chunk) items serial
        or with `prange` over them (the items are plain calls: numba vectorizes loops worse inside a
        parfor)."""
        rng = numba.prange if parallel else range

        @njit(parallel=parallel, cache=True, nogil=True)
        def attend(q, keys, values, groups, sizes, start, window, out, bf16):  # pragma: no cover - compiled
            n_heads, seqlen, head_dim = q.shape
            chunks = (start + seqlen + CHUNK - 1) // CHUNK
            peak = np.empty((n_heads, seqlen, chunks), np.float32)
            total = np.empty((n_heads, seqlen, chunks), np.float32)
            acc = np.empty((n_heads, seqlen, chunks, head_dim), np.float32)
            for item in rng(groups.shape[0] * chunks):
                g, c = item // chunks, item % chunks
                _chunk(q, keys, values, groups[g, :sizes[g]], g, c, start, window, peak, total, acc, bf16)
            _combine(peak, total, acc, out)

        return attend

    _COMPILED = {False: _compiled(False)}


@functools.cache
def _groups(kv_map: tuple[int, ...], n_kv: int) -> tuple[np.ndarray, np.ndarray]:
    groups = np.zeros((n_kv, len(kv_map)), np.int64)
    sizes = np.zeros(n_kv, np.int64)
    for h, g in enumerate(kv_map):
        groups[g, sizes[g]] = h
        sizes[g] += 1
    return groups, sizes


def groups_of(kv_map: np.ndarray, n_kv: int) -> tuple[np.ndarray, np.ndarray]:
    """kv_map [H] (the KV head of each query head) -> the query heads of each KV head, [KV, H] (row g's
    first sizes[g]), and sizes [KV]; made once per map and shared: not to be written."""
    return _groups(tuple(kv_map.tolist()), n_kv)


def attend_arrays(q: np.ndarray, k: np.ndarray, v: np.ndarray, keys: np.ndarray, values: np.ndarray,
                  kv_map: np.ndarray, start: int, window: int | None) -> np.ndarray:
    """q [H, S, hd], k, v [KV, S, hd] float32, C-contiguous (RoPE applied) at positions start..;
    keys, values [KV, capacity, hd] holding 0..start-1; kv_map [H] int64 -> [H, S, hd], with k
    and v written into the cache first."""
    keys[:, start:start + q.shape[1]] = k
    values[:, start:start + q.shape[1]] = v
    return attend_written(q, keys, values, kv_map, start, window, np.empty(q.shape, np.float32))


def attend_written(q: np.ndarray, keys: np.ndarray, values: np.ndarray, kv_map: np.ndarray, start: int,
                   window: int | None, out: np.ndarray, bf16: bool = False) -> np.ndarray:
    """`attend_arrays` with the new positions' keys and values already in the cache (models.step_attention
    writes them as it rotates them) -> out [H, S, hd], C-contiguous. keys and values float32, or a
    16-bit cache's uint16 bits (`bf16`: bf16, else fp16), each widened exactly as it is read. A context
    of one chunk in one pass (no partial sums to combine, nothing to spread), a longer one in chunks."""
    if start + q.shape[1] <= CHUNK:
        _whole(q, keys, values, kv_map, start, window or 0, out, bf16)
    else:
        _chunked()(q, keys, values, *groups_of(kv_map, keys.shape[0]), start, window or 0, out, bf16)
    return out


def _chunked():
    """The chunked call on the process's kernel threads (models.threads)."""
    return compiled_for(kernel_threads(), _COMPILED, _compiled)
