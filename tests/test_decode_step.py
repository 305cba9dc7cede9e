"""A decode step on arrays (models.decode_step) against decoder_layer, the torch path it replaces.

The torch path is the one checked against transformers on whole models and clusters
(tests/test_equivalence.py, tests/test_quant.py); the array path runs the same kernels on the same
arrays, so here it must give the same bits: hidden states, KV cache contents and logits equal, for
every model family (GQA, q/k/v biases, sliding windows), weight format (float32, int8, int4),
tensor-parallel slice and step size (a decode step, a verification of drafted tokens).
"""

import numpy as np
import pytest
import torch

import models.llama as llama
from models.attention import KVCache
from models.checkpoint import Checkpoint
from models.decode_kernels import MAX_POSITIONS
from models.decode_step import decode_layers, serves
from models.llama import decoder_layer, load_layer
from models.model import LocalModel
from models.rope import RotaryTable, rope_tables
from models.sharding import local_dims
from tests.hf_reference import make_hf_checkpoint

PAST = 11  # positions in the cache before the step (more than the mistral window of 12 after it)
FORMATS = {"llama": ["none", "int8", "int4"], "qwen2": ["none", "int4"], "mistral": ["none"]}
SIZES = {"llama": {"intermediate_size": 320}, "qwen2": {"intermediate_size": 192}, "mistral": {}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode-step")
    return {kind: make_hf_checkpoint(root / kind, kind, seed=5, **SIZES[kind]) for kind in FORMATS}


def shard(folder, quant: str, world: int, rank: int):
    ckpt = Checkpoint(folder).with_quant(quant)
    dims = local_dims(ckpt.config, world, align=ckpt.plan_align())[rank]
    layers = [load_layer(ckpt, i, dims) for i in range(ckpt.config.num_layers)]
    return ckpt.config, dims, layers


def filled_cache(config, dims, seed: int) -> KVCache:
    """A cache holding PAST random positions (the same for both paths: each gets its own copy)."""
    g = torch.Generator().manual_seed(seed)
    kv = KVCache(config.num_layers, dims.n_local_kv_heads, config.head_dim, capacity=PAST + MAX_POSITIONS)
    for layer in range(config.num_layers):
        past = [torch.randn(1, dims.n_local_kv_heads, PAST, config.head_dim, generator=g) for _ in range(2)]
        kv.append(layer, *past)
    kv.advance(PAST)
    return kv


def counting_reduce(calls: list):
    """A stand-in for the all-reduce that changes the partial (so a missed or extra call shows)."""
    def reduce(partial: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(partial.shape))
        return partial * 0.75
    return reduce


def both_paths(config, dims, layers, seqlen: int, seed: int):
    """The same step through decoder_layer and decode_layers -> (h, cache, reduce calls) per path."""
    h = torch.randn(1, seqlen, config.hidden_size, generator=torch.Generator().manual_seed(seed))
    rotary = RotaryTable(config)
    cos_sin = rope_tables(*rotary.cos_sin(torch.arange(PAST, PAST + seqlen)), torch.float32)
    results = []
    for arrays in (False, True):
        kv, calls = filled_cache(config, dims, seed), []
        attend = kv.attend_for(config, dims, seqlen)
        reduce = counting_reduce(calls)
        with torch.inference_mode():
            if arrays:
                assert serves(h, attend)
                out = decode_layers(h, layers.__getitem__, config, dims, attend, cos_sin, reduce)
            else:
                out = h
                for i, w in enumerate(layers):
                    out = decoder_layer(out, w, config, dims, attend, i, cos_sin, reduce)
        results.append((out, kv, calls))
    return results


SLICES = [(1, 0), (2, 1), (3, 2)]  # qwen2's 4 heads in int4 groups of 2 heads leave no third rank a head
CASES = [(kind, quant, *s) for kind, quants in FORMATS.items() for quant in quants for s in SLICES
         if (kind, quant, s[0]) != ("qwen2", "int4", 3)]


@pytest.mark.parametrize("seqlen", [1, 3, MAX_POSITIONS])
@pytest.mark.parametrize("kind,quant,world,rank", CASES)
def test_the_array_step_is_the_torch_step_bit_for_bit(folders, kind, quant, world, rank, seqlen):
    config, dims, layers = shard(folders[kind], quant, world, rank)
    (ref, ref_kv, ref_calls), (got, got_kv, got_calls) = both_paths(config, dims, layers, seqlen, seed=seqlen + rank)
    assert torch.equal(got, ref)
    assert got_calls == ref_calls == [(1, seqlen, config.hidden_size)] * (2 * config.num_layers)
    end = PAST + seqlen
    for layer in range(config.num_layers):
        for mine, theirs in zip(got_kv.reserve(layer, 0), ref_kv.reserve(layer, 0)):
            assert torch.equal(mine[:, :, :end], theirs[:, :, :end])


def test_a_weight_no_kernel_serves_takes_the_torch_linear(folders):
    """A strided float32 weight (no kernel reads it) goes through models.quant_kernels.linear, as in
    decoder_layer: the step is still the same, bit for bit."""
    config, dims, layers = shard(folders["qwen2"], "none", 1, 0)
    layers = [llama.LayerWeights(**(vars(w) | {"wq": w.wq.t().contiguous().t()})) for w in layers]
    assert not layers[0].wq.is_contiguous()
    (ref, _, _), (got, _, _) = both_paths(config, dims, layers, 1, seed=3)
    assert torch.equal(got, ref)


def test_serves_only_one_float32_request_over_a_local_cache(folders):
    config, dims, _ = shard(folders["llama"], "none", 1, 0)
    kv = KVCache(config.num_layers, dims.n_local_kv_heads, config.head_dim)
    attend = kv.attend_for(config, dims, 1)
    d = config.hidden_size
    assert serves(torch.zeros(1, 1, d), attend)
    assert serves(torch.zeros(1, MAX_POSITIONS, d), attend)
    assert not serves(torch.zeros(1, MAX_POSITIONS + 1, d), attend)  # a prefill
    assert not serves(torch.zeros(2, 1, d), attend)  # a batch
    assert not serves(torch.zeros(1, 1, d, dtype=torch.bfloat16), attend)
    assert not serves(torch.zeros(1, 1, d), lambda layer, q, k, v: q)  # attention elsewhere (edge.offload)
    half = KVCache(config.num_layers, dims.n_local_kv_heads, config.head_dim, dtype=torch.bfloat16)
    assert not serves(torch.zeros(1, 1, d), half.attend_for(config, dims, 1))


def test_a_models_decode_steps_take_the_array_path(folders, monkeypatch):
    """LocalModel's decode steps and verifications never call decoder_layer (its prefill does), and
    give the logits of the torch path exactly."""
    model = LocalModel(folders["mistral"])
    prompt, steps = list(range(3, 20)), [[7], [9], [11, 12, 13], [2]]

    def run() -> list[torch.Tensor]:
        kv = model.new_cache(64)
        out = [model.forward(prompt, kv)]
        return out + [model.forward(tokens, kv, all_logits=True) for tokens in steps]

    torch_path = llama.decoder_layer
    monkeypatch.setattr(llama, "serves", lambda h, attend: False)
    expected = run()
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(llama, "decoder_layer", lambda *a, **k: calls.append(a[0].shape[1]) or torch_path(*a, **k))
    got = run()
    assert set(calls) == {len(prompt)}  # the prefill's layers only
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert np.isfinite(got[-1].numpy()).all()
