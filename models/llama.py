"""The Llama-family decoder as functions over weights (Llama 2/3, Mistral, Qwen2, Qwen3).

Nothing here knows about ranks: a rank calls the same functions with its slice of the weights
(`LocalDims`) and passes a `reduce` that all-reduces the two partial sums of each layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from models.attention import Attend, BatchAttend, KVStore
from models.checkpoint import Checkpoint, layer_prefix
from models.config import LlamaConfig
from models.decode_kernels import rms_norm_rows, rope_heads, silu_mul_rows, small_float32
from models.decode_step import decode_layers, no_reduce, serves
from models.errors import CheckpointError
from models.quant import QuantWeight
from models.quant_kernels import linear
from models.rope import apply_rope_tables
from models.sharding import LocalDims, PlanError, SplitKind, Unit, split_for
from models.threads import step_threads

Reduce = Callable[[torch.Tensor], torch.Tensor]
Weight = torch.Tensor | QuantWeight  # a Linear weight [out, in]: plain, or quantized (models.quant)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights (or one rank's slice); optional biases are None when absent."""

    attn_norm: torch.Tensor  # [D]
    wq: Weight  # [local_heads * head_dim, D]
    wk: Weight  # [local_kv_heads * head_dim, D]
    wv: Weight  # [local_kv_heads * head_dim, D]
    wo: Weight  # [D, local_heads * head_dim]
    mlp_norm: torch.Tensor  # [D]
    w_gate: Weight  # [local_intermediate, D]
    w_up: Weight  # [local_intermediate, D]
    w_down: Weight  # [D, local_intermediate]
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [hd]: Qwen3's RMSNorm of each head's q before RoPE, every rank whole
    k_norm: torch.Tensor | None = None  # [hd]: the same for k
    # Where the parts fuse (models.fusion.fuse_layer): wq, wk, wv back to back ([(H + 2 KV) hd, D],
    # the three are views of it), w_gate and w_up likewise; None otherwise. Never stored or counted.
    wqkv: Weight | None = None
    bqkv: torch.Tensor | None = None
    w_gate_up: Weight | None = None
    b_gate_up: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes held (a fused weight's parts are views of it: counted once, as the parts)."""
        held = (getattr(self, f.name) for f in fields(self) if f.name not in FUSED_FIELDS)
        return sum(t.nbytes for t in held if t is not None)

    @cached_property
    def norm_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """attn_norm and mlp_norm as numpy views, made once per layer object for the decode step's
        array path (models.decode_step): torch's .numpy() right after a GEMV's weight stream cost tens
        of microseconds a call (see models.attention.KVCache.arrays)."""
        return self.attn_norm.float().numpy(), self.mlp_norm.float().numpy()  # 16-bit norms widened

    @cached_property
    def head_norm_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """q_norm and k_norm as numpy views (made once, as `norm_arrays`); None for a model without."""
        return None if self.q_norm is None else (self.q_norm.float().numpy(), self.k_norm.float().numpy())


FUSED_FIELDS = ("wqkv", "bqkv", "w_gate_up", "b_gate_up")


LINEAR_FIELDS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
_LAYER_FIELDS = {
    "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
    "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
    "bo": "self_attn.o_proj.bias", "b_gate": "mlp.gate_proj.bias", "b_up": "mlp.up_proj.bias",
    "b_down": "mlp.down_proj.bias", "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
}
_QK_NORMS = ("q_norm", "k_norm")


def layer_tensor_names(layer: int) -> dict[str, str]:
    """LayerWeights field -> Hugging Face tensor name for one layer."""
    return {f: layer_prefix(layer) + suffix for f, suffix in _LAYER_FIELDS.items()}


_HEAD_FIELDS = {"norm": "model.norm.weight", "lm_head": "lm_head.weight"}  # a rank's head file (HeadWeights)


def field_split(field: str) -> tuple[SplitKind, Unit]:
    """How a field of a layer's or the head's shard file (LayerWeights, HeadWeights) is cut over ranks."""
    suffix = _LAYER_FIELDS.get(field) or _HEAD_FIELDS.get(field)
    if suffix is None:
        raise PlanError(f"no sharding rule for shard field {field!r}")
    return split_for(suffix)


def load_layer(ckpt: Checkpoint, layer: int, dims: LocalDims) -> LayerWeights:
    """Read one layer's slice for `dims` from a checkpoint (absent biases stay None)."""
    tensors = {}
    for field, name in layer_tensor_names(layer).items():
        read = ckpt.read_weight if field in LINEAR_FIELDS else ckpt.read
        tensors[field] = read(name, dims) if ckpt.has(name) else None
        if field in _QK_NORMS and ckpt.config.qk_norm and tensors[field] is None:
            raise CheckpointError(f"{name} is missing: a {ckpt.config.architecture} checkpoint has q and k norms")
    return LayerWeights(**tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [B, S, D] -> same dtype; normalised in float32, then scaled in x's dtype (as transformers)."""
    if small_float32(x) and weight.dtype == torch.float32:  # a decode step: one compiled call
        return rms_norm_rows(x, weight, eps)
    dtype = x.dtype
    x = x.float()
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps)).to(dtype)


def head_norm(t: torch.Tensor, weight: torch.Tensor | None, eps: float, step: bool) -> torch.Tensor:
    """t: [B, S, heads, hd] -> each head's vector RMS-normed with `weight` [hd] (Qwen3's q_norm and
    k_norm); t itself when the model has none. In a decode step (`step`: the layer's x is
    `small_float32`) the compiled RMSNorm, which models.decode_step calls on the same values."""
    if weight is None:
        return t
    if step and weight.dtype == torch.float32:
        return rms_norm_rows(t, weight, eps)
    return rms_norm(t, weight, eps)


def qkv(x: torch.Tensor, w: LayerWeights, dims: LocalDims, cos_sin: tuple[torch.Tensor, torch.Tensor],
        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [B, S, D] (normed) -> q [B, H, S, hd], k, v [B, KV, S, hd] for this rank's heads, RoPE applied
    (after the heads' q and k norms, with `eps`, where the model has them)."""
    bsz, seqlen, _ = x.shape
    head_dim, step = dims.head_dim, small_float32(x)
    q = head_norm(linear(x, w.wq, w.bq).view(bsz, seqlen, dims.n_local_heads, head_dim), w.q_norm, eps, step)
    k = head_norm(linear(x, w.wk, w.bk).view(bsz, seqlen, dims.n_local_kv_heads, head_dim), w.k_norm, eps, step)
    v = linear(x, w.wv, w.bv).view(bsz, seqlen, dims.n_local_kv_heads, head_dim).transpose(1, 2)
    cos, signed_sin = cos_sin  # from rope_tables, in the activation dtype
    if step:  # a decode step: one compiled call per tensor
        return rope_heads(q, cos, signed_sin).transpose(1, 2), rope_heads(k, cos, signed_sin).transpose(1, 2), v
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    return apply_rope_tables(q, cos, signed_sin), apply_rope_tables(k, cos, signed_sin), v


def attention(x: torch.Tensor, w: LayerWeights, dims: LocalDims, attend: Attend, layer: int,
              cos_sin: tuple[torch.Tensor, torch.Tensor], eps: float) -> torch.Tensor:
    """x: [B, S, D] (normed) -> partial output projection [B, S, D] over this rank's heads."""
    bsz, seqlen, _ = x.shape
    q, k, v = qkv(x, w, dims, cos_sin, eps)
    out = attend(layer, q, k, v)  # [B, H, S, hd]
    out = out.transpose(1, 2).reshape(bsz, seqlen, dims.n_local_heads * dims.head_dim)
    return linear(out, w.wo, w.bo)


def mlp(x: torch.Tensor, w: LayerWeights) -> torch.Tensor:
    """SwiGLU over this rank's columns: x: [B, S, D] -> partial [B, S, D]."""
    gate, up = linear(x, w.w_gate, w.b_gate), linear(x, w.w_up, w.b_up)
    act = silu_mul_rows(gate, up) if small_float32(gate) else F.silu(gate) * up  # a decode step: one call
    return linear(act, w.w_down, w.b_down)


def decoder_layer(h: torch.Tensor, w: LayerWeights, config: LlamaConfig, dims: LocalDims,
                  attend: Attend, layer: int, cos_sin: tuple[torch.Tensor, torch.Tensor],
                  reduce: Reduce = no_reduce) -> torch.Tensor:
    """h: [B, S, D] -> [B, S, D]; `reduce` sums the partial outputs across ranks (twice per layer)."""
    x = rms_norm(h, w.attn_norm, config.rms_norm_eps)
    h = h + reduce(attention(x, w, dims, attend, layer, cos_sin, config.rms_norm_eps))
    x = rms_norm(h, w.mlp_norm, config.rms_norm_eps)
    return h + reduce(mlp(x, w))


@dataclass(frozen=True)
class HeadWeights:
    """The weights outside the layers: embeddings, final norm, LM head (tied or not)."""

    embed: torch.Tensor  # [V, D]
    norm: torch.Tensor  # [D]
    lm_head: Weight  # [V, D], the same storage as `embed` when tied (and not quantized)


def load_head(ckpt: Checkpoint) -> HeadWeights:
    embed = ckpt.read("model.embed_tokens.weight")
    name = "model.embed_tokens.weight" if ckpt.config.tie_word_embeddings else "lm_head.weight"
    head = embed if ckpt.config.tie_word_embeddings and not ckpt.quantizes(name) else ckpt.read_weight(name)
    return HeadWeights(embed=embed, norm=ckpt.read("model.norm.weight"), lm_head=head)


def load_output_head(ckpt: Checkpoint, dims: LocalDims) -> HeadWeights:
    """Final norm and this rank's vocabulary rows of the LM head (no embedding table)."""
    name = "model.embed_tokens.weight" if ckpt.config.tie_word_embeddings else "lm_head.weight"
    empty = torch.empty(0)
    return HeadWeights(embed=empty, norm=ckpt.read("model.norm.weight"), lm_head=ckpt.read_weight(name, dims))


def embed(tokens: torch.Tensor, head: HeadWeights) -> torch.Tensor:
    """tokens: [B, S] int64 -> hidden [B, S, D]."""
    return F.embedding(tokens, head.embed)


def logits(h: torch.Tensor, head: HeadWeights, eps: float) -> torch.Tensor:
    """h: [B, S, D] -> logits [B, S, V] (or this rank's vocabulary slice of them) in float32."""
    return linear(rms_norm(h, head.norm, eps), head.lm_head).float()


def forward_layers(h: torch.Tensor, layers: Callable[[int], LayerWeights], config: LlamaConfig,
                   dims: LocalDims, kv: KVStore, rotary, reduce: Reduce = no_reduce) -> torch.Tensor:
    """h: [1, S, D] at positions kv.length.. -> [1, S, D] after every layer; advances the cache.

    `layers(i)` yields layer i's weights, so a caller may stream them from disk (weight window).
    """
    seqlen = h.shape[1]
    cos_sin = rotary.tables(kv.length, seqlen, h.dtype)  # [S, hd] each
    attend = kv.attend_for(config, dims, seqlen)
    with step_threads(seqlen):
        h = run_layers(h, layers, config, dims, attend, cos_sin, reduce)
    kv.advance(seqlen)
    return h


def run_layers(h: torch.Tensor, layers: Callable[[int], LayerWeights], config: LlamaConfig, dims: LocalDims,
               attend: Attend, cos_sin: tuple[torch.Tensor, torch.Tensor], reduce: Reduce) -> torch.Tensor:
    """h: [B, S, D] -> [B, S, D] through every layer: a decode step's few rows on arrays
    (models.decode_step: the same ops without torch's dispatch, bit for bit), anything else op by op."""
    if serves(h, attend):
        return decode_layers(h, layers, config, dims, attend, cos_sin, reduce)
    for layer in range(config.num_layers):
        h = decoder_layer(h, layers(layer), config, dims, attend, layer, cos_sin, reduce)
    return h


def batch_attend(attends: list[Attend]) -> Attend:
    """An attend over a batch: row b attends with attends[b] (its own request's KV store)."""
    return attends[0] if len(attends) == 1 else BatchAttend(attends)


def forward_batch(h: torch.Tensor, layers: Callable[[int], LayerWeights], config: LlamaConfig, dims: LocalDims,
                  kvs: list[KVStore], rotary, reduce: Reduce = no_reduce, attend: Attend | None = None) -> torch.Tensor:
    """h: [B, S, D], S new tokens of each of B requests, each row at its own positions -> [B, S, D].

    Decode is memory-bound: the batch reads every weight once, so B tokens cost about one (and S > 1
    verifies drafted tokens). Rows attend over their own KV stores (`attend`, default: each store's
    own); every store advances by S.
    """
    seqlen = h.shape[1]
    if h.shape[0] != len(kvs):
        raise ValueError(f"a batch has one KV store per row, got {list(h.shape)} for {len(kvs)} stores")
    # per row: its own positions (dynamic rope sees its own length)
    rows = [rotary.tables(kv.length, seqlen, h.dtype) for kv in kvs]  # [S, hd] each
    cos_sin = (torch.stack([c for c, _ in rows])[:, None], torch.stack([s for _, s in rows])[:, None])  # [B, 1, S, hd]
    attend = attend or batch_attend([kv.attend_for(config, dims, seqlen) for kv in kvs])
    with step_threads(h.shape[0] * seqlen):
        h = run_layers(h, layers, config, dims, attend, cos_sin, reduce)
    for kv in kvs:
        kv.advance(seqlen)
    return h
