"""The decode path's compiled attention and its thread policy, against the torch path they replace.

The torch path (models.attention.grouped_attention with attention_mask) is the one checked against
transformers on whole models (tests/test_equivalence.py); here the kernel must agree with it for
every case a decode or verification step brings: grouped heads whole or gathered (kv_map), causal
rows within a step, sliding windows shorter and longer than the context, the first position.
"""

import itertools
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import attention, attention_kernels, decode_kernels, step_attention
from models.attention import KVCache, attention_mask, grouped_attention
from models.attention_kernels import CHUNK
from models.decode_kernels import (
    MAX_POSITIONS,
    attend_cached,
    kernel_applies,
    rms_norm_rows,
    rope_heads,
    silu_mul_rows,
    small_float32,
    warm_decode_kernels,
)
from models.rope import apply_rope_tables, rope_tables
from models.step_attention import warm_step_attention
from models.threads import kernel_threads, set_threads, step_threads

HEAD_DIM = 16


def random_step(n_heads: int, n_kv: int, start: int, seqlen: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n_heads, seqlen, HEAD_DIM, generator=g)
    past_k, past_v = (torch.randn(1, n_kv, start, HEAD_DIM, generator=g) for _ in range(2))
    k, v = (torch.randn(1, n_kv, seqlen, HEAD_DIM, generator=g) for _ in range(2))
    return q, past_k, past_v, k, v


STEPS = [(0, 1, None), (37, 1, None), (37, 1, 8), (5, 1, 8), (20, 4, None), (20, 4, 3),
         (0, MAX_POSITIONS, None),  # (positions before the step, new positions, sliding window)
         # longer than a chunk (models.attention_kernels): partial softmaxes combined, where a chunk
         # is the last position alone, where new positions straddle a chunk's end, where a window
         # crosses one, and where a window leaves whole chunks out
         (CHUNK, 1, None), (2 * CHUNK + 37, 1, None), (3 * CHUNK - 2, 4, None),
         (2 * CHUNK + 10, 1, 100), (CHUNK - 3, MAX_POSITIONS, CHUNK), (3 * CHUNK, 1, 8)]


@pytest.mark.parametrize("start,seqlen,window", STEPS)
@pytest.mark.parametrize("kv_map", [None, (0, 0, 1, 1, 1, 2)], ids=["whole-groups", "gathered"])
def test_kernel_attends_as_the_torch_path(start, seqlen, window, kv_map):
    n_heads, n_kv = 6, 3
    q, past_k, past_v, k, v = random_step(n_heads, n_kv, start, seqlen, seed=start + seqlen)
    cache = KVCache(1, n_kv, HEAD_DIM, capacity=start + seqlen)
    cache.append(0, past_k, past_v)
    cache.advance(start)
    keys, values = cache.reserve(0, seqlen)
    heads = np.array(kv_map or [h // 2 for h in range(n_heads)])
    assert kernel_applies(q, cache.dtype)
    got = attend_cached(q, k, v, *cache.arrays(0, seqlen), heads, start, window)

    all_k, all_v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    mask = attention_mask(torch.arange(start, start + seqlen), start + seqlen, window)
    want = grouped_attention(q, all_k, all_v, kv_map, mask)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # the new keys and values are in the cache, after the old ones
    end = start + seqlen
    assert torch.equal(keys[:, :, :end], all_k) and torch.equal(values[:, :, :end], all_v)


@pytest.mark.parametrize("gqa", [True, False], ids=["torch-gqa", "kv-copied"])
@pytest.mark.parametrize("kv_map", [None, (0, 0, 1, 1, 1, 2)], ids=["whole-groups", "gathered"])
def test_prefill_attention_is_softmax_of_scaled_scores_with_the_mask(monkeypatch, gqa, kv_map):
    """grouped_attention (torch's fused kernel) against the formula in float64; without torch's GQA
    (before 2.5) the KV heads are copied per query head and the result is the same."""
    monkeypatch.setattr(attention, "_SDPA_GQA", gqa)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 5, HEAD_DIM, generator=g)  # 5 queries at positions 4..8 over 9 keys, a window of 3
    k, v = (torch.randn(1, 3, 9, HEAD_DIM, generator=g) for _ in range(2))
    mask = attention_mask(torch.arange(4, 9), 9, 3)
    got = grouped_attention(q, k, v, kv_map, mask)
    index = torch.tensor(kv_map or [h // 2 for h in range(6)])
    kk, vv = k.double().index_select(1, index), v.double().index_select(1, index)
    scores = q.double() @ kk.transpose(2, 3) / HEAD_DIM**0.5 + mask.double()
    torch.testing.assert_close(got.double(), torch.softmax(scores, -1) @ vv, atol=1e-6, rtol=1e-5)


def test_the_kernel_serves_only_small_float32_rows():
    q = torch.zeros(1, 2, 1, HEAD_DIM)
    assert kernel_applies(q, torch.float32)
    assert not kernel_applies(q, torch.bfloat16)  # a bf16 cache: torch path
    assert not kernel_applies(q.bfloat16(), torch.bfloat16)
    prefill, two_rows = torch.zeros(1, 2, MAX_POSITIONS + 1, HEAD_DIM), torch.zeros(2, 2, 1, HEAD_DIM)
    assert not kernel_applies(prefill, torch.float32)
    assert not kernel_applies(two_rows, torch.float32)  # a batch attends row by row


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 2, 64), (1, MAX_POSITIONS, 40)])
def test_rms_norm_kernel_matches_the_transformers_formula(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x, weight = torch.randn(shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    # LlamaRMSNorm's formula in float32
    want = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert small_float32(x)
    torch.testing.assert_close(rms_norm_rows(x, weight, 1e-5), want, atol=1e-6, rtol=1e-5)


# SiLU(g) x u rounds five times: the C library's expf (under 1 ulp: 2^-23 relative), 1 + e, the
# division and the product (half an ulp, 2^-24, each); carried through 1 + e and the quotient the
# exp's error stays 2^-23 at most, so the result is within 2^-23 + 3 x 2^-24 = 2.5 x 2^-23 of the
# exact value for the float32 inputs (where exp(-g) does not overflow: g > -88).
SILU_BOUND = 2.5 * 2.0**-23


@pytest.mark.parametrize("shape", [(1, 1, 768), (2, 3, 2816), (1, MAX_POSITIONS, 64)])
def test_silu_mul_kernel_is_within_its_rounding_of_the_exact_value(shape):
    g = torch.Generator().manual_seed(sum(shape))
    gate = (torch.randn(shape, generator=g) * 20).clamp(-85, 85)
    up = torch.randn(shape, generator=g)
    gate[..., :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])  # signed zeros and tiny values
    g64, u64 = gate.double(), up.double()
    exact = g64 / (1 + torch.exp(-g64)) * u64
    assert small_float32(gate)
    before = gate.clone()
    got = silu_mul_rows(gate, up)
    assert got.dtype == torch.float32 and got.shape == shape
    assert ((got.double() - exact).abs() <= SILU_BOUND * exact.abs()).all()
    assert torch.equal(gate, before)  # a new tensor: the caller's gate is left as it was
    # and within that rounding of torch's own (its exp is vectorized, ours the C library's)
    torch.testing.assert_close(got, F.silu(gate) * up, atol=0, rtol=2 * SILU_BOUND)


def test_silu_mul_kernel_takes_torchs_values_at_the_edges():
    gate = torch.tensor([[0.0, -0.0, 89.0, -89.0, -100.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan")]])
    up = torch.full_like(gate, 3.0)
    torch.testing.assert_close(silu_mul_rows(gate, up), F.silu(gate) * up, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("rows,seqlen,per_row_tables", [(1, 1, False), (1, 4, False), (3, 2, True)])
def test_rope_kernel_matches_the_torch_rotation(rows, seqlen, per_row_tables):
    g = torch.Generator().manual_seed(rows * 10 + seqlen)
    x = torch.randn(rows, seqlen, 5, HEAD_DIM, generator=g)  # [B, S, H, hd]
    angles = torch.rand(rows if per_row_tables else 1, seqlen, HEAD_DIM // 2, generator=g) * 50
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = (emb.cos(), emb.sin()) if per_row_tables else (emb.cos()[0], emb.sin()[0])
    if per_row_tables:
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, hd], as forward_batch builds them
    tables = rope_tables(cos, sin, torch.float32)
    want = apply_rope_tables(x.transpose(1, 2), *tables)  # [B, H, S, hd]
    torch.testing.assert_close(rope_heads(x, *tables).transpose(1, 2), want, atol=1e-6, rtol=1e-5)


def test_one_compiled_signature_serves_every_step_shape():
    """The wrappers hand the kernels contiguous float32 arrays only, so the signature compiled at
    start-up (warm_decode_kernels) serves verification steps and batches too: no request waits
    for the compiler."""
    warm_decode_kernels()
    kernels = (attention_kernels._whole, attention_kernels._chunked(), decode_kernels._rope,
               decode_kernels._rms_norm, decode_kernels._silu_mul)
    compiled = {k: len(k.signatures) for k in kernels}
    x = torch.randn(2, 3, 6, HEAD_DIM)  # [B, S, H, hd]: two rows of a 3-position verification
    tables = rope_tables(torch.ones(2, 1, 3, HEAD_DIM), torch.zeros(2, 1, 3, HEAD_DIM), torch.float32)
    q = rope_heads(x, *tables).transpose(1, 2)  # [B, H, S, hd], not contiguous
    k = v = x[:, :, :3].transpose(1, 2)
    cache = KVCache(1, 3, HEAD_DIM, capacity=3)
    attend_cached(q[1:], k[1:], v[1:], *cache.arrays(0, 3), np.array([0, 0, 1, 1, 2, 2]), 0, None)
    long = KVCache(1, 3, HEAD_DIM, capacity=CHUNK + 3)
    long.advance(CHUNK)  # a context of more than one chunk
    attend_cached(q[1:], k[1:], v[1:], *long.arrays(0, 3), np.array([0, 0, 1, 1, 2, 2]), CHUNK, 4)
    rms_norm_rows(x[:, :, 0], torch.ones(HEAD_DIM), 1e-5)
    silu_mul_rows(x[:, :, 0], x[:, :, 1])  # strided views of one tensor
    assert {k: len(k.signatures) for k in compiled} == compiled


def test_the_step_attention_is_compiled_at_start_up_for_every_step_shape():
    """models.step_attention takes a request's rows of a batch's projections and its own tables: the
    signatures warmed at start-up serve a 3-position row of a batch, as the decode step calls it,
    over a float32 cache and a 16-bit one."""
    warm_decode_kernels()
    warm_step_attention()
    kernels = (step_attention._rope_rows, attention_kernels._whole, attention_kernels._chunked())
    compiled = {k: len(k.signatures) for k in kernels}
    y = torch.randn(6, 10 * HEAD_DIM).numpy()  # [B x S, (H + 2 KV) hd]: 2 rows of 3 positions, H 6, KV 2
    cos, sin = (torch.randn(2, 3, HEAD_DIM).numpy() for _ in range(2))  # [B, S, hd]
    out = np.empty((6, 6 * HEAD_DIM), np.float32)
    for past, dtype in itertools.product((0, CHUNK), (torch.float32, torch.bfloat16, torch.float16)):
        cache = KVCache(1, 2, HEAD_DIM, capacity=past + 8, dtype=dtype)  # one chunk of context, and more
        cache.advance(past)
        bf16 = dtype == torch.bfloat16
        step_attention.rope_attend_rows(y[3:], 2 * HEAD_DIM, cos[1], sin[1], *cache.arrays(0, 3),
                                        np.array([0, 0, 0, 1, 1, 1]), past, 2, out[3:], bf16)
        step_attention.rope_attend_rows(y[:1], 2 * HEAD_DIM, cos[0, :1], sin[0, :1], *cache.arrays(0, 1),
                                        np.array([0, 0, 0, 1, 1, 1]), past, None, out[:1], bf16)  # a step's row
    assert {k: len(k.signatures) for k in compiled} == compiled


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    set_threads(2)
    yield
    set_threads(before)


def observed_in_steps(tokens: int) -> tuple[int, int, int]:
    """torch's and the kernels' thread counts inside a step, and torch's after it."""
    with step_threads(tokens):
        inside = torch.get_num_threads(), kernel_threads()
    return *inside, torch.get_num_threads()


@pytest.mark.parametrize("where", ["main thread", "compute thread"])
def test_small_steps_run_torch_on_one_thread_and_the_kernels_on_all(two_threads, where):
    if where == "main thread":
        small, prefill = observed_in_steps(1), observed_in_steps(64)
    else:
        seen = {}
        worker = threading.Thread(
            target=lambda: seen.update(small=observed_in_steps(1), prefill=observed_in_steps(64)))
        worker.start()
        worker.join()
        small, prefill = seen["small"], seen["prefill"]
    assert small == (1, 2, 2)  # torch on one thread, the GEMV kernels on both, restored after
    assert prefill == (2, 2, 2)  # a prefill keeps torch's threads for its GEMMs


def test_long_context_attention_has_the_same_bits_on_any_thread_count(two_threads):
    """Its chunks, spread over the threads, are fixed by position: two threads sum as one does."""
    start, seqlen, n_heads, n_kv = 3 * CHUNK + 5, 2, 6, 3
    q, past_k, past_v, k, v = random_step(n_heads, n_kv, start, seqlen, seed=7)
    heads = np.array([h // 2 for h in range(n_heads)])
    outs = []
    for threads in (2, 1):
        set_threads(threads)
        cache = KVCache(1, n_kv, HEAD_DIM, capacity=start + seqlen)
        cache.append(0, past_k, past_v)
        cache.advance(start)
        outs.append(attend_cached(q, k, v, *cache.arrays(0, seqlen), heads, start, None))
    assert torch.equal(outs[0], outs[1])


def test_a_step_that_raises_still_restores_the_threads(two_threads):
    with pytest.raises(RuntimeError), step_threads(1):
        raise RuntimeError("a worker died mid-step")
    assert torch.get_num_threads() == 2
