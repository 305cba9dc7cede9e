"""Our inverse frequencies against transformers' own rope functions, for every rope type."""

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from models.config import config_from_hf
from models.rope import RotaryTable, apply_rope, inv_freq_for, rope_tables

ROPES = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
     "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
]


def _configs(rope: dict):
    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=64, num_hidden_layers=1, vocab_size=32,
                                  max_position_embeddings=256, rope_parameters=dict(rope))
    ours = config_from_hf(hf.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    return hf, ours


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: r["rope_type"])
@pytest.mark.parametrize("seq_len", [16, 256, 1000])
def test_inv_freq_matches_transformers(rope, seq_len):
    hf, ours = _configs(rope)
    kwargs = {"seq_len": seq_len} if rope["rope_type"] == "dynamic" else {}
    fn = ROPE_INIT_FUNCTIONS.get(rope["rope_type"])
    if fn is None:  # "default" has no entry: plain 1 / theta^(2i/d)
        ref, ref_scale = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 64, 2).float() / 64)), 1.0
    else:
        ref, ref_scale = fn(hf, None, **kwargs)
    inv_freq, scale = inv_freq_for(ours, seq_len)
    torch.testing.assert_close(inv_freq, ref.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale, rel=1e-9)


def test_rotation_matches_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf, ours = _configs(ROPES[3])
    positions = torch.arange(5, 12)
    q, k = torch.randn(1, 4, 7, 64), torch.randn(1, 2, 7, 64)
    cos_ref, sin_ref = LlamaRotaryEmbedding(hf)(q, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    cos, sin = RotaryTable(ours).cos_sin(positions)
    torch.testing.assert_close(apply_rope(q, cos, sin), q_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_ref, rtol=1e-5, atol=1e-6)


def _config_with_head_dim(rope: dict, head_dim: int):
    hf = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=64, num_hidden_layers=1, vocab_size=32,
                                  max_position_embeddings=4096, rope_parameters=dict(rope))
    return config_from_hf(hf.to_dict() | {"architectures": ["LlamaForCausalLM"]})


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: r["rope_type"])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_tables_are_the_bits_built_for_those_positions_alone(rope, head_dim, dtype):
    """The tables a step gets (cached in blocks for static frequencies) are exactly what building
    them for the step's own positions gives: a decode step's one position, a prefill's range, one
    across a block boundary, and positions asked again after others."""
    table = RotaryTable(_config_with_head_dim(rope, head_dim))
    block = RotaryTable.BLOCK
    for start, count in [(0, 1), (5, 1), (0, 37), (block - 3, 7), (block, 1), (3 * block - 1, 2 * block + 5),
                         (5, 1), (block - 1, 1), (2 * block + 17, 1)]:
        positions = torch.arange(start, start + count)
        want = rope_tables(*table.cos_sin(positions), dtype)
        got = table.tables(start, count, dtype)
        for g, w in zip(got, want, strict=True):
            assert g.shape == (count, head_dim) and g.dtype == dtype
            assert torch.equal(g, w), (start, count)
