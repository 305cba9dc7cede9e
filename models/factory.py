"""`make-model`: a random-initialised Llama checkpoint in exact Hugging Face layout, with a real tokenizer."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from models.checkpoint import expected_tensors
from models.config import PRESETS, config_from_hf
from models.dtypes import DTYPES

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(4)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Text that ships with every Python: the tokenizer is trained on it, so no download is needed.
_CORPUS_MODULES = ["textwrap.py", "string.py", "difflib.py", "argparse.py", "json/decoder.py",
                   "json/encoder.py", "random.py", "calendar.py", "tokenize.py", "this.py"]


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text(encoding="utf-8") for name in _CORPUS_MODULES
            if (stdlib / name).is_file()]


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE (as Llama 3 and Qwen2 use) whose first ids are the special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS[BOS_ID]} $A", pair=f"{SPECIAL_TOKENS[BOS_ID]} $A $B",
        special_tokens=[(SPECIAL_TOKENS[BOS_ID], BOS_ID)])
    return tok


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json (with chat template) in Hugging Face layout."""
    train_tokenizer(vocab_size).save(str(out / "tokenizer.json"))
    settings = {"bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[IM_END_ID],
                "chat_template": CHAT_TEMPLATE, "model_max_length": 1 << 30,
                "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


def hf_config(preset: str, **overrides: Any) -> dict[str, Any]:
    """config.json contents for a preset, in the transformers 4.x form that 5.x also reads."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
           "bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID], "initializer_range": 0.02}
    return raw | PRESETS[preset] | overrides


def _random_weights(raw: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_tensors(config_from_hf(raw)).items():
        if len(shape) == 1:
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen) if "norm" in name \
                else 0.02 * torch.randn(shape, generator=gen)
        else:  # std 1/sqrt(fan_in) keeps activations O(1), so greedy tokens are not near-ties
            tensors[name] = torch.randn(shape, generator=gen) * shape[1] ** -0.5
    return tensors


def make_model(out: Path | str, preset: str = "tiny", seed: int = 0, dtype: str = "float32") -> Path:
    """Write config.json, model.safetensors (in `dtype`), tokenizer files and generation_config.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = hf_config(preset, torch_dtype=dtype)
    weights = out / "model.safetensors"
    tensors = {k: v.to(DTYPES[dtype]) for k, v in _random_weights(raw, seed).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; a model folder is meant to be shared
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    generation = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_tokenizer(out, raw["vocab_size"])
    return out
