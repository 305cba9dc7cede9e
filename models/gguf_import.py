"""`edge-llm import MODEL.gguf OUT`: a GGUF checkpoint as a Hugging Face-layout folder.

Parsing and dequantizing are the `gguf` package's (llama.cpp's own reader). What this module adds:
llama.cpp's tensor names mapped back to Hugging Face's, its Q/K row permutation undone for the
llama architecture, Llama 3's `rope_freqs` factors turned back into the `rope_scaling` they came
from, and the tokenizer and chat template rebuilt from the metadata (models.gguf_tokenizer).

Q8_0, Q4_0 and Q4_1 matrices are kept as they are: their blocks are moved, byte for byte, into
models.quant's int8-in-groups and int4 layouts (NAME.q, NAME.scale, NAME.min), which the kernels
compute with directly. Other quantized types (K-quants) are dequantized to the import dtype.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from models.dtypes import dtype_name, resolve_dtype
from models.errors import CheckpointError
from models.gguf_rope import rope_from_freqs
from models.gguf_tokenizer import build_tokenizer
from models.quant import GROUP

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_PER_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
SHARD_BYTES = 2 << 30  # safetensors shards of at most this size, so an import never holds the whole model


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError, EOFError) as e:  # the reader's errors on cut files
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e


def read_metadata(reader) -> dict[str, Any]:
    """Every key-value of the file as Python values (arrays as lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def hf_tensor_name(name: str) -> str | None:
    """llama.cpp's tensor name -> Hugging Face's; None for one this import does not know."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _PER_LAYER and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_PER_LAYER[parts[2]]}.{parts[3]}"
    return None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its converter interleaves the two rotary halves of
    each head for its RoPE kernel; Hugging Face keeps them as halves)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch_value(meta: dict[str, Any], arch: str, key: str, default: Any = None) -> Any:
    return meta.get(f"{arch}.{key}", default)


def _config(meta: dict[str, Any], arch: str, names: set[str], rope_freqs: np.ndarray | None,
            dtype: torch.dtype, source: str) -> dict[str, Any]:
    """config.json in transformers' layout, from the `{arch}.*` metadata."""
    def need(key: str) -> Any:
        value = _arch_value(meta, arch, key)
        if value is None:
            raise CheckpointError(f"{source}: metadata {arch}.{key} is missing")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_arch_value(meta, arch, "attention.key_length", hidden // heads))
    rotary = int(_arch_value(meta, arch, "rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise CheckpointError(f"{source}: partial rotary embeddings ({rotary} of {head_dim} dims) are not supported")
    raw: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch, "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(_arch_value(meta, arch, "attention.head_count_kv", heads)),
        "head_dim": head_dim, "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(_arch_value(meta, arch, "context_length", 2048)),
        "vocab_size": len(meta.get("tokenizer.ggml.tokens") or []) or int(need("vocab_size")),
        "rope_theta": float(_arch_value(meta, arch, "rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names, "torch_dtype": dtype_name(dtype),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": _eos_ids(meta),
    }
    if arch in ("llama", "qwen3"):
        raw |= {"attention_bias": "blk.0.attn_q.bias" in names, "mlp_bias": False}
    raw["rope_scaling"] = _rope_scaling(meta, arch, rope_freqs, raw, source)
    return raw


def _rope_scaling(meta: dict[str, Any], arch: str, rope_freqs: np.ndarray | None, raw: dict[str, Any],
                  source: str) -> dict[str, Any] | None:
    """Linear/YaRN scaling from metadata; Llama 3's from the `rope_freqs` tensor (no metadata says it)."""
    if rope_freqs is not None:
        return rope_from_freqs(rope_freqs, raw["rope_theta"], raw["head_dim"], source)
    kind = _arch_value(meta, arch, "rope.scaling.type", "none")
    factor = _arch_value(meta, arch, "rope.scaling.factor")
    if kind == "none" or factor in (None, 1.0):
        return None
    if kind not in ("linear", "yarn"):
        raise CheckpointError(f"{source}: rope scaling type {kind!r} is not supported (linear, yarn)")
    scaling = {"rope_type": kind, "factor": float(factor)}
    original = _arch_value(meta, arch, "rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _eos_ids(meta: dict[str, Any]) -> list[int]:
    """End of generation: eos, and the end-of-turn / end-of-message tokens chat models stop on."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    return list(dict.fromkeys(int(meta[k]) for k in keys if isinstance(meta.get(k), int)))


def _check_tensors(reader, source: str) -> None:
    """Every tensor known, of a supported type, and wholly inside the file (not truncated)."""
    for t in reader.tensors:
        if t.name != "rope_freqs.weight" and hf_tensor_name(t.name) is None:
            raise CheckpointError(f"{source}: tensor {t.name!r} is not part of a llama/qwen2/qwen3 decoder "
                                  "this import knows (mixture-of-experts and other layouts are not supported)")
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise CheckpointError(f"{source}: tensor {t.name!r} has type {t.tensor_type.name}, which is not "
                                  f"supported (supported: {sorted(SUPPORTED_TYPES)})")
        if t.data.nbytes != int(t.n_bytes):
            raise CheckpointError(f"{source}: truncated GGUF file: tensor {t.name!r} needs {t.n_bytes} bytes, "
                                  f"the file holds {t.data.nbytes}")


def _auto_dtype(reader) -> torch.dtype:
    """The dtype the file's matrices are stored in when it is a float type; float32 for quantized ones
    (dequantized values are exact in float32, not in 16 bits)."""
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    return {frozenset({"F16"}): torch.float16, frozenset({"BF16"}): torch.bfloat16}.get(frozenset(kinds),
                                                                                       torch.float32)


def _dequantized(t, arch: str, config: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """One tensor in Hugging Face's layout and `dtype`: [out, in] for matrices."""
    import gguf

    data = gguf.quants.dequantize(t.data, t.tensor_type)  # float32 (or F16/BF16 as stored), row-major
    data = np.asarray(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    if arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"] if ".attn_q." in t.name else config["num_key_value_heads"]
        data = _unpermute(data, heads)
    return torch.from_numpy(np.array(data, dtype=np.float32, order="C", copy=True)).to(dtype)


def _blocks(t, arch: str, config: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """A Q8_0 / Q4_0 / Q4_1 matrix as models.quant's plain-order parts (".q" [G, 32 | 16, N], ".scale"
    and ".min" [G, N]; bytes moved, never re-rounded); None for other types, or a Q4_0 scale whose
    min (-8 x scale) would overflow float16."""
    kind = t.tensor_type.name
    if kind not in ("Q8_0", "Q4_0", "Q4_1") or len(t.shape) != 2:
        return None
    n, k = int(t.shape[1]), int(t.shape[0])
    blocks = np.asarray(t.data, dtype=np.uint8).reshape(n, -1)  # [N, G x block bytes]
    if arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"] if ".attn_q." in t.name else config["num_key_value_heads"]
        blocks = _unpermute(blocks, heads)  # a permutation of output rows: whole blocks move
    blocks = np.ascontiguousarray(blocks).reshape(n, k // GROUP, -1)  # [N, G, block bytes]
    scale = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0]  # [N, G]
    if kind == "Q8_0":
        return {".q": blocks[:, :, 2:].copy().view(np.int8).transpose(1, 2, 0), ".scale": scale.T}
    if kind == "Q4_0":  # w = (q - 8) d = d q + (-8 d): exact in float16 unless it overflows
        with np.errstate(over="ignore"):
            minimum = scale * np.float16(-8)
        if not np.isfinite(minimum).all():
            return None
        codes = blocks[:, :, 2:]
    else:
        minimum, codes = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0], blocks[:, :, 4:]
    return {".q": codes.transpose(1, 2, 0), ".scale": scale.T, ".min": minimum.T}


def _stored(t, arch: str, config: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The safetensors entries of one GGUF tensor: its blocks (NAME.q/.scale/.min) or NAME as floats."""
    name = hf_tensor_name(t.name)
    blocks = _blocks(t, arch, config)
    if blocks is None:
        return {name: _dequantized(t, arch, config, dtype)}
    return {name + part: torch.from_numpy(np.ascontiguousarray(a)) for part, a in blocks.items()}


def _write_weights(reader, arch: str, config: dict[str, Any], dtype: torch.dtype, out: Path) -> None:
    """model.safetensors, or shards of at most SHARD_BYTES with an index, as transformers writes them."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        tensors = _stored(t, arch, config, dtype)
        nbytes = sum(v.nbytes for v in tensors.values())
        if size and size + nbytes > SHARD_BYTES:
            _save_shard(shards[-1], out, len(shards))
            shards.append({})
            size = 0
        shards[-1] |= tensors
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; a model folder is shared
        return
    _save_shard(shards[-1], out, len(shards))
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (out / f"shard-{i}.tmp").rename(out / name)
        (out / name).chmod(0o644)
        weight_map |= dict.fromkeys(shard, name)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _save_shard(tensors: dict[str, torch.Tensor], out: Path, number: int) -> None:
    save_file(tensors, str(out / f"shard-{number}.tmp"), metadata={"format": "pt"})
    tensors.update({k: torch.empty(0) for k in tensors})  # keep the names for the index, drop the data


def import_gguf(gguf_path: str | Path, out: str | Path, dtype: str | None = "auto") -> Path:
    """Write `out` (config, weights in `dtype`, tokenizer files); raises CheckpointError naming the
    file and what is wrong or unsupported. Writes into a temporary folder first, so `out` is whole."""
    path, out = Path(gguf_path), Path(out)
    source = str(path)
    reader = _reader(path)
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{source}: architecture {arch!r} is not supported (supported: {sorted(ARCHITECTURES)})")
    _check_tensors(reader, source)
    names = {t.name for t in reader.tensors}
    target = _auto_dtype(reader) if dtype in (None, "auto") else resolve_dtype(dtype, "float32")
    freqs = next((np.asarray(t.data, dtype=np.float32) for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    config = _config(meta, arch, names, freqs, target, source)
    tokenizer, tokenizer_config = build_tokenizer(meta, source)
    tmp = out.with_name(out.name + ".importing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_weights(reader, arch, config, target, tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def imported_folder(gguf_path: str | Path, dtype: str | None = "auto") -> Path:
    """The Hugging Face folder of a .gguf given as `--model`: imported once into MODEL.gguf.edge-import
    beside it (or under ~/.cache/edge-llm when that folder is not writable), again only if it changed."""
    path = Path(gguf_path).resolve()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    stat = path.stat()
    stamp = {"source": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": dtype or "auto",
             "layout": 2}  # 2: Q8_0/Q4_0/Q4_1 kept as blocks
    out = path.with_name(path.name + ".edge-import")
    if not os.access(path.parent, os.W_OK):
        out = Path.home() / ".cache" / "edge-llm" / (path.name + ".edge-import")
    stamp_file = out / "edge-import.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    import_gguf(path, out, dtype)
    stamp_file.write_text(json.dumps(stamp))
    return out

