"""A decode step's attention straight from its fused q/k/v projection: RoPE of q and k, the cache
write and the head-major q in one compiled call per request, then the attention kernel.

Why: right after a GEMV has streamed a layer's weights through the caches, every call of the small
work after it starts cold (its code, numba's dispatch, numpy's allocator): a trivial kernel call
cost 25-33 us there against under 2 us warm, np.empty ~30 us (scratch timing, 2-core Xeon). Between
the q/k/v GEMV and the output projection the separate kernels made 9 calls and as many arrays: the
q/k/v column split, RoPE of q and of k, the heads moved before positions, attention with its cache
write, the output's reshape. Here they are 2 calls into buffers (models.decode_step keeps them).

The same bits as models.llama.decoder_layer's kernels, by construction, not by luck of the
compiler: RoPE is the one helper both paths compile in (decode_kernels.rope_head, elementwise and
without fast-math, so inlining cannot change a bit) and the attention is the very same compiled
function (attention_kernels.attend_written), whose fast-math sums would follow the compiler's
choices for a new caller. Past one chunk of context the same two calls serve, the second one the
chunked kernel: the separate kernels there cost SmolLM2-135M about 35 us a layer at 300 positions
(attention 72 -> 38 us warm, one thread).
"""

from __future__ import annotations

import numpy as np

from models.attention_kernels import CHUNK, attend_written
from models.decode_kernels import njit, rope_head
from models.f32_kernels import store

if njit is not None:
    @njit(cache=True, nogil=True)
    def _rope_rows(y, kv_width, cos, signed_sin, keys, values, start, q, bf16):  # pragma: no cover - compiled
        """y [S, (H + 2 KV) hd] (one request's q, k, v before RoPE); cos, signed_sin [S, hd] ->
        q [H, S, hd] rotated; k rotated and v into keys/values [KV, cap, hd] at start..start+S-1
        (float32, or bf16 / fp16 bits: rounded as they are written, models.f32_kernels.store)."""
        seqlen, head_dim = y.shape[0], cos.shape[1]
        q_width = y.shape[1] - 2 * kv_width
        rotated = np.empty(head_dim, np.float32)
        for s in range(seqlen):
            c, sn = cos[s], signed_sin[s]
            for h in range(q_width // head_dim):
                rope_head(y[s, h * head_dim:(h + 1) * head_dim], c, sn, q[h, s])
            for g in range(kv_width // head_dim):
                at = q_width + g * head_dim
                rope_head(y[s, at:at + head_dim], c, sn, rotated)
                key, value = keys[g, start + s], values[g, start + s]
                for d in range(head_dim):
                    store(key, d, rotated[d], bf16)
                    store(value, d, y[s, at + kv_width + d], bf16)


def rope_attend_rows(y: np.ndarray, kv_width: int, cos: np.ndarray, signed_sin: np.ndarray, keys: np.ndarray,
                     values: np.ndarray, kv_map: np.ndarray, start: int, window: int | None, out: np.ndarray,
                     bf16: bool = False) -> None:
    """One request's decode attention from its fused projections: y [S, (H + 2 KV) hd] float32,
    C-contiguous (q, k, v before RoPE) at positions start..start+S-1; cos, signed_sin [S, hd];
    keys/values [KV, capacity, hd] holding 0..start-1, float32 or a 16-bit cache's uint16 bits
    (`bf16`: bf16, else fp16); kv_map [H] int64 -> out [S, H x hd] (C-contiguous, float32), the
    rotated k and v written into the cache."""
    seqlen, head_dim = y.shape[0], cos.shape[1]
    n_heads = (y.shape[1] - 2 * kv_width) // head_dim
    q = np.empty((n_heads, seqlen, head_dim), np.float32)
    _rope_rows(y, kv_width, cos, signed_sin, keys, values, start, q, bf16)
    if seqlen == 1:  # out [1, H x hd] is [H, 1, hd] already
        attend_written(q, keys, values, kv_map, start, window, out.reshape(n_heads, 1, head_dim), bf16)
    else:
        heads = attend_written(q, keys, values, kv_map, start, window, np.empty_like(q), bf16)  # [H, S, hd]
        out[:] = heads.transpose(1, 0, 2).reshape(seqlen, -1)


def warm_step_attention() -> None:
    """Compile (or load from numba's cache) `_rope_rows` and the attention for the signatures a step
    calls them with (contiguous float32 arrays; a float32 cache and a 16-bit one's bits, one chunk of
    context and more), so no request waits for a compiler."""
    if njit is None:
        return
    y, tables = np.ones((1, 6), np.float32), np.ones((1, 2), np.float32)  # [S, (H + 2 KV) hd], hd = 2
    for dtype in (np.float32, np.uint16):
        for start in (0, CHUNK):
            cache = np.zeros((1, start + 1, 2), dtype)  # [KV, capacity, hd]
            rope_attend_rows(y, 2, tables, tables, cache, cache.copy(), np.zeros(1, np.int64), start, None,
                             np.empty((1, 2), np.float32), dtype == np.uint16)
