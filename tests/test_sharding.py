"""The sharding plan as a table, and the sharded forward (in memory) against the whole model."""

import asyncio

import pytest
import torch
from hf_reference import make_hf_checkpoint

from edge.engine import ShardModel
from models.checkpoint import Checkpoint
from models.config import config_from_hf
from models.llama import embed, load_head
from models.model import LocalModel
from models.sharding import PlanError, local_dims, split_integer
from transport.collectives import StarAllReduce
from transport.memory import memory_mesh


def _config(heads=6, kv=2, inter=520):
    return config_from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": heads * 16,
                           "num_attention_heads": heads, "num_key_value_heads": kv,
                           "intermediate_size": inter, "num_hidden_layers": 1, "vocab_size": 10})


@pytest.mark.parametrize(("total", "weights", "expected"), [
    (6, [1, 1], [3, 3]), (6, [1, 1, 1, 1], [2, 2, 1, 1]), (6, [2, 1, 1], [3, 2, 1]),
    (520, [1, 1, 1], [174, 173, 173]), (7, [1, 2, 4], [1, 2, 4]), (5, [1.5, 1], [3, 2]),
])
def test_split_integer_is_whole_and_proportional(total, weights, expected):
    assert split_integer(total, weights) == expected


@pytest.mark.parametrize(("world", "weights", "heads", "kv_ranges", "kv_maps"), [
    (1, None, [6], [(0, 2)], [(0, 0, 0, 1, 1, 1)]),
    (2, None, [3, 3], [(0, 1), (1, 2)], [(0, 0, 0), (0, 0, 0)]),
    # 4 ranks, 2 KV heads: rank 1 holds heads 2-3, which straddle both KV heads (replicas).
    (4, None, [2, 2, 1, 1], [(0, 1), (0, 2), (1, 2), (1, 2)], [(0, 0), (0, 1), (0,), (0,)]),
    (3, [2, 1, 1], [3, 2, 1], [(0, 1), (1, 2), (1, 2)], [(0, 0, 0), (0, 0), (0,)]),
    (6, None, [1] * 6, [(0, 1)] * 3 + [(1, 2)] * 3, [(0,)] * 6),
])
def test_plan_table(world, weights, heads, kv_ranges, kv_maps):
    plans = local_dims(_config(), world, weights)
    assert [p.n_local_heads for p in plans] == heads
    assert [(p.kv_start, p.kv_start + p.n_local_kv_heads) for p in plans] == kv_ranges
    assert [p.kv_map for p in plans] == kv_maps
    assert sum(p.local_intermediate for p in plans) == 520
    assert [p.head_start for p in plans] == [sum(heads[:r]) for r in range(world)]


@pytest.mark.parametrize(("world", "weights", "message"), [
    (7, None, "only 6 attention heads"),
    (2, [100, 1], "leave rank 1 with 0 attention heads"),
    (2, [1, 0], "must be positive"),
    (2, [1, 1, 1], "3 device weights given for 2 workers"),
])
def test_impossible_plans(world, weights, message):
    with pytest.raises(PlanError, match=message):
        local_dims(_config(), world, weights)


@pytest.mark.parametrize(("kind", "world", "weights"), [
    ("llama", 2, None), ("llama", 4, None), ("llama", 6, None), ("llama", 3, [3, 2, 1]),
    ("qwen2", 3, None), ("mistral", 4, [1, 1, 1, 5])])
async def test_sharded_forward_in_memory_equals_whole_model(tmp_path, kind, world, weights):
    folder = make_hf_checkpoint(tmp_path / kind, kind, seed=1)
    whole = LocalModel(folder)
    tokens = list(range(5, 40))  # longer than Mistral's window of 12
    expected = whole.forward(tokens, whole.new_cache(), all_logits=True)
    ckpt = Checkpoint(folder)
    shards = [ShardModel.from_checkpoint(ckpt, d) for d in local_dims(ckpt.config, world, weights)]
    mesh = memory_mesh(world)
    stars = [StarAllReduce(r, world, mesh[r]) for r in range(world)]
    h = embed(torch.tensor([tokens]), load_head(ckpt))
    outs = await asyncio.gather(*[s.forward(h, [s.new_cache()], star, 10.0) for s, star in zip(shards, stars)])
    assert all(out is None for out in outs[1:])  # only the hub gathers the logits
    torch.testing.assert_close(torch.from_numpy(outs[0][0]), expected[-1], rtol=0, atol=2e-5)
    for s in shards:
        s.close()


@pytest.mark.parametrize(("kind", "rope", "world"), [("llama", None, 2), ("llama", "dynamic", 3),
                                                     ("mistral", None, 2), ("qwen2", None, 1)])
async def test_batched_decode_equals_one_request_at_a_time(tmp_path, kind, rope, world):
    """Requests at different positions decode together in one forward and get the logits each
    would get alone (Mistral's window and dynamic RoPE depend on each row's own length)."""
    # dynamic RoPE rescales past max_position_embeddings: only the 14-token row goes beyond 10
    folder = make_hf_checkpoint(tmp_path / kind, kind, seed=2, rope=rope,
                                max_position_embeddings=10 if rope == "dynamic" else 64)
    whole = LocalModel(folder)
    prompts = [list(range(3, 8)), list(range(20, 29)), list(range(40, 54))]  # 5, 9, 14 tokens
    nxt = [7, 11, 13]

    def alone(prompt: list[int], token: int) -> torch.Tensor:  # prefill, then one decode step
        cache = whole.new_cache()
        whole.forward(prompt, cache)
        return whole.forward([token], cache)

    expected = torch.stack([alone(p, t) for p, t in zip(prompts, nxt)])
    ckpt = Checkpoint(folder)
    shards = [ShardModel.from_checkpoint(ckpt, d) for d in local_dims(ckpt.config, world)]
    mesh = memory_mesh(world)
    stars = [StarAllReduce(r, world, mesh[r]) for r in range(world)]
    head = load_head(ckpt)
    caches = [[s.new_cache(4) for _ in prompts] for s in shards]  # small: prefill grows them
    for i, p in enumerate(prompts):  # prefill one request at a time
        h = embed(torch.tensor([p]), head)
        await asyncio.gather(*[s.forward(h, [c[i]], star, 10.0) for s, c, star in zip(shards, caches, stars)])
    h = embed(torch.tensor([[t] for t in nxt]), head)  # [3, 1, D]
    outs = await asyncio.gather(*[s.forward(h, c, star, 10.0) for s, c, star in zip(shards, caches, stars)])
    torch.testing.assert_close(torch.from_numpy(outs[0]), expected, rtol=0, atol=2e-5)
    for s in shards:
        s.close()


@pytest.mark.parametrize(("profiles", "expected"), [
    ([{"gemv_gbps": 10, "free_bytes": 1e12}] * 3, [1.0, 1.0, 1.0]),
    ([{"gemv_gbps": 20, "free_bytes": 1e12}, {"gemv_gbps": 10, "free_bytes": 1e12}], [1.0, 0.5]),
    # the fast device has little memory: it may hold only 24% of the model
    ([{"gemv_gbps": 20, "free_bytes": 300}, {"gemv_gbps": 10, "free_bytes": 1e12}], [0.3, 1.0]),
    ([{"gemv_gbps": 10.4, "free_bytes": 1e12}, {"gemv_gbps": 9.8, "free_bytes": 1e12}], [1.0, 0.9]),
])
def test_auto_weights_follow_bandwidth_and_memory(profiles, expected):
    from edge.profile import weights_from_profiles

    assert weights_from_profiles(profiles, model_bytes=1000) == expected


@pytest.mark.parametrize(("free", "heads", "expected"), [
    ({0: 1000, 1: 1000}, {0: 1, 1: 1}, 2000),  # even split: each holds half of a request's KV
    ({0: 1000, 1: 300}, {0: 1, 1: 1}, 600),  # the tightest device decides
    ({0: 1000, 1: 300}, {0: 3, 1: 1}, 1200),  # a device with fewer heads needs less of it
    ({0: 1000}, {0: 1, 1: 1}, 2000),  # a device that has not reported yet is left out
    ({}, {0: 1}, 0),
])
def test_kv_room_is_set_by_the_tightest_device(free, heads, expected):
    from edge.profile import kv_room

    assert kv_room(free, heads) == expected
