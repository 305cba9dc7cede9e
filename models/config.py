"""Frozen model configuration read from a Hugging Face `config.json`, plus presets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from models.errors import CheckpointError

# Architectures whose math is the Llama decoder (RMSNorm, RoPE, GQA, SwiGLU); Qwen3 adds an RMSNorm
# of each head's q and k (over head_dim, before RoPE).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ROPE_TYPES = {"default", "linear", "dynamic", "llama3", "yarn"}


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters normalised from either config form (`rope_scaling` or `rope_parameters`)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class LlamaConfig:
    """Everything the decoder math needs; immutable, per-rank sizes live in `sharding.LocalDims`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm of every head's q and k before RoPE (Qwen3: q_norm, k_norm [hd])
    # One entry per layer: None for full attention, else the window in tokens.
    sliding_windows: tuple[int | None, ...] = field(default=())
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @property
    def kv_group_size(self) -> int:
        """Query heads per KV head (G in GQA)."""
        return self.num_heads // self.num_kv_heads

    def sliding_window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None



def _as_int_list(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_from_hf(raw: dict[str, Any]) -> RopeConfig:
    """Accept `rope_theta` + `rope_scaling` (transformers 4.x) and `rope_parameters` (5.x)."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError("config.json: per-layer-type rope_parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"config.json: rope type {rope_type!r} is not supported (supported: {sorted(ROPE_TYPES)})"
        )
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError("config.json: partial_rotary_factor != 1 is not supported")
    original = params.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn") and original is None:
        original = raw.get("original_max_position_embeddings", raw.get("max_position_embeddings"))
    opt = {k: params.get(k) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                      "attention_factor", "beta_fast", "beta_slow",
                                      "mscale", "mscale_all_dim")}
    return RopeConfig(rope_type=rope_type, theta=float(theta),
                      original_max_position_embeddings=original,
                      truncate=bool(params.get("truncate", True)), **opt)


def _sliding_windows(raw: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer attention window, following each architecture's own convention."""
    window = raw.get("sliding_window")
    if arch in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window", False):
            window = None
        layer_types = raw.get("layer_types")
        if layer_types is None:
            first = raw.get("max_window_layers", num_layers)
            layer_types = ["sliding_attention" if window is not None and i >= first
                           else "full_attention" for i in range(num_layers)]
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if arch == "mistral" and window is not None:
        return tuple(int(window) for _ in range(num_layers))
    return tuple(None for _ in range(num_layers))


def _require(raw: dict[str, Any], key: str) -> Any:
    if key not in raw:
        raise CheckpointError(f"config.json: required field {key!r} is missing")
    return raw[key]


def config_from_hf(raw: dict[str, Any]) -> LlamaConfig:
    """Build a LlamaConfig from the parsed `config.json`; raises CheckpointError (caller reports)."""
    archs = raw.get("architectures") or []
    known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if not known:
        raise CheckpointError(
            f"config.json: architecture {archs or raw.get('model_type')!r} is not supported "
            f"(supported: {sorted(SUPPORTED_ARCHITECTURES)})"
        )
    arch = SUPPORTED_ARCHITECTURES[known[0]]
    hidden = int(_require(raw, "hidden_size"))
    heads = int(_require(raw, "num_attention_heads"))
    layers = int(_require(raw, "num_hidden_layers"))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise CheckpointError(
            f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    attention_bias = bool(raw.get("attention_bias", False))
    return LlamaConfig(
        architecture=arch,
        vocab_size=int(_require(raw, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        rope=_rope_from_hf(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or attention_bias,
        o_bias=arch != "qwen2" and attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=arch == "qwen3",
        sliding_windows=_sliding_windows(raw, arch, layers),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_as_int_list(raw.get("eos_token_id")),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
    )


def load_config(folder: Path) -> LlamaConfig:
    """Read `config.json` (and eos ids from `generation_config.json`) from a checkpoint folder."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json is missing; is this a Hugging Face checkpoint?")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    config = config_from_hf(raw)
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = json.loads(gen_path.read_text())
        eos = _as_int_list(gen.get("eos_token_id"))
        if eos:
            config = replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + eos)))
    return config


# make-model presets: sizes in the Hugging Face config.json vocabulary.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 max_position_embeddings=512),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=2048,
                  max_position_embeddings=2048),
    # ~330 MB fp32: memory and speed benchmarks that still run in seconds.
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=4, vocab_size=8192,
                   max_position_embeddings=4096),
    # ~2.3 GB fp32: the decode benchmark model of the project targets.
    "large": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=8192,
                  max_position_embeddings=4096),
}
