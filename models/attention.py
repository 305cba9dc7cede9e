"""Attention over a request's keys and values: the local KV cache, causal and sliding-window
masks, grouped-query attention, and the `Attend` seam through which a layer reaches its KV
wherever it lives (here, or on attention nodes: edge.offload)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from models.config import LlamaConfig
from models.decode_kernels import attend_cached, kernel_applies
from models.quant import kernel_array
from models.sharding import LocalDims
from models.step_attention import rope_attend_rows


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
        self.dtype = dtype
        self._k = [torch.empty(self._shape, dtype=dtype) for _ in range(num_layers)]
        self._v = [torch.empty(self._shape, dtype=dtype) for _ in range(num_layers)]
        self._arrays: list[tuple[np.ndarray, np.ndarray] | None] = [None] * num_layers  # see `arrays`

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
        self.reserve(layer, seqlen)
        self._k[layer][:, :, start:start + seqlen] = k
        self._v[layer][:, :, start:start + seqlen] = v
        end = start + seqlen
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]

    def reserve(self, layer: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Room for `seqlen` positions from `length` on -> the layer's whole key and value buffers,
        [1, KV, capacity, hd] (contiguous; positions from `length` on hold no data yet)."""
        if self.length + seqlen > self._k[layer].shape[2]:
            self._grow(layer, self.length + seqlen)
        return self._k[layer], self._v[layer]

    def arrays(self, layer: int, seqlen: int) -> tuple[np.ndarray, np.ndarray]:
        """`reserve` as numpy views, [KV, capacity, hd] each (a 16-bit cache's as its uint16 bits,
        models.quant.kernel_array), made once per buffer.
        Why: a decode step asks for them in every layer, right after a weight GEMV has streamed
        megabytes through the caches, and torch's .numpy() then cost tens of microseconds a call
        (with the norms' views, models.llama.LayerWeights.norm_arrays: SmolLM2's rank of 2 went
        from 5.15 to 4.47 ms per token, in-process A/B on one thread)."""
        self.reserve(layer, seqlen)
        if self._arrays[layer] is None:
            self._arrays[layer] = (kernel_array(self._k[layer][0]), kernel_array(self._v[layer][0]))
        return self._arrays[layer]

    def _grow(self, layer: int, needed: int) -> None:
        capacity = max(needed, 2 * self._k[layer].shape[2])
        for store in (self._k, self._v):
            old = store[layer]
            new = torch.empty((*old.shape[:2], capacity, old.shape[3]), dtype=old.dtype)
            new[:, :, : self.length] = old[:, :, : self.length]
            store[layer] = new
        self._arrays[layer] = None

    def advance(self, seqlen: int) -> None:
        """Called once per forward, after every layer appended `seqlen` positions."""
        self.length += seqlen

    def rewind(self, length: int) -> None:
        """Forget the positions from `length` on (drafted tokens the model rejected); the next
        forward writes over them. Raises ValueError for a position this cache never held."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a KV cache of {self.length} positions to {length}")
        self.length = length

    def attend_for(self, config: LlamaConfig, dims: LocalDims, seqlen: int) -> CacheAttention:
        return CacheAttention(self, config, gather_map(dims), seqlen)


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
    """q: [B, H, S, hd], k, v: [B, KV, T, hd] -> [B, H, S, hd]; `mask` additive [S, T] (attention_mask).

    torch's scaled_dot_product_attention, as transformers' default ("sdpa") attention computes it:
    on CPU a fused kernel that never holds the [S, T] scores of every head. The eager form it
    replaced (two batched matmuls, the mask added, a float32 softmax) took 1.3 s of a 2.5 s prefill
    of 1000 tokens of SmolLM2-135M on 2 threads, against transformers' 1.0 s for the whole prefill.
    Query heads of one KV head share it (GQA) without copying K and V where torch supports that
    (2.5 and later); `kv_map` (KV index of each query head) gathers KV heads for a rank holding
    part of a group.
    """
    n_heads = q.shape[1]
    if kv_map is not None:
        index = torch.tensor(kv_map)
        k, v = k.index_select(1, index), v.index_select(1, index)
    group = n_heads // k.shape[1]
    if group > 1 and not _SDPA_GQA:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    extra = {"enable_gqa": True} if group > 1 and _SDPA_GQA else {}
    attn_mask = mask.to(q.dtype) if mask is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **extra)


_SDPA_GQA = torch.__version__ >= "2.5"  # scaled_dot_product_attention(enable_gqa=...)


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
        self._head_map: np.ndarray | None = None  # KV head of each query head, for the kernel

    def _mask(self, layer: int) -> torch.Tensor | None:
        window = self.config.sliding_window(layer)
        if window not in self._masks:
            self._masks[window] = attention_mask(self.positions, self.total, window)
        return self._masks[window]

    def _heads(self, n_heads: int, n_kv: int) -> np.ndarray:
        if self._head_map is None:
            group = n_heads // n_kv
            self._head_map = np.array(self.kv_map or [h // group for h in range(n_heads)], dtype=np.int64)
        return self._head_map

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if kernel_applies(q, self.kv.dtype):  # a decode step: one compiled call instead of ten torch ops
            keys, values = self.kv.arrays(layer, q.shape[2])
            return attend_cached(q, k, v, keys, values, self._heads(q.shape[1], k.shape[1]), self.kv.length,
                                 self.config.sliding_window(layer))
        keys, values = self.kv.append(layer, k, v)  # [B, KV, T, hd]
        return grouped_attention(q, keys, values, self.kv_map, self._mask(layer))

    def attend_rows(self, layer: int, y: np.ndarray, kv_width: int, cos: np.ndarray, signed_sin: np.ndarray,
                    out: np.ndarray) -> None:
        """The decode step's call (models.decode_step), from the fused projections: y [S, (H + 2 KV) hd]
        (q, k, v before RoPE), cos, signed_sin [S, hd] -> out [S, H x hd]; the rotated k and v go
        into the cache (rounded to a 16-bit cache's dtype). float32, C-contiguous
        (models.step_attention.rope_attend_rows)."""
        keys, values = self.kv.arrays(layer, y.shape[0])
        head_dim = keys.shape[2]
        heads = self._heads((y.shape[1] - 2 * kv_width) // head_dim, kv_width // head_dim)
        rope_attend_rows(y, kv_width, cos, signed_sin, keys, values, heads, self.kv.length,
                         self.config.sliding_window(layer), out, self.kv.dtype == torch.bfloat16)


class BatchAttend:
    """An attend over a batch: row b attends with `rows[b]` (its own request's KV store)."""

    def __init__(self, rows: list[Attend]):
        self.rows = rows

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([a(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1]) for b, a in enumerate(self.rows)])


class KVStore(Protocol):
    """Where a request's keys and values live: a local KVCache, or attention nodes (edge.offload)."""

    length: int

    def attend_for(self, config: LlamaConfig, dims: LocalDims, seqlen: int) -> Attend: ...

    def advance(self, seqlen: int) -> None: ...

    def rewind(self, length: int) -> None: ...
