"""The Llama-family decoder as functions over weights (Llama 2/3, Mistral, Qwen2).

Nothing here knows about ranks: a rank calls the same functions with its slice of the weights
(`LocalDims`) and passes a `reduce` that all-reduces the two partial sums of each layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from models.checkpoint import Checkpoint, layer_prefix
from models.config import LlamaConfig
from models.quant import QuantWeight
from models.quant_kernels import linear
from models.rope import apply_rope_tables, rope_tables
from models.sharding import LocalDims

Reduce = Callable[[torch.Tensor], torch.Tensor]
Weight = torch.Tensor | QuantWeight  # a Linear weight [out, in]: plain, or quantized (models.quant)


def no_reduce(t: torch.Tensor) -> torch.Tensor:
    """The single-device reduce: partial sums are already whole."""
    return t


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

    def nbytes(self) -> int:
        return sum(t.nbytes for t in vars(self).values() if t is not None)  # tensors and QuantWeights alike


LINEAR_FIELDS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
_LAYER_FIELDS = {
    "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
    "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
    "bo": "self_attn.o_proj.bias", "b_gate": "mlp.gate_proj.bias", "b_up": "mlp.up_proj.bias",
    "b_down": "mlp.down_proj.bias",
}


def layer_tensor_names(layer: int) -> dict[str, str]:
    """LayerWeights field -> Hugging Face tensor name for one layer."""
    return {f: layer_prefix(layer) + suffix for f, suffix in _LAYER_FIELDS.items()}


def load_layer(ckpt: Checkpoint, layer: int, dims: LocalDims) -> LayerWeights:
    """Read one layer's slice for `dims` from a checkpoint (absent biases stay None)."""
    tensors = {}
    for field, name in layer_tensor_names(layer).items():
        read = ckpt.read_weight if field in LINEAR_FIELDS else ckpt.read
        tensors[field] = read(name, dims) if ckpt.has(name) else None
    return LayerWeights(**tensors)


class KVCache:
    """Per-request keys and values for the local KV heads of every layer.

    Allocated for `capacity` positions (a request's prompt + max tokens when known): the pages of
    positions not yet written stay virtual, so memory grows with the context, without copies.
    Beyond the capacity it grows by doubling.
    """

    def __init__(self, num_layers: int, n_kv_heads: int, head_dim: int, capacity: int = 64,
                 dtype: torch.dtype = torch.float32):
        self.length = 0
        self._shape = (1, n_kv_heads, capacity, head_dim)
        self._k = [torch.empty(self._shape, dtype=dtype) for _ in range(num_layers)]
        self._v = [torch.empty(self._shape, dtype=dtype) for _ in range(num_layers)]

    def nbytes(self) -> int:
        """Reserved bytes (capacity); pages of unfilled positions are only virtual memory."""
        return sum(t.numel() * t.element_size() for t in self._k + self._v)

    def used_bytes(self) -> int:
        """Bytes of the filled positions: 2 x layers x KV heads x head_dim x element size per token."""
        _, n_kv, _, head_dim = self._shape
        return 2 * len(self._k) * n_kv * head_dim * self._k[0].element_size() * self.length

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [1, kv_heads, S, head_dim] at positions length.. -> all keys/values so far."""
        start, seqlen = self.length, k.shape[2]
        if start + seqlen > self._k[layer].shape[2]:
            self._grow(layer, start + seqlen)
        self._k[layer][:, :, start:start + seqlen] = k
        self._v[layer][:, :, start:start + seqlen] = v
        end = start + seqlen
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]

    def _grow(self, layer: int, needed: int) -> None:
        capacity = max(needed, 2 * self._k[layer].shape[2])
        for store in (self._k, self._v):
            old = store[layer]
            new = torch.empty((*old.shape[:2], capacity, old.shape[3]), dtype=old.dtype)
            new[:, :, : self.length] = old[:, :, : self.length]
            store[layer] = new

    def advance(self, seqlen: int) -> None:
        """Called once per forward, after every layer appended `seqlen` positions."""
        self.length += seqlen

    def attend_for(self, config: LlamaConfig, dims: LocalDims, seqlen: int) -> CacheAttention:
        return CacheAttention(self, config, gather_map(dims), seqlen)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [B, S, D] -> same dtype; normalised in float32, then scaled in x's dtype (as transformers)."""
    dtype = x.dtype
    x = x.float()
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps)).to(dtype)


def attention_mask(q_pos: torch.Tensor, k_len: int, window: int | None) -> torch.Tensor | None:
    """Additive mask [S, T]: causal, and within `window` tokens when the layer slides. None if all visible."""
    if q_pos.numel() == 1 and (window is None or k_len <= window):
        return None
    k_pos = torch.arange(k_len)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    return mask.masked_fill_(~allowed, float("-inf"))


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_map: tuple[int, ...] | None,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """q: [B, H, S, hd], k, v: [B, KV, T, hd] -> [B, H, S, hd].

    Query heads of one KV head are folded into the sequence axis so K and V are never copied;
    `kv_map` (KV index of each query head) gathers KV heads for a rank holding part of a group.
    """
    bsz, n_heads, seqlen, head_dim = q.shape
    if kv_map is not None:
        index = torch.tensor(kv_map)
        k, v = k.index_select(1, index), v.index_select(1, index)
    n_kv = k.shape[1]
    group = n_heads // n_kv
    q = q.reshape(bsz, n_kv, group * seqlen, head_dim)  # [B, KV, G*S, hd]
    scores = torch.matmul(q, k.transpose(2, 3)) * head_dim**-0.5  # [B, KV, G*S, T]
    if mask is not None:
        scores = scores + mask.repeat(group, 1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)  # [B, KV, G*S, hd]
    return out.reshape(bsz, n_heads, seqlen, head_dim)


def gather_map(dims: LocalDims) -> tuple[int, ...] | None:
    """The kv_map `grouped_attention` needs for `dims`, or None when its groups are whole."""
    return None if dims.uniform_groups else dims.kv_map


# attend(layer, q, k, v): q [B, H, S, hd], new k, v [B, KV, S, hd] (after RoPE) -> [B, H, S, hd].
# Where the keys and values live is the attend's business: a local KVCache, or attention nodes.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CacheAttention:
    """The attend of one forward of `seqlen` new tokens over a local KVCache (causal, sliding windows).

    Call it once per layer in order; the caller advances the cache after the last layer.
    """

    def __init__(self, kv: KVCache, config: LlamaConfig, kv_map: tuple[int, ...] | None, seqlen: int):
        self.kv, self.config, self.kv_map = kv, config, kv_map
        self.positions = torch.arange(kv.length, kv.length + seqlen)  # [S]
        self.total = kv.length + seqlen
        self._masks: dict[int | None, torch.Tensor | None] = {}

    def _mask(self, layer: int) -> torch.Tensor | None:
        window = self.config.sliding_window(layer)
        if window not in self._masks:
            self._masks[window] = attention_mask(self.positions, self.total, window)
        return self._masks[window]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.kv.append(layer, k, v)  # [B, KV, T, hd]
        return grouped_attention(q, keys, values, self.kv_map, self._mask(layer))


def qkv(x: torch.Tensor, w: LayerWeights, dims: LocalDims,
        cos_sin: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [B, S, D] (normed) -> q [B, H, S, hd], k, v [B, KV, S, hd] for this rank's heads, RoPE applied."""
    bsz, seqlen, _ = x.shape
    head_dim = dims.head_dim
    q = linear(x, w.wq, w.bq).view(bsz, seqlen, dims.n_local_heads, head_dim).transpose(1, 2)
    k = linear(x, w.wk, w.bk).view(bsz, seqlen, dims.n_local_kv_heads, head_dim).transpose(1, 2)
    v = linear(x, w.wv, w.bv).view(bsz, seqlen, dims.n_local_kv_heads, head_dim).transpose(1, 2)
    cos, signed_sin = cos_sin  # from rope_tables, in the activation dtype
    return apply_rope_tables(q, cos, signed_sin), apply_rope_tables(k, cos, signed_sin), v


def attention(x: torch.Tensor, w: LayerWeights, dims: LocalDims, attend: Attend, layer: int,
              cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: [B, S, D] (normed) -> partial output projection [B, S, D] over this rank's heads."""
    bsz, seqlen, _ = x.shape
    q, k, v = qkv(x, w, dims, cos_sin)
    out = attend(layer, q, k, v)  # [B, H, S, hd]
    out = out.transpose(1, 2).reshape(bsz, seqlen, dims.n_local_heads * dims.head_dim)
    return linear(out, w.wo, w.bo)


def mlp(x: torch.Tensor, w: LayerWeights) -> torch.Tensor:
    """SwiGLU over this rank's columns: x: [B, S, D] -> partial [B, S, D]."""
    return linear(F.silu(linear(x, w.w_gate, w.b_gate)) * linear(x, w.w_up, w.b_up), w.w_down, w.b_down)


def decoder_layer(h: torch.Tensor, w: LayerWeights, config: LlamaConfig, dims: LocalDims,
                  attend: Attend, layer: int, cos_sin: tuple[torch.Tensor, torch.Tensor],
                  reduce: Reduce = no_reduce) -> torch.Tensor:
    """h: [B, S, D] -> [B, S, D]; `reduce` sums the partial outputs across ranks (twice per layer)."""
    x = rms_norm(h, w.attn_norm, config.rms_norm_eps)
    h = h + reduce(attention(x, w, dims, attend, layer, cos_sin))
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


class KVStore(Protocol):
    """Where a request's keys and values live: a local KVCache, or attention nodes (edge.offload)."""

    length: int

    def attend_for(self, config: LlamaConfig, dims: LocalDims, seqlen: int) -> Attend: ...

    def advance(self, seqlen: int) -> None: ...


def forward_layers(h: torch.Tensor, layers: Callable[[int], LayerWeights], config: LlamaConfig,
                   dims: LocalDims, kv: KVStore, rotary, reduce: Reduce = no_reduce) -> torch.Tensor:
    """h: [1, S, D] at positions kv.length.. -> [1, S, D] after every layer; advances the cache.

    `layers(i)` yields layer i's weights, so a caller may stream them from disk (weight window).
    """
    seqlen = h.shape[1]
    cos_sin = rope_tables(*rotary.cos_sin(torch.arange(kv.length, kv.length + seqlen)), h.dtype)
    attend = kv.attend_for(config, dims, seqlen)
    for layer in range(config.num_layers):
        h = decoder_layer(h, layers(layer), config, dims, attend, layer, cos_sin, reduce)
    kv.advance(seqlen)
    return h


def batch_attend(attends: list[Attend]) -> Attend:
    """An attend over a batch: row b attends with attends[b] (its own request's KV store)."""
    if len(attends) == 1:
        return attends[0]

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([a(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1]) for b, a in enumerate(attends)])

    return attend


def forward_batch(h: torch.Tensor, layers: Callable[[int], LayerWeights], config: LlamaConfig, dims: LocalDims,
                  kvs: list[KVStore], rotary, reduce: Reduce = no_reduce, attend: Attend | None = None) -> torch.Tensor:
    """h: [B, 1, D], one new token of each of B requests, each at its own position -> [B, 1, D].

    Decode is memory-bound: the batch reads every weight once, so B tokens cost about one. Rows
    attend over their own KV stores (`attend`, default: each store's own); every store advances.
    """
    if h.shape[1] != 1 or h.shape[0] != len(kvs):
        raise ValueError(f"a decode batch is [B, 1, D] with one KV store per row, got {list(h.shape)} "
                         f"for {len(kvs)} stores")
    rows = [rotary.cos_sin(torch.tensor([kv.length])) for kv in kvs]  # per row: dynamic rope sees its own length
    cos_sin = rope_tables(torch.stack([c for c, _ in rows])[:, None], torch.stack([s for _, s in rows])[:, None],
                          h.dtype)  # [B, 1, 1, hd]
    attend = attend or batch_attend([kv.attend_for(config, dims, 1) for kv in kvs])
    for layer in range(config.num_layers):
        h = decoder_layer(h, layers(layer), config, dims, attend, layer, cos_sin, reduce)
    for kv in kvs:
        kv.advance(1)
    return h
