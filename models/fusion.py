"""Fused projections: a layer's q, k and v weights held back to back as one matrix (and its gate and
up weights as another), so a decode step reads each set with one GEMV call instead of three (two).

Why: a decode step's GEMVs are small (SmolLM2-135M: 192-1536 output channels; halved again on 2
devices), and each call pays its own start: the kernel's dispatch, and memory streams that ramp up
again at every new matrix. One thread, int4, the weights read from memory (scratch timing, Zen 5
host): SmolLM2-135M's 30 layers 3.5 -> 3.2 ms a token fused, its 2-device slices 1.7 -> 1.5, the
`large` preset's 2-device slices 6.0 -> 5.6.

The separate weights stay, as views into the fused one: no byte is held twice, and every other path
(a prefill's GEMM, the split writer, attention nodes) sees them as before. A fused quantized weight
is tiled in the widest tile that divides every part (the parts' own tiles may be wider); a channel's
sum is the same sequence of operations whatever its tile or its place in the matrix (the kernels'
channels are independent), so the fused GEMV gives the separate GEMVs' bits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from models.quant import QuantWeight, tile_width

if TYPE_CHECKING:
    from models.llama import LayerWeights, Weight


def fuse_layer(w: LayerWeights, own: bool = False) -> LayerWeights:
    """w with `wqkv` (and `bqkv`) and `w_gate_up` (and `b_gate_up`) set where the parts fuse, and the
    parts replaced by views of them. `own`: the tensors that do not fuse are copied too, so none views
    the buffer that w's were read into (a layer file's: edge.weights), which is freed."""
    fused = {}
    for whole, bias, parts, biases in (("wqkv", "bqkv", ("wq", "wk", "wv"), ("bq", "bk", "bv")),
                                       ("w_gate_up", "b_gate_up", ("w_gate", "w_up"), ("b_gate", "b_up"))):
        found = fuse([getattr(w, p) for p in parts], [getattr(w, b) for b in biases])
        if found is not None:
            fused[whole], views, fused[bias] = found
            fused |= dict(zip(parts, views, strict=True))
    if own:
        fused |= {f.name: _copy(getattr(w, f.name)) for f in dataclasses.fields(w) if f.name not in fused}
    return dataclasses.replace(w, **fused) if fused else w


def _copy(t: Weight | None) -> Weight | None:
    if isinstance(t, QuantWeight):
        return QuantWeight(t.kind, t.q.clone(), t.scale.clone(), None if t.min is None else t.min.clone())
    return None if t is None else t.clone()


def fuse(weights: list[Weight], biases: list[torch.Tensor | None]
         ) -> tuple[Weight, list[Weight], torch.Tensor | None] | None:
    """Weights [N_i, K] of one format -> ([sum N_i, K], a view of it for each part, the biases back to
    back or None); None when they do not fuse: formats, dtypes or K differ, or some but not all have a
    bias."""
    if any(b is not None for b in biases) and any(b is None for b in biases):
        return None
    if len({w.shape[1] for w in weights}) != 1:
        return None
    bias = torch.cat(biases) if biases[0] is not None else None
    if all(isinstance(w, torch.Tensor) for w in weights):
        if len({w.dtype for w in weights}) != 1:
            return None
        whole = torch.cat(weights)  # [sum N_i, K]
        return whole, _split(whole, [w.shape[0] for w in weights]), bias
    if not all(isinstance(w, QuantWeight) for w in weights) or len({w.kind for w in weights}) != 1:
        return None
    width = common_tile([w.shape[0] for w in weights])
    plains = [w.plain() for w in weights]  # q, scale, min with output channels last
    q, scale = (torch.cat([p[i] for p in plains], -1) for i in (0, 1))
    minimum = torch.cat([p[2] for p in plains], -1) if plains[0][2] is not None else None
    whole = QuantWeight.from_plain(weights[0].kind, q, scale, minimum, width)
    return whole, [_quant_view(whole, a, b) for a, b in _bounds([w.shape[0] for w in weights])], bias


def common_tile(sizes: list[int]) -> int:
    """The tile width `tile_width` would give a matrix of the parts' greatest common divisor of rows:
    the widest that divides every part, so each part is whole tiles."""
    return tile_width(math.gcd(*sizes))


def _bounds(sizes: list[int]) -> list[tuple[int, int]]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(s, s + n) for s, n in zip(starts, sizes, strict=True)]


def _split(whole: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return [whole[a:b] for a, b in _bounds(sizes)]  # row blocks of a contiguous matrix: contiguous


def _quant_view(whole: QuantWeight, start: int, stop: int) -> QuantWeight:
    """Output channels start..stop of a fused weight (tile-aligned), sharing its bytes."""
    t0, t1 = start // whole.tile, stop // whole.tile
    if whole.kind == "int8":  # scales per channel [N]
        return QuantWeight("int8", whole.q[t0:t1], whole.scale[start:stop])
    return QuantWeight(whole.kind, whole.q[t0:t1], whole.scale[t0:t1],
                       None if whole.min is None else whole.min[t0:t1])
