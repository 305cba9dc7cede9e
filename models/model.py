"""A whole model on one device: the reference path and the building block of rank 0's tools."""

from __future__ import annotations

from pathlib import Path

import torch

from models.attention import KVCache
from models.checkpoint import Checkpoint
from models.dtypes import resolve_dtype
from models.fusion import fuse_layer
from models.kernel_warmup import held_weights, warm_formats
from models.llama import embed, forward_layers, load_head, load_layer, logits
from models.quant import check_quantizable
from models.rope import RotaryTable
from models.sharding import full_dims
from models.threads import in_passing_thread
from models.tokenizer import Tokenizer, load_tokenizer


class LocalModel:
    """All layers resident in this process; `forward` maps new tokens + cache to next-token logits."""

    def __init__(self, folder: Path | str, dtype: str | None = "auto", quantize: str | None = "auto"):
        ckpt = Checkpoint(folder)
        self.dtype = resolve_dtype(dtype, ckpt.config.torch_dtype)
        ckpt = ckpt.with_dtype(self.dtype).with_quant(quantize)
        check_quantizable(ckpt.config, ckpt.quant)
        self.folder = Path(folder)
        self.config = ckpt.config
        self.tokenizer: Tokenizer = load_tokenizer(self.folder, self.config)
        self.dims = full_dims(self.config)
        # Loading is parallel torch work: on a thread that ends with it (models.threads.in_passing_thread)
        self.head, self.layers = in_passing_thread(self._load, ckpt)
        warm_formats(held_weights(self.layers, self.head))  # not in the first request
        self.rotary = RotaryTable(self.config)
        ckpt.close()

    def _load(self, ckpt: Checkpoint) -> tuple:
        return load_head(ckpt), [fuse_layer(load_layer(ckpt, i, self.dims)) for i in range(self.config.num_layers)]

    def new_cache(self, capacity: int = 64) -> KVCache:
        """A request's KV cache reserved for `capacity` positions (pages fill as it grows)."""
        capacity = max(1, min(capacity, self.config.max_position_embeddings))
        return KVCache(self.config.num_layers, self.config.num_kv_heads, self.config.head_dim, capacity,
                       self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: list[int], kv: KVCache, all_logits: bool = False) -> torch.Tensor:
        """tokens: S new ids -> logits [V] of the last position ([S, V] with all_logits)."""
        h = embed(torch.tensor([tokens], dtype=torch.long), self.head)  # [1, S, D]
        h = forward_layers(h, self.layers.__getitem__, self.config, self.dims, kv, self.rotary)
        out = logits(h if all_logits else h[:, -1:], self.head, self.config.rms_norm_eps)[0]
        return out if all_logits else out[-1]  # [S, V] or [V]
