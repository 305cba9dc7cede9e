"""Reference checkpoints made by Hugging Face transformers, and its greedy output (test oracle only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from models.factory import EOS_ID, IM_END_ID, write_tokenizer

VOCAB = 384
_ROPES = {
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}
KINDS = {
    # Llama with GQA (6 heads / 2 KV heads), odd MLP width, llama3 rope.
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(hidden_size=96, intermediate_size=520, num_hidden_layers=3, num_attention_heads=6,
                   num_key_value_heads=2, rope="llama3")),
    # Qwen2: q/k/v biases, tied embeddings, index-sharded safetensors.
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(hidden_size=64, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True, rope="default")),
    # Qwen3: q and k RMS-normed per head before RoPE, head_dim apart from hidden / heads, tied embeddings.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=24, tie_word_embeddings=True, rope="default")),
    # Mistral with a sliding window shorter than the generated sequence.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, sliding_window=12, rope="default")),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (biases and norms too), scaled so greedy tokens are not near-ties."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if "norm" in name else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)


def to_legacy_rope_form(folder: Path) -> None:
    """Rewrite config.json from `rope_parameters` into `rope_theta` + `rope_scaling` (transformers 4.x)."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    params = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    raw["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **params}
    path.write_text(json.dumps(raw, indent=2))


def make_hf_checkpoint(folder: Path, kind: str, seed: int = 0, rope: str | None = None,
                       legacy_form: bool = False, dtype: torch.dtype | None = None, **overrides) -> Path:
    """Save a random `kind` model with transformers (plus our tokenizer files) into `folder`,
    in `dtype` when given (as bf16/fp16 checkpoints ship)."""
    config_cls, model_cls, sizes = KINDS[kind]
    sizes = {"max_position_embeddings": 128} | dict(sizes) | overrides
    rope_name = rope or sizes.pop("rope")
    sizes.pop("rope", None)
    config = config_cls(vocab_size=VOCAB, rms_norm_eps=1e-5, rope_parameters=dict(_ROPES[rope_name]),
                        eos_token_id=[EOS_ID, IM_END_ID], bos_token_id=0, **sizes)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _randomise(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    shard = "40KB" if kind == "qwen2" else "1GB"
    model.save_pretrained(folder, max_shard_size=shard)
    write_tokenizer(folder, VOCAB)
    if legacy_form:
        to_legacy_rope_form(folder)
    return folder


def hf_greedy(folder: Path, prompt_ids: list[int], max_new_tokens: int, dtype: torch.dtype = torch.float32,
              attn: str | None = None) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and the natural-log softmax of its logits at each step, computing
    in `dtype` (with the `attn` attention implementation, e.g. "eager")."""
    extra = {"attn_implementation": attn} if attn else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=None)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def hf_prompt_logprobs(folder: Path, prompt_ids: list[int], k: int) -> tuple[list[float], list[list[float]]]:
    """transformers' log-probability of each prompt token after the first, and the top-k logprobs there."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0].float(), dim=-1)  # [S, V]
    targets = torch.tensor(prompt_ids[1:])
    chosen = logprobs[:-1].gather(1, targets[:, None])[:, 0]
    return chosen.tolist(), logprobs[:-1].topk(k, dim=-1).values.tolist()


def hf_forced_logprobs(folder: Path, prompt_ids: list[int], tokens: list[int],
                       dtype: torch.dtype = torch.float32) -> list[float]:
    """transformers' logprob of each of `tokens` given the prompt and the tokens before it (one forward)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1:-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
