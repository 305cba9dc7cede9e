"""A decode step on arrays (models.decode_step) against decoder_layer, the torch path it replaces.

The torch path is the one checked against transformers on whole models and clusters
(tests/test_equivalence.py, tests/test_quant.py); the array path runs the same kernels on the same
arrays, so here it must give the same bits: hidden states, KV cache contents and logits equal, for
every model family (GQA, q/k/v biases, sliding windows), weight format (float32, int8, int4),
tensor-parallel slice and step size (a decode step, a verification of drafted tokens).
"""

from dataclasses import fields, replace

import numpy as np
import pytest
import torch

import models.llama as llama
from models.attention import BatchAttend, KVCache
from models.attention_kernels import CHUNK
from models.checkpoint import Checkpoint
from models.decode_kernels import MAX_POSITIONS
from models.decode_step import ROWS, decode_layers, serves
from models.fusion import fuse_layer
from models.llama import FUSED_FIELDS, LayerWeights, batch_attend, decoder_layer, load_layer
from models.model import LocalModel
from models.rope import RotaryTable, rope_tables
from models.sharding import local_dims
from tests.hf_reference import make_hf_checkpoint

PAST = 11  # positions in the cache before the step (more than the mistral window of 12 after it)
FORMATS = {"llama": ["none", "int8", "int4"], "qwen2": ["none", "int4"], "qwen3": ["none", "int8"], "mistral": ["none"]}
SIZES = {"llama": {"intermediate_size": 320}, "qwen2": {"intermediate_size": 192}, "qwen3": {}, "mistral": {}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode-step")
    return {kind: make_hf_checkpoint(root / kind, kind, seed=5, **SIZES[kind]) for kind in FORMATS}


def shard(folder, quant: str, world: int, rank: int):
    ckpt = Checkpoint(folder).with_quant(quant)
    dims = local_dims(ckpt.config, world, align=ckpt.plan_align())[rank]
    layers = [load_layer(ckpt, i, dims) for i in range(ckpt.config.num_layers)]
    return ckpt.config, dims, layers


def filled_cache(config, dims, past: int, seed: int) -> KVCache:
    """A cache holding `past` random positions (the same for both paths: each gets its own copy)."""
    g = torch.Generator().manual_seed(seed)
    kv = KVCache(config.num_layers, dims.n_local_kv_heads, config.head_dim, capacity=past + MAX_POSITIONS)
    for layer in range(config.num_layers):
        kv.append(layer, *[torch.randn(1, dims.n_local_kv_heads, past, config.head_dim, generator=g) for _ in range(2)])
    kv.advance(past)
    return kv


def counting_reduce(calls: list):
    """A stand-in for the all-reduce that changes the partial (so a missed or extra call shows)."""
    def reduce(partial: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(partial.shape))
        return partial * 0.75
    return reduce


def both_paths(config, dims, layers, seqlen: int, seed: int, batch: int = 1, array_layers=None, past: int = PAST):
    """The same step of `batch` rows (row b with past + 3b positions cached) through decoder_layer and
    decode_layers (on `array_layers` if given) -> (h, caches, reduce calls) per path."""
    h = torch.randn(batch, seqlen, config.hidden_size, generator=torch.Generator().manual_seed(seed))
    given = h.clone()
    rotary, pasts = RotaryTable(config), [past + 3 * b for b in range(batch)]
    tables = [rotary.cos_sin(torch.arange(p, p + seqlen)) for p in pasts]  # as forward_batch: per row
    cos_sin = rope_tables(*(torch.stack([t[i] for t in tables])[:, None] for i in range(2)), torch.float32)
    results = []
    for arrays in (False, True):
        kvs, calls = [filled_cache(config, dims, p, seed + b) for b, p in enumerate(pasts)], []
        attend = batch_attend([kv.attend_for(config, dims, seqlen) for kv in kvs])
        reduce = counting_reduce(calls)
        with torch.inference_mode():
            if arrays:
                assert serves(h, attend)
                out = decode_layers(h, (array_layers or layers).__getitem__, config, dims, attend, cos_sin, reduce)
            else:
                out = h
                for i, w in enumerate(layers):
                    out = decoder_layer(out, w, config, dims, attend, i, cos_sin, reduce)
        results.append((out, kvs, calls))
    assert torch.equal(h, given)  # the array step writes its own copy of the residual stream
    return results


def assert_same(results, config, seqlen: int, batch: int = 1):
    (ref, ref_kvs, ref_calls), (got, got_kvs, got_calls) = results
    assert torch.equal(got, ref)
    assert got_calls == ref_calls == [(batch, seqlen, config.hidden_size)] * (2 * config.num_layers)
    for got_kv, ref_kv in zip(got_kvs, ref_kvs, strict=True):
        end = got_kv.length + seqlen
        for layer in range(config.num_layers):
            for mine, theirs in zip(got_kv.reserve(layer, 0), ref_kv.reserve(layer, 0)):
                assert torch.equal(mine[:, :, :end], theirs[:, :, :end])


SLICES = [(1, 0), (2, 1), (3, 2)]  # qwen2's 4 heads in int4 groups of 2 heads leave no third rank a head
CASES = [(kind, quant, *s) for kind, quants in FORMATS.items() for quant in quants for s in SLICES
         if (kind, quant, s[0]) != ("qwen2", "int4", 3)]


@pytest.mark.parametrize("seqlen", [1, 3, MAX_POSITIONS])
@pytest.mark.parametrize("kind,quant,world,rank", CASES)
def test_the_array_step_is_the_torch_step_bit_for_bit(folders, kind, quant, world, rank, seqlen):
    config, dims, layers = shard(folders[kind], quant, world, rank)
    assert_same(both_paths(config, dims, layers, seqlen, seed=seqlen + rank), config, seqlen)


@pytest.mark.parametrize("seqlen", [1, 3])
@pytest.mark.parametrize("kind,quant,world,rank", CASES)
def test_the_array_step_on_fused_projections_is_the_torch_step_on_the_parts(folders, kind, quant, world, rank, seqlen):
    """One GEMV for q, k, v and one for gate, up (models.fusion) against decoder_layer's five."""
    config, dims, layers = shard(folders[kind], quant, world, rank)
    fused = [fuse_layer(w) for w in layers]
    assert all(w.wqkv is not None and w.w_gate_up is not None for w in fused)
    assert_same(both_paths(config, dims, layers, seqlen, seed=seqlen + rank, array_layers=fused), config, seqlen)


@pytest.mark.parametrize("batch,seqlen", [(2, 1), (2, 4)])
def test_a_batch_on_fused_projections_is_the_torch_batch(folders, batch, seqlen):
    config, dims, layers = shard(folders["qwen2"], "int4", 2, 1)
    fused = [fuse_layer(w) for w in layers]
    assert_same(both_paths(config, dims, layers, seqlen, seed=batch, batch=batch, array_layers=fused),
                config, seqlen, batch)


@pytest.mark.parametrize("batch,seqlen", [(2, 1), (ROWS, 1), (2, 4)])
@pytest.mark.parametrize("kind,quant", [("llama", "int4"), ("qwen2", "none"), ("qwen3", "int8"), ("mistral", "none")])
def test_a_batch_of_requests_each_at_its_own_position_is_the_torch_batch(folders, kind, quant, batch, seqlen):
    config, dims, layers = shard(folders[kind], quant, 2, 1)
    assert_same(both_paths(config, dims, layers, seqlen, seed=batch, batch=batch), config, seqlen, batch)


@pytest.mark.parametrize("batch,seqlen", [(1, 3), (2, 1)])
@pytest.mark.parametrize("kind,quant", [("llama", "int4"), ("mistral", "none")])
def test_past_one_chunk_of_context_the_step_is_still_the_torch_step(folders, kind, quant, batch, seqlen):
    """Past one chunk of context (models.attention_kernels.CHUNK) a row's attention takes the chunked
    kernel instead of the fused call (models.step_attention): three positions from the chunk's last on;
    in a batch of one position each, row 0 stays within the chunk and row 1 is past it."""
    config, dims, layers = shard(folders[kind], quant, 2, 1)
    fused = [fuse_layer(w) for w in layers]
    results = both_paths(config, dims, layers, seqlen, seed=batch, batch=batch, array_layers=fused, past=CHUNK - 1)
    assert_same(results, config, seqlen, batch)


def test_a_weight_no_kernel_serves_takes_the_torch_linear(folders):
    """A strided float32 weight (no kernel reads it) goes through models.quant_kernels.linear, as in
    decoder_layer: the step is still the same, bit for bit."""
    config, dims, layers = shard(folders["qwen2"], "none", 1, 0)
    layers = [llama.LayerWeights(**(vars(w) | {"wq": w.wq.t().contiguous().t()})) for w in layers]
    assert not layers[0].wq.is_contiguous()
    assert_same(both_paths(config, dims, layers, 1, seed=3), config, 1)


class ArrayReduce:
    """A reduce with an array form (as edge.rank_reduce.RankReduce): the step must use that form."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the tensor form was called")

    def arrays(self, partial: np.ndarray) -> np.ndarray:
        assert partial.dtype == np.float32
        self.calls.append(partial.shape)
        return partial * np.float32(0.75)


@pytest.mark.parametrize("batch,seqlen", [(1, 1), (2, 3)])
def test_a_reduce_with_an_array_form_gets_arrays_and_the_same_sums(folders, batch, seqlen):
    config, dims, layers = shard(folders["llama"], "int8", 2, 1)
    (ref, _, _), _ = both_paths(config, dims, layers, seqlen, seed=11, batch=batch)
    h = torch.randn(batch, seqlen, config.hidden_size, generator=torch.Generator().manual_seed(11))
    rotary, pasts = RotaryTable(config), [PAST + 3 * b for b in range(batch)]
    tables = [rotary.cos_sin(torch.arange(p, p + seqlen)) for p in pasts]
    cos_sin = rope_tables(*(torch.stack([t[i] for t in tables])[:, None] for i in range(2)), torch.float32)
    kvs = [filled_cache(config, dims, p, 11 + b) for b, p in enumerate(pasts)]
    attend, reduce = batch_attend([kv.attend_for(config, dims, seqlen) for kv in kvs]), ArrayReduce()
    with torch.inference_mode():
        out = decode_layers(h, layers.__getitem__, config, dims, attend, cos_sin, reduce)
    assert torch.equal(out, ref)
    assert reduce.calls == [(batch * seqlen, config.hidden_size)] * (2 * config.num_layers)


def test_serves_a_few_rows_over_local_caches_of_their_dtype(folders):
    config, dims, _ = shard(folders["llama"], "none", 1, 0)
    kvs = [KVCache(config.num_layers, dims.n_local_kv_heads, config.head_dim) for _ in range(ROWS + 1)]
    attend = kvs[0].attend_for(config, dims, 1)
    rows = batch_attend([kv.attend_for(config, dims, 1) for kv in kvs])
    d = config.hidden_size
    assert serves(torch.zeros(1, 1, d), attend)
    assert serves(torch.zeros(1, ROWS, d), attend)
    assert serves(torch.zeros(ROWS, 1, d), BatchAttend(rows.rows[:ROWS]))
    assert not serves(torch.zeros(1, ROWS + 1, d), attend)  # a prefill
    assert not serves(torch.zeros(ROWS + 1, 1, d), rows)  # a batch whose GEMMs are torch's
    assert not serves(torch.zeros(2, 1, d), attend)  # not one attend per row
    assert not serves(torch.zeros(1, 1, d, dtype=torch.bfloat16), attend)
    assert not serves(torch.zeros(1, 1, d), lambda layer, q, k, v: q)  # attention elsewhere (edge.offload)
    assert not serves(torch.zeros(2, 1, d), BatchAttend([attend, lambda layer, q, k, v: q]))
    for dtype in (torch.bfloat16, torch.float16):  # a 16-bit model's step: its cache in its dtype
        half = KVCache(config.num_layers, dims.n_local_kv_heads, config.head_dim, dtype=dtype)
        assert serves(torch.zeros(1, 1, d, dtype=dtype), half.attend_for(config, dims, 1))
        assert not serves(torch.zeros(1, 1, d), half.attend_for(config, dims, 1))
        assert not serves(torch.zeros(1, 1, d, dtype=torch.float16 if dtype == torch.bfloat16 else dtype), attend)


PROMPT = list(range(3, 20))


def both_model_paths(model: LocalModel, monkeypatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A prefill of PROMPT, then decode steps and a 3-token verification: their logits through the
    torch path alone, then through the model as it runs, where every call of decoder_layer must be
    the prefill's."""
    steps = [[7], [9], [11, 12, 13], [2]]

    def run() -> list[torch.Tensor]:
        kv = model.new_cache(64)
        out = [model.forward(PROMPT, kv)]
        return out + [model.forward(tokens, kv, all_logits=True) for tokens in steps]

    torch_path = llama.decoder_layer
    monkeypatch.setattr(llama, "serves", lambda h, attend: False)
    expected = run()
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(llama, "decoder_layer", lambda *a, **k: calls.append(a[0].shape[1]) or torch_path(*a, **k))
    got = run()
    assert set(calls) == {len(PROMPT)}  # the prefill's layers only
    assert all(np.isfinite(t.numpy()).all() for t in got)
    return got, expected


def test_a_models_decode_steps_take_the_array_path(folders, monkeypatch):
    """LocalModel's decode steps and verifications give the logits of the torch path exactly."""
    got, expected = both_model_paths(LocalModel(folders["mistral"]), monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_batched_decode_step_takes_the_array_path(folders, monkeypatch):
    """forward_batch (the step runner's batches) serves a decode batch on arrays, each request at its
    own position, with the torch path's result."""
    model = LocalModel(folders["qwen2"])
    kvs = [model.new_cache(32) for _ in range(3)]
    for i, kv in enumerate(kvs):
        model.forward(list(range(5, 9 + 2 * i)), kv)
    lengths = [kv.length for kv in kvs]
    h = llama.embed(torch.tensor([[7], [8], [9]]), model.head)  # [3, 1, D]

    def step() -> torch.Tensor:
        with torch.inference_mode():
            out = llama.forward_batch(h, model.layers.__getitem__, model.config, model.dims, kvs, model.rotary)
        for kv, length in zip(kvs, lengths):
            kv.rewind(length)
        return out

    monkeypatch.setattr(llama, "serves", lambda h, attend: False)
    expected = step()
    monkeypatch.undo()
    monkeypatch.setattr(llama, "decoder_layer", lambda *a, **k: pytest.fail("the torch path ran"))
    assert torch.equal(step(), expected)


def test_the_cached_kv_views_follow_the_cache_when_it_grows():
    """KVCache.arrays hands out numpy views made once per buffer: writes through them land in the
    cache, and a cache that grew hands out views of its new buffers, holding what was written."""
    kv = KVCache(num_layers=2, n_kv_heads=2, head_dim=4, capacity=2)
    keys, values = kv.arrays(1, 2)  # [KV, 2, hd]
    keys[:, :2], values[:, :2] = 1.5, -2.5
    kv.advance(2)
    assert torch.equal(kv.reserve(1, 0)[0][0, :, :2], torch.full((2, 2, 4), 1.5))
    grown_keys, grown_values = kv.arrays(1, 1)  # past the capacity: the buffers double
    assert grown_keys.shape == (2, 4, 4) and grown_keys is not keys
    assert (grown_keys[:, :2] == 1.5).all() and (grown_values[:, :2] == -2.5).all()
    grown_keys[:, 2] = 7.0
    assert torch.equal(kv.reserve(1, 1)[0][0, :, 2], torch.full((2, 4), 7.0))
    assert kv.arrays(0, 0)[0].shape == (2, 2, 4)  # the other layer's buffers did not grow


def test_a_layers_norm_views_are_not_counted_as_weights(folders):
    """LayerWeights.norm_arrays (cached on the layer) shares the norms' memory and leaves nbytes,
    the resident-bytes count of /metrics and the memory budget, as it was."""
    layer = shard(folders["llama"], "int4", 2, 1)[2][0]
    before = layer.nbytes()
    attn_norm, mlp_norm = layer.norm_arrays
    assert np.shares_memory(attn_norm, layer.attn_norm.numpy()) and np.shares_memory(mlp_norm, layer.mlp_norm.numpy())
    assert layer.norm_arrays[0] is attn_norm and layer.nbytes() == before


def widened(w: LayerWeights) -> LayerWeights:
    """A 16-bit layer's weights as float32 (exact): the same values, for the float32 step."""
    return replace(w, **{f.name: getattr(w, f.name).float() for f in fields(w)
                         if f.name not in FUSED_FIELDS and getattr(w, f.name) is not None})


def one_layer_step(config, dims, layers, h, cos_sin, past: torch.Tensor, dtype: torch.dtype):
    """decode_layers over one layer with `past` positions [1, KV, P, hd] cached in `dtype` -> (out, cache)."""
    kv = KVCache(1, dims.n_local_kv_heads, config.head_dim, capacity=past.shape[2] + MAX_POSITIONS, dtype=dtype)
    kv.append(0, past.to(dtype), past.to(dtype))
    kv.advance(past.shape[2])
    attend = kv.attend_for(config, dims, h.shape[1])
    assert serves(h, attend)
    with torch.inference_mode():
        return decode_layers(h, layers.__getitem__, config, dims, attend, cos_sin, counting_reduce([])), kv


@pytest.mark.parametrize("seqlen", [1, 3])
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])  # q/k/v biases; q and k norms
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_step_is_the_float32_step_on_its_values_with_what_it_keeps_rounded(folders, dtype, kind, seqlen):
    """A bf16 / fp16 model's decode step computes in float32: on the same values (its weights, cache,
    stream and RoPE tables widened), the keys and values it writes are the float32 step's rounded to
    the cache's dtype, bit for bit, and its output the float32 step's rounded to the dtype, but for
    what the new positions' own rounded keys and values change (about one rounding of the dtype)."""
    ckpt = Checkpoint(folders[kind]).with_dtype(dtype)
    config = replace(ckpt.config, num_layers=1)
    dims = local_dims(config, 2)[1]
    half = [fuse_layer(load_layer(ckpt, 0, dims))]
    g = torch.Generator().manual_seed(seqlen)
    h = torch.randn(1, seqlen, config.hidden_size, generator=g).to(dtype)
    past = torch.randn(1, dims.n_local_kv_heads, PAST, config.head_dim, generator=g).to(dtype)
    cos_sin = RotaryTable(config).tables(PAST, seqlen, dtype)
    got, got_kv = one_layer_step(config, dims, half, h, cos_sin, past, dtype)
    ref, ref_kv = one_layer_step(config, dims, [widened(half[0])], h.float(), tuple(t.float() for t in cos_sin),
                                 past, torch.float32)
    assert got.dtype == dtype
    for mine, theirs in zip(got_kv.reserve(0, 0), ref_kv.reserve(0, 0), strict=True):
        assert torch.equal(mine[:, :, :PAST + seqlen], theirs[:, :, :PAST + seqlen].to(dtype))
    eps = torch.finfo(dtype).eps  # one rounding of the stream's scale (its entries are about 1)
    assert (got.float() - ref.to(dtype).float()).abs().max() <= eps * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_models_decode_steps_take_the_array_path(folders, monkeypatch, dtype):
    """LocalModel in bf16 / fp16: decode steps and verifications take the array path too; their greedy
    tokens are the torch path's (a 16-bit step rounds once, not per op), the prefill untouched."""
    model = LocalModel(folders["llama"], dtype=str(dtype).removeprefix("torch."))
    got, expected = both_model_paths(model, monkeypatch)
    assert torch.equal(got[0], expected[0])
    assert all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(got, expected, strict=True))
