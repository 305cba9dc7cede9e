"""GGUF files written the way llama.cpp's converter writes them, from a transformers-made checkpoint
(test helper: independent of models/gguf_import.py, so the import is checked against llama.cpp's
conventions, not against itself)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

Q = gguf.GGMLQuantizationType
HF_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def _gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: interleave the rotary halves of each head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(cfg: dict) -> np.ndarray:
    """llama.cpp's rope_freqs for Llama 3 scaling (convert_hf_to_gguf.py generate_extra_tensors)."""
    scaling = cfg.get("rope_scaling") or cfg["rope_parameters"]
    base = scaling.get("rope_theta", cfg.get("rope_theta"))
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# K-quant blocks of 256 values: (block bytes, offset of the fp16 scale d, offset of dmin and the mean
# quant it offsets, so weights centre on zero; Q6_K is symmetric).
K_QUANTS = {Q.Q4_K: (144, 0, (2, 7.5)), Q.Q5_K: (176, 0, (2, 15.5)), Q.Q6_K: (210, 208, None)}


def _tensor_type(data: np.ndarray, quant: Q) -> Q:
    if data.ndim == 1:
        return Q.F32
    block = 256 if quant in K_QUANTS else 32
    return quant if data.shape[-1] % block == 0 else Q.F16  # a row must hold whole blocks


def _random_k_blocks(shape: tuple[int, ...], kind: Q, rng: np.random.Generator) -> np.ndarray:
    """Valid K-quant bytes with random quants and sub-scales (gguf-py cannot quantize to K types):
    the import and the reference must dequantize the same bytes to the same weights."""
    size, d_at, dmin = K_QUANTS[kind]
    rows, blocks = shape[0], shape[1] // 256
    raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    d = rng.uniform(1e-4, 3e-4, size=(rows, blocks))  # small scales keep activations O(1)
    raw[:, :, d_at:d_at + 2] = d.astype(np.float16).view(np.uint8).reshape(rows, blocks, 2)
    if dmin is not None:
        offset, mean_quant = dmin
        raw[:, :, offset:offset + 2] = (d * mean_quant).astype(np.float16).view(np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, blocks * size)


def _stored(data: np.ndarray, kind: Q, rng: np.random.Generator) -> np.ndarray:
    if kind in K_QUANTS:
        return _random_k_blocks(data.shape, kind, rng)
    if kind == Q.BF16:
        return torch.from_numpy(data).bfloat16().view(torch.int16).numpy().view(np.uint8)
    if kind in (Q.F32, Q.F16):
        return data.astype(np.float16 if kind == Q.F16 else np.float32)
    return gguf.quants.quantize(data, kind)


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path, pre: str) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in special else 1 for t, _ in vocab])
    writer.add_token_merges(merges)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    writer.add_bos_token_id(hf.token_to_id(settings["bos_token"]))
    writer.add_eos_token_id(hf.token_to_id(settings["eos_token"]))
    writer.add_add_bos_token(True)
    writer.add_chat_template(settings["chat_template"])


def write_gguf(folder: Path, out: Path, quant: Q = Q.Q8_0, arch: str | None = None,
               embed: Q | None = None) -> Path:
    """`folder` (a transformers llama, qwen2 or qwen3 checkpoint) as a GGUF: matrices in `quant` where
    their rows allow, else F16 (the embedding in `embed` if given); norms F32; llama's Q/K rows
    permuted; Llama 3 rope as rope_freqs. K-quant matrices get random valid blocks instead."""
    rng = np.random.default_rng(0)
    cfg = json.loads((folder / "config.json").read_text())
    arch = arch or cfg["model_type"]
    writer = gguf.GGUFWriter(str(out), arch)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    writer.add_rope_freq_base(scaling.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // heads:  # as llama.cpp's converter (Qwen3: 128 per head)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _add_tokenizer(writer, folder, "default")
    if scaling.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg))
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(str(path))
    for name, t in tensors.items():
        data = t.float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            data = _permute(data, heads if ".q_proj." in name else kv_heads)
        kind = embed if embed is not None and name == "model.embed_tokens.weight" else _tensor_type(data, quant)
        stored = _stored(data, kind, rng)
        writer.add_tensor(_gguf_name(name), stored, raw_dtype=kind)  # quantized: its byte shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_spm_gguf(folder: Path, out: Path, corpus: list[str], vocab_size: int = 400) -> Path:
    """`folder`'s llama weights with a sentencepiece-style BPE vocabulary (as Llama 2 and Mistral GGUFs
    carry it: '▁' for spaces, <0xNN> byte tokens, scores, no merges), trained here on `corpus`."""
    from tokenizers import SentencePieceBPETokenizer

    spm = SentencePieceBPETokenizer(add_prefix_space=True)
    spm.train_from_iterator(corpus, vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                            show_progress=False)
    learned = [t for t, _ in sorted(spm.get_vocab().items(), key=lambda kv: kv[1])]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = learned[:3] + byte_tokens + [t for t in learned[3:] if t not in byte_tokens]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)  # unknown, control, byte, normal
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]  # earlier merges score higher
    cfg = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(str(path))
    for name, t in tensors.items():
        data = t.float().numpy()
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # one row per token of this vocabulary
            data = np.resize(data, (len(tokens), data.shape[1]))
        if ".q_proj." in name or ".k_proj." in name:
            data = _permute(data, cfg["num_attention_heads"] if ".q_proj." in name else cfg["num_key_value_heads"])
        writer.add_tensor(_gguf_name(name), data.astype(np.float16 if data.ndim > 1 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
