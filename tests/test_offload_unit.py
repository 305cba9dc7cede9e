"""Attention offload without processes: the head slices per node, sliced attention equals whole
attention, and an attention node refuses steps it cannot serve."""

import numpy as np
import pytest
import torch

from edge.attention import AttentionNode, AttentionNodeSettings
from models.attention import attention_mask, gather_map, grouped_attention
from models.config import config_from_hf
from models.sharding import PlanError, attention_nodes_of, attention_slices, local_dims
from transport.codec import decode, encode, pack_array


def make_config(heads: int, kv_heads: int, head_dim: int = 8, layers: int = 2):
    return config_from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": heads * head_dim,
                           "intermediate_size": 32, "num_hidden_layers": layers, "num_attention_heads": heads,
                           "num_key_value_heads": kv_heads, "vocab_size": 64, "max_position_embeddings": 64,
                           "rms_norm_eps": 1e-5})


SHAPES = [(6, 2), (8, 2), (4, 4), (32, 8), (12, 3), (9, 3)]


@pytest.mark.parametrize(("heads", "kv_heads"), SHAPES)
def test_slices_cover_every_head_once_on_the_right_node(heads, kv_heads):
    config = make_config(heads, kv_heads)
    for nodes in range(1, kv_heads + 1):
        node_of = attention_nodes_of(config, nodes)
        assert sorted(set(node_of)) == list(range(nodes))
        for world in range(1, min(heads, 4) + 1):
            for dims in local_dims(config, world):
                slices = attention_slices(dims, node_of)
                assert [s.q_start for s in slices] == [0] + [s.q_stop for s in slices[:-1]]
                assert slices[-1].q_stop == dims.n_local_heads
                assert [s.kv_start for s in slices] == [0] + [s.kv_stop for s in slices[:-1]]
                assert slices[-1].kv_stop == dims.n_local_kv_heads
                for s in slices:
                    assert {node_of[dims.kv_start + j] for j in range(s.kv_start, s.kv_stop)} == {s.node}


def test_more_nodes_than_kv_heads_is_refused():
    with pytest.raises(PlanError, match="3 attention nodes but the model has 2 KV heads"):
        attention_nodes_of(make_config(6, 2), 3)


@pytest.mark.parametrize(("heads", "kv_heads", "world", "nodes"), [(6, 2, 3, 2), (8, 2, 3, 2), (9, 3, 2, 3),
                                                                   (12, 3, 4, 2), (4, 4, 1, 3)])
def test_sliced_attention_equals_whole_attention(heads, kv_heads, world, nodes):
    config = make_config(heads, kv_heads)
    gen = torch.Generator().manual_seed(0)
    seqlen, total = 3, 7
    mask = attention_mask(torch.arange(total - seqlen, total), total, None)
    for dims in local_dims(config, world):
        q = torch.randn(1, dims.n_local_heads, seqlen, 8, generator=gen)
        k, v = (torch.randn(1, dims.n_local_kv_heads, total, 8, generator=gen) for _ in range(2))
        whole = grouped_attention(q, k, v, gather_map(dims), mask)
        parts = [grouped_attention(q[:, s.q_start:s.q_stop], k[:, s.kv_start:s.kv_stop],
                                   v[:, s.kv_start:s.kv_stop], s.kv_map, mask)
                 for s in attention_slices(dims, attention_nodes_of(config, nodes))]
        torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-6, atol=1e-6)


def _step(rid="r1", layer=0, start=0, heads=3, kv=1, seqlen=1, head_dim=8, cap=16):
    def arr(h):
        return pack_array(np.random.default_rng(layer + start).standard_normal((1, h, seqlen, head_dim),
                                                                               dtype=np.float32))
    msg = {"t": "attn", "rid": rid, "layer": layer, "start": start, "cap": cap, "q": arr(heads), "k": arr(kv),
           "v": arr(kv)}
    return decode(encode(msg))  # as it arrives off the wire


def test_attention_node_serves_in_order_and_refuses_the_rest():
    node = AttentionNode(AttentionNodeSettings(node=0, master_host="127.0.0.1", master_port=1, secret=b"x" * 16))
    node.config = make_config(6, 2)  # head_dim 8, 2 layers
    requests = {}
    try:
        for layer in (0, 1):  # a 2-token prefill, both layers
            out = node._attend(requests, _step(layer=layer, seqlen=2))
            assert out.shape == (1, 3, 2, 8)
        node.requests[1] = requests
        assert node.kv_bytes() == 2 * 2 * 1 * 8 * 4 * 2  # 2 x layers x kv heads x head_dim x 4, 2 tokens
        bad = [(_step(layer=1, start=2), "expected layer 0 at position 2"),
               (_step(layer=0, start=5), "expected layer 0 at position 2"),
               (_step(rid="r2", start=3), "unknown here"),
               (_step(start=2, head_dim=4), "bad shapes"),
               (_step(start=2, heads=3, kv=2), "do not group"),
               (_step(start=2) | {"map": [0, 5, 0]}, "does not fit"),
               (_step(start=63, seqlen=2), "positions 63..65 exceed the context of 64"),
               (_step(rid="r4", seqlen=65, cap=80), "positions 0..65 exceed the context")]
        for msg, message in bad:
            with pytest.raises(ValueError, match=message):
                node._attend(requests, msg)
        node._attend(requests, _step(layer=0, start=2))  # the request is still served after refusals
    finally:
        node.compute.shutdown()
