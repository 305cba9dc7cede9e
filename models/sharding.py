"""Pure sharding plan: which rank holds which attention heads and MLP columns, and how each tensor splits.

The model math never sees a rank; a rank's weights are sliced from outside with `TENSOR_SPLITS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from models.config import LlamaConfig

# How one Hugging Face tensor is cut. HF Linear weights are [out_features, in_features].
#   out: split dim 0 by the unit (q/k/v/gate/up weights and their biases)
#   in:  split dim 1 by the unit (o_proj, down_proj weights)
#   replicated: every rank holds it whole (norms)
#   rank0: only rank 0 holds it (biases added after a row-wise split, so they count once)
SplitKind = Literal["out", "in", "replicated", "rank0"]
Unit = Literal["q", "kv", "mlp", "vocab", "none"]

TENSOR_SPLITS: dict[str, tuple[SplitKind, Unit]] = {
    "input_layernorm.weight": ("replicated", "none"),
    "self_attn.q_proj.weight": ("out", "q"),
    "self_attn.q_proj.bias": ("out", "q"),
    "self_attn.k_proj.weight": ("out", "kv"),
    "self_attn.k_proj.bias": ("out", "kv"),
    "self_attn.v_proj.weight": ("out", "kv"),
    "self_attn.v_proj.bias": ("out", "kv"),
    "self_attn.q_norm.weight": ("replicated", "none"),  # [hd], the same for every head (Qwen3)
    "self_attn.k_norm.weight": ("replicated", "none"),
    "self_attn.o_proj.weight": ("in", "q"),
    "self_attn.o_proj.bias": ("rank0", "none"),
    "post_attention_layernorm.weight": ("replicated", "none"),
    "mlp.gate_proj.weight": ("out", "mlp"),
    "mlp.gate_proj.bias": ("out", "mlp"),
    "mlp.up_proj.weight": ("out", "mlp"),
    "mlp.up_proj.bias": ("out", "mlp"),
    "mlp.down_proj.weight": ("in", "mlp"),
    "mlp.down_proj.bias": ("rank0", "none"),
    # Outside the layers: the LM head is vocab-parallel (each rank computes its slice of the
    # logits, rank 0 gathers), so no rank streams the whole head every token.
    "lm_head.weight": ("out", "vocab"),
    "model.embed_tokens.weight": ("out", "vocab"),  # as the LM head when tied
    "model.norm.weight": ("replicated", "none"),
}


class PlanError(ValueError):
    """A sharding plan that cannot work; the message names the quantities. Reported at start."""


@dataclass(frozen=True)
class LocalDims:
    """What one rank holds: a contiguous range of query heads, the KV heads they need, MLP columns."""

    rank: int
    world_size: int
    head_start: int
    n_local_heads: int
    kv_start: int
    n_local_kv_heads: int
    # For each local query head, the index of its KV head among the local KV heads.
    kv_map: tuple[int, ...]
    mlp_start: int
    local_intermediate: int
    head_dim: int
    vocab_start: int = 0
    local_vocab: int = 0

    @property
    def uniform_groups(self) -> bool:
        """True when local query heads form equal consecutive groups per local KV head (no gather needed)."""
        if self.n_local_heads % self.n_local_kv_heads:
            return False
        group = self.n_local_heads // self.n_local_kv_heads
        return self.kv_map == tuple(i // group for i in range(self.n_local_heads))

    def rows(self, unit: Unit) -> tuple[int, int]:
        """[start, stop) of this rank's slice along a split dimension, in elements."""
        if unit == "q":
            return self.head_start * self.head_dim, (self.head_start + self.n_local_heads) * self.head_dim
        if unit == "kv":
            return self.kv_start * self.head_dim, (self.kv_start + self.n_local_kv_heads) * self.head_dim
        if unit == "mlp":
            return self.mlp_start, self.mlp_start + self.local_intermediate
        if unit == "vocab":
            return self.vocab_start, self.vocab_start + self.local_vocab
        raise ValueError(f"unit {unit!r} has no slice")


def split_integer(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of `total` units in proportion to `weights` (whole numbers, sum exact)."""
    if not weights or any(w <= 0 for w in weights):
        raise PlanError(f"device weights must be positive numbers, got {weights}")
    quotas = [total * w / sum(weights) for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _starts(counts: list[int]) -> list[int]:
    starts, acc = [], 0
    for c in counts:
        starts.append(acc)
        acc += c
    return starts


def local_dims(config: LlamaConfig, world_size: int, weights: list[float] | None = None,
               align: tuple[int, int] = (1, 1)) -> list[LocalDims]:
    """The plan for every rank; raises PlanError (reported to the user at start) when it cannot work.

    `align`: the input features of o_proj (heads x head_dim) and of down_proj (MLP columns) are cut
    only at multiples of these, so a quantization group (models.quant) never straddles two ranks.
    """
    weights = weights or [1.0] * world_size
    if len(weights) != world_size:
        raise PlanError(f"{len(weights)} device weights given for {world_size} workers")
    if world_size > config.num_heads:
        raise PlanError(
            f"{world_size} workers but the model has only {config.num_heads} attention heads; "
            f"use at most {config.num_heads} workers"
        )
    head_unit = align[0] // math.gcd(align[0], config.head_dim) if world_size > 1 else 1
    col_unit = align[1] if world_size > 1 else 1
    if config.num_heads % head_unit or config.intermediate_size % col_unit:
        raise PlanError(f"quantization groups of {max(align)} cannot be split over {world_size} workers: the "
                        f"model's {config.num_heads} heads of {config.head_dim} and {config.intermediate_size} "
                        "MLP columns do not come in whole groups; use fewer workers, or --quantize none or int8")
    heads = [h * head_unit for h in split_integer(config.num_heads // head_unit, weights)]
    cols = [c * col_unit for c in split_integer(config.intermediate_size // col_unit, weights)]
    vocab = split_integer(config.vocab_size, weights)
    for rank, (h, c) in enumerate(zip(heads, cols, strict=True)):
        if h == 0 or c == 0:
            raise PlanError(
                f"device weights {weights} leave rank {rank} with {h} attention heads and {c} MLP "
                f"columns of {config.num_heads} heads / {config.intermediate_size} columns"
                + (f" (quantization groups make heads go {head_unit} and columns {col_unit} at a time)"
                   if max(align) > 1 else "") + "; make its weight larger or use fewer workers"
            )
    group = config.kv_group_size
    plans = []
    rows = zip(_starts(heads), heads, _starts(cols), cols, _starts(vocab), vocab, strict=True)
    for rank, (h0, h, f0, f, v0, v) in enumerate(rows):
        kv0, kv1 = h0 // group, (h0 + h - 1) // group + 1
        kv_map = tuple((h0 + j) // group - kv0 for j in range(h))
        plans.append(LocalDims(rank, world_size, h0, h, kv0, kv1 - kv0, kv_map, f0, f,
                               config.head_dim, v0, v))
    return plans


def full_dims(config: LlamaConfig) -> LocalDims:
    """The single-device plan: one rank holds everything."""
    return local_dims(config, 1)[0]


def split_for(suffix: str) -> tuple[SplitKind, Unit]:
    """The split of a per-layer tensor suffix such as 'mlp.up_proj.weight'."""
    try:
        return TENSOR_SPLITS[suffix]
    except KeyError:
        raise PlanError(f"no sharding rule for tensor {suffix!r}") from None


@dataclass(frozen=True)
class AttentionSlice:
    """The part of one rank's heads whose keys and values live on one attention node (offload).

    Ranges index the rank's local heads; `kv_map` (None when the groups are whole) gives, for each
    query head of the slice, its KV head within the slice.
    """

    node: int
    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int
    kv_map: tuple[int, ...] | None


def attention_nodes_of(config: LlamaConfig, n_nodes: int) -> list[int]:
    """The attention node of every global KV head: contiguous, even blocks (a KV head never splits)."""
    if not 0 < n_nodes <= config.num_kv_heads:
        raise PlanError(f"{n_nodes} attention nodes but the model has {config.num_kv_heads} KV heads; "
                        f"use 1 to {config.num_kv_heads} attention nodes")
    counts = split_integer(config.num_kv_heads, [1.0] * n_nodes)
    return [node for node, count in enumerate(counts) for _ in range(count)]


def attention_slices(dims: LocalDims, node_of: list[int]) -> list[AttentionSlice]:
    """Cut a rank's heads by the attention node of their KV head; one slice per node it talks to."""
    slices = []
    j = 0
    while j < dims.n_local_kv_heads:
        node = node_of[dims.kv_start + j]
        j1 = j
        while j1 < dims.n_local_kv_heads and node_of[dims.kv_start + j1] == node:
            j1 += 1
        heads = [i for i, kv in enumerate(dims.kv_map) if j <= kv < j1]
        sub_map = tuple(dims.kv_map[i] - j for i in heads)
        group, n_kv = len(heads) // (j1 - j), j1 - j
        whole = len(heads) % n_kv == 0 and sub_map == tuple(i // group for i in range(len(heads)))
        slices.append(AttentionSlice(node, heads[0], heads[-1] + 1, j, j1, None if whole else sub_map))
        j = j1
    return slices


def kv_bytes_per_token(config: LlamaConfig, dims: LocalDims, element_bytes: int = 4) -> int:
    """KV-cache bytes one token costs on this rank: 2 x layers x local KV heads x head_dim x element bytes."""
    return 2 * config.num_layers * dims.n_local_kv_heads * config.head_dim * element_bytes
