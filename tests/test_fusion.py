"""Fused projections (models.fusion): one matrix for q, k and v (and for gate and up), the parts kept
as views of it. The fused GEMV must give each part's own GEMV bit for bit (the decode step relies on
it: tests/test_decode_step.py compares it with decoder_layer on the unfused weights), hold no byte
twice, and fall back to the parts where they cannot fuse."""

import numpy as np
import pytest
import torch

from models.fusion import common_tile, fuse, fuse_layer
from models.llama import LayerWeights
from models.quant import QuantWeight
from models.quant_kernels import gemv_rows, kernel_serves, linear
from tests.test_dequant_kernels import weight

K = 64
# SmolLM2-135M's q, k, v on 2 devices (tiles of 144 and 96: fused in tiles of 96); a 1-device
# Llama's (256 wide); gate and up that are no multiple of 16 channels (tiles of 8).
PARTS = [[288, 96, 96], [512, 128, 128], [40, 40]]


def part_weights(kind: str, sizes: list[int], seed: int) -> list[torch.Tensor | QuantWeight]:
    if kind in ("float32", "bfloat16"):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(n, K, generator=gen).to(getattr(torch, kind)) for n in sizes]
    return [weight(kind, n, K, seed + i) for i, n in enumerate(sizes)]


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def tensors_of(w) -> list[torch.Tensor]:
    return [t for t in (w.q, w.scale, w.min) if t is not None] if isinstance(w, QuantWeight) else [w]


@pytest.mark.parametrize("sizes", PARTS)
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8", "int8g", "int4"])
def test_the_fused_gemv_is_each_parts_gemv_bit_for_bit(kind, sizes):
    parts = part_weights(kind, sizes, seed=len(sizes))
    whole, views, bias = fuse(parts, [None] * len(parts))
    assert bias is None and whole.shape == (sum(sizes), K)
    if isinstance(whole, QuantWeight):
        assert whole.tile == common_tile(sizes) and all(n % whole.tile == 0 for n in sizes)
    for rows in (1, 3):
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
        if kind == "bfloat16":
            x = x.bfloat16()
        assert kernel_serves(whole)
        fused = linear(x, whole)
        separate = torch.cat([linear(x, p) for p in parts], dim=-1)
        assert torch.equal(fused, separate)
        for view, part in zip(views, parts, strict=True):
            assert torch.equal(linear(x, view), linear(x, part))
    for view in views:  # the parts are views: no byte held twice
        for t, w in zip(tensors_of(view), tensors_of(whole), strict=True):
            assert storage(t) == storage(w)


def test_biases_fuse_with_their_weights_and_the_fused_rows_add_them():
    parts = part_weights("int4", [64, 32, 32], seed=3)
    biases = [torch.randn(w.shape[0]) for w in parts]
    whole, _, bias = fuse(parts, biases)
    assert torch.equal(bias, torch.cat(biases))
    x = np.random.default_rng(0).standard_normal((2, K)).astype(np.float32)
    separate = np.concatenate([gemv_rows(x, p, b) for p, b in zip(parts, biases, strict=True)], axis=1)
    assert np.array_equal(gemv_rows(x, whole, bias), separate)


def test_parts_that_cannot_fuse_stay_apart():
    int8, int4 = part_weights("int8", [32], 1)[0], part_weights("int4", [32], 1)[0]
    assert fuse([int8, int4], [None, None]) is None  # two formats
    floats = part_weights("float32", [32, 32], 1)
    assert fuse([floats[0], floats[1].bfloat16()], [None, None]) is None  # two dtypes
    assert fuse([floats[0], torch.randn(32, 2 * K)], [None, None]) is None  # two widths of input
    assert fuse(floats, [torch.zeros(32), None]) is None  # a bias on one part only
    assert fuse([floats[0], int8], [None, None]) is None  # plain and quantized


def layer(kind: str, seed: int) -> LayerWeights:
    q, k, v, gate, up = part_weights(kind, [96, 32, 32, 48, 48], seed)
    o, down = part_weights(kind, [K, K], seed + 10)
    norm = torch.ones(K)
    return LayerWeights(norm, q, k, v, o, norm.clone(), gate, up, down)


@pytest.mark.parametrize("kind", ["float32", "int4"])
def test_a_fused_layer_holds_the_same_bytes_and_reads_the_same_weights(kind):
    w = layer(kind, seed=7)
    fused = fuse_layer(w)
    assert fused.wqkv is not None and fused.w_gate_up is not None
    assert fused.nbytes() == w.nbytes()
    x = torch.randn(1, K)
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        assert torch.equal(linear(x, getattr(fused, name)), linear(x, getattr(w, name)))
    assert storage(tensors_of(fused.wq)[0]) == storage(tensors_of(fused.wqkv)[0])
    assert fuse_layer(LayerWeights(**(vars(w) | {"wk": part_weights("int8", [32], 1)[0]}))).wqkv is None


def test_an_owned_fused_layer_keeps_nothing_of_the_buffer_it_was_read_from():
    """A window's resident layer is read into one buffer per file (edge.weights): once fused, no
    tensor may view that buffer, or it would stay held beside the fused copies."""
    buffer = torch.randn(10 * 96 * K)
    views = iter(buffer.split(96 * K))

    def take(n: int) -> torch.Tensor:
        return next(views)[:n * K].view(n, K)
    w = LayerWeights(buffer[:K], take(96), take(32), take(32), take(K), buffer[K:2 * K], take(48), take(48),
                     take(K), bq=buffer[:96], bk=buffer[:32], bv=buffer[:32])
    owned = fuse_layer(w, own=True)
    held = {storage(t) for t in vars(owned).values() if t is not None}
    assert storage(buffer) not in held
    assert owned.bqkv is not None and owned.nbytes() == w.nbytes()
    x = torch.randn(2, K)
    assert torch.equal(linear(x, owned.wo), linear(x, w.wo))
    assert torch.equal(linear(x, owned.wqkv, owned.bqkv),
                       torch.cat([linear(x, w.wq, w.bq), linear(x, w.wk, w.bk), linear(x, w.wv, w.bv)], -1))
