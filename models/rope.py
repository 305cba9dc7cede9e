"""Rotary position embeddings in the Hugging Face "rotate-half" layout, all rope types of real checkpoints."""

from __future__ import annotations

import math

import torch

from models.config import LlamaConfig, RopeConfig


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    # int64 arange then float, exactly as transformers does, so frequencies match bit for bit.
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _linear(rope: RopeConfig, dim: int, max_pos: int, seq_len: int) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(rope.theta, dim) / float(rope.factor or 1.0), 1.0


def _dynamic(rope: RopeConfig, dim: int, max_pos: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """Dynamic NTK: the base grows once the sequence outgrows max_position_embeddings."""
    factor = float(rope.factor or 1.0)
    if seq_len <= max_pos:
        return _base_inv_freq(rope.theta, dim), 1.0
    base = rope.theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim), 1.0


def _llama3(rope: RopeConfig, dim: int, max_pos: int, seq_len: int) -> tuple[torch.Tensor, float]:
    inv_freq = _base_inv_freq(rope.theta, dim)
    factor = float(rope.factor or 8.0)
    low, high = float(rope.low_freq_factor or 1.0), float(rope.high_freq_factor or 4.0)
    old_context = float(rope.original_max_position_embeddings or max_pos)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig, dim: int, max_pos: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, scale attention logits."""
    original = int(rope.original_max_position_embeddings or max_pos)
    factor = float(rope.factor) if rope.factor is not None else max_pos / original
    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attention)


_INV_FREQ = {"default": _linear, "linear": _linear, "dynamic": _dynamic,
             "llama3": _llama3, "yarn": _yarn}


def inv_freq_for(config: LlamaConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale for a sequence of `seq_len` tokens."""
    rope = config.rope
    return _INV_FREQ[rope.rope_type](rope, config.head_dim, config.max_position_embeddings, seq_len)


class RotaryTable:
    """Caches inverse frequencies (only dynamic NTK depends on the sequence length) and, for static
    frequencies, a step's rope tables (`tables`)."""

    BLOCK = 256  # positions per cached block of tables

    def __init__(self, config: LlamaConfig):
        self.config = config
        self._static = None if config.rope.rope_type == "dynamic" else inv_freq_for(config, 0)
        self._blocks: dict[tuple[torch.dtype, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [S] int64 -> cos, sin: [S, head_dim] float32."""
        if self._static is not None:
            inv_freq, scale = self._static
        else:
            inv_freq, scale = inv_freq_for(self.config, int(positions.max()) + 1)
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [S, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, head_dim]
        return emb.cos() * scale, emb.sin() * scale

    def tables(self, start: int, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`rope_tables` for positions start..start+count-1: cos, signed sin [count, head_dim].

        Why: building them took ~45 us of torch calls per forward (a decode step's were 8 ops on 64
        numbers), on every rank, every token. Static frequencies are cached in fixed blocks of BLOCK
        positions, each computed by `cos_sin` whole, so a position's values never depend on which
        requests came before (and cos/sin are elementwise: a block holds the bits a one-position
        call gives, tests/test_rope.py); dynamic NTK's depend on the length and are built each time.
        """
        if self._static is None:
            return rope_tables(*self.cos_sin(torch.arange(start, start + count)), dtype)
        first, last = start // self.BLOCK, (start + count - 1) // self.BLOCK
        parts = [self._block(b, dtype) for b in range(first, last + 1)]
        cos, sin = parts[0] if len(parts) == 1 else (torch.cat([p[i] for p in parts]) for i in (0, 1))
        offset = start - first * self.BLOCK
        return cos[offset:offset + count], sin[offset:offset + count]

    def _block(self, index: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, index)
        if key not in self._blocks:
            positions = torch.arange(index * self.BLOCK, (index + 1) * self.BLOCK)
            self._blocks[key] = rope_tables(*self.cos_sin(positions), dtype)
        return self._blocks[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, head_dim]; cos, sin: [S, head_dim] float32 -> rotated x, same shape and dtype:
    x * cos + rotate_half(x) * sin, with cos and sin rounded to x's dtype first (as transformers does
    for bf16/fp16). The forward builds the tables once per step instead (`rope_tables`)."""
    return apply_rope_tables(x, *rope_tables(cos, sin, x.dtype))


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and a signed sin in the activation dtype, once per forward, for `apply_rope_tables`:
    signed_sin = cat(-sin_first_half, sin_second_half), so rotate_half becomes one roll."""
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.to(dtype), signed.to(dtype)


def apply_rope_tables(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in 4 ops instead of 9, bit for bit: cat(-x2, x1) * sin == roll(x) * signed_sin
    element by element (negating either factor is exact); x: [B, H, S, hd], tables from `rope_tables`."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
