"""Hugging Face checkpoint folders: find every tensor, validate it against the config, read slices.

Validation happens at open so a corrupt or incomplete checkpoint fails before serving, with one
message that names the file and the tensor.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from models.config import LlamaConfig, load_config
from models.errors import CheckpointError
from models.files import INDEX_FILE, read_safetensors_header, tensor_files
from models.quant import GROUP, QuantWeight, quantize
from models.sharding import LocalDims, split_for

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
# A Linear weight stored as quantized blocks (an imported GGUF's Q8_0/Q4_0/Q4_1): NAME.q, NAME.scale
# and, for int4, NAME.min, in models.quant's layout; read natively, or dequantized where floats are asked.
_BLOCK_PARTS = (".q", ".scale", ".min")


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape."""
    d, f, v, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    per_layer: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
    }
    if config.qkv_bias:
        per_layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                      "self_attn.v_proj.bias": (kv,)}
    if config.o_bias:
        per_layer["self_attn.o_proj.bias"] = (d,)
    if config.mlp_bias:
        per_layer |= {"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (d,)}
    for layer in range(config.num_layers):
        for suffix, shape in per_layer.items():
            shapes[layer_prefix(layer) + suffix] = shape
    return shapes


class Checkpoint:
    """A validated checkpoint folder that reads whole tensors or one rank's slice in `dtype`, and
    Linear weights by `quant`: 'int8' | 'int4' (quantized), 'auto' (as stored: blocks stay blocks),
    None (floats: stored blocks dequantized)."""

    def __init__(self, folder: Path | str, dtype: torch.dtype = torch.float32, quant: str | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: model folder does not exist")
        self.config = load_config(self.folder)
        self.dtype = dtype
        self.quant = quant
        self.files = tensor_files(self.folder)
        self._headers = self._validate()
        self._handles: dict[Path, object] = {}

    def with_dtype(self, dtype: torch.dtype) -> Checkpoint:
        """The same validated checkpoint, reading tensors in `dtype` (shares the open files)."""
        other = copy.copy(self)
        other.dtype = dtype
        return other

    def with_quant(self, quant: str | None) -> Checkpoint:
        """The same checkpoint, reading Linear weights by `quant` (auto | none | int8 | int4)."""
        other = copy.copy(self)
        other.quant = None if quant in (None, "none") else quant
        return other

    def _validate(self) -> dict[Path, dict[str, dict]]:
        headers: dict[Path, dict[str, dict]] = {}
        for path in sorted(set(self.files.values())):
            if not path.is_file():
                raise CheckpointError(f"{path}: weight file named by {INDEX_FILE} is missing")
            headers[path] = read_safetensors_header(path)
        self._blocks: dict[str, str] = {}  # Linear weights stored as quantized blocks -> their format
        for name, shape in expected_tensors(self.config).items():
            if name + ".q" in self.files:
                self._blocks[name] = self._validate_blocks(name, shape, headers)
                continue
            path = self.files.get(name)
            if path is None or name not in headers[path]:
                where = path or self.folder
                raise CheckpointError(f"{where}: tensor {name!r} is missing from the checkpoint")
            entry = headers[path][name]
            if tuple(entry["shape"]) != shape:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(entry['shape'])}, "
                                      f"config.json implies {shape}")
            if entry["dtype"] not in _FLOAT_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, "
                                      "expected a float type")
        return headers

    def _validate_blocks(self, name: str, shape: tuple[int, ...], headers: dict[Path, dict[str, dict]]) -> str:
        entries = {}
        for part in _BLOCK_PARTS:
            path = self.files.get(name + part)
            if path is not None and name + part in headers[path]:
                entries[part] = headers[path][name + part]
        q = entries.get(".q", {"dtype": "missing"})
        kind = {"I8": "int8g", "U8": "int4"}.get(q["dtype"])
        width = GROUP if kind == "int8g" else GROUP // 2
        groups, n = shape[1] // GROUP, shape[0]
        wanted = {".q": [groups, width, n], ".scale": [groups, n]} | ({".min": [groups, n]} if kind == "int4" else {})
        got = {part: entries[part]["shape"] if part in entries else None for part in wanted}
        if kind is None or shape[1] % GROUP or got != wanted:
            raise CheckpointError(f"{self.folder}: quantized tensor {name!r} has parts {got} of {q['dtype']}, "
                                  f"config.json implies {wanted} for a {list(shape)} weight")
        return kind

    def method_for(self, name: str) -> str | None:
        """How `name` is quantized: `self.quant`, except that int4 leaves the LM head at int8 (its
        errors go straight into the logits: on SmolLM2-135M an int4 head alone moves the mean token
        logprob by 0.21 nats, int4 layers with an 8-bit head by 0.00; README)."""
        head = name in ("lm_head.weight", "model.embed_tokens.weight")
        return "int8" if head and self.quant == "int4" else self.quant

    @property
    def block_formats(self) -> set[str]:
        """The formats of the quantized blocks the files store (int8g | int4), if any."""
        return set(self._blocks.values())

    def keeps_blocks(self, name: str) -> bool:
        """Whether `read_weight` serves `name` from its stored blocks (no dequantize-requantize)."""
        kind, method = self._blocks.get(name), self.method_for(name)
        return kind is not None and (method == "auto" or (method, kind) in (("int8", "int8g"), ("int4", "int4")))

    @property
    def quant_label(self) -> str:
        """What the Linear weights are held as, for plans and split folders: none | int8 | int4 | auto."""
        if self.quant in (None, "auto") and not any(self.keeps_blocks(n) for n in self._blocks):
            return "none"
        return self.quant

    def plan_align(self) -> tuple[int, int]:
        """Input-feature alignment of o_proj and down_proj slices (sharding.local_dims): a group of 32
        where that weight is held in groups."""
        def grouped(suffix: str) -> bool:
            name = layer_prefix(0) + suffix
            return self.quant == "int4" or (self.keeps_blocks(name) and self._blocks[name] in ("int8g", "int4"))

        return (GROUP if grouped("self_attn.o_proj.weight") else 1, GROUP if grouped("mlp.down_proj.weight") else 1)

    def quantizes(self, name: str) -> bool:
        """Whether `read_weight(name)` gives a QuantWeight (else the same floats as `read`)."""
        return self.keeps_blocks(name) or self.method_for(name) not in (None, "auto")

    def has(self, name: str) -> bool:
        return name in self.files or name in self._blocks

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def model_bytes(self) -> int:
        """Bytes of every tensor of the checkpoint as stored."""
        return sum(self.nbytes(name) for name in expected_tensors(self.config))

    def nbytes(self, name: str) -> int:
        parts = [name + p for p in _BLOCK_PARTS if name + p in self.files] if name in self._blocks else [name]
        return sum(int(e["data_offsets"][1]) - int(e["data_offsets"][0])
                   for e in (self._headers[self.files[p]][p] for p in parts))

    def read(self, name: str, dims: LocalDims | None = None) -> torch.Tensor | None:
        """The tensor (or, with `dims`, this rank's slice of it by TENSOR_SPLITS) in `self.dtype`.

        None when the split gives this rank nothing (a rank-0-only bias on another rank).
        """
        if name in self._blocks:  # as floats: this rank's blocks, or all of them when its slice cuts a group
            kind, unit = self._split(name)
            if dims is None or kind != "in" or not any(r % GROUP for r in dims.rows(unit)):
                return self._read_blocks(name, dims).dequantize(self.dtype)
            return self._slice(self._read_blocks(name, None).dequantize(self.dtype), name, dims).contiguous()
        path = self.files[name]
        try:
            view = self._handle(path).get_slice(name)
            tensor = view[:] if dims is None else self._slice(view, name, dims)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from e
        return None if tensor is None else tensor.to(self.dtype).contiguous()

    def read_weight(self, name: str, dims: LocalDims | None = None) -> torch.Tensor | QuantWeight:
        """A Linear weight [out, in] (or this rank's slice): quantized by `self.quant`, else as `read`.

        Quantized whole rows, then sliced, so every plan holds the same quantized values: an output
        slice quantizes its own rows; an input slice takes its columns of the quantized tensor.
        """
        if self.keeps_blocks(name):
            return self._read_blocks(name, dims)
        method = self.method_for(name)
        if method in (None, "auto"):
            return self.read(name, dims)
        raw = self.with_quant(None).with_dtype(torch.float32)
        kind, unit = self._split(name)
        if dims is None or kind != "in":
            return quantize(raw.read(name, dims), method)
        start, stop = dims.rows(unit)
        return quantize(raw.read(name), method).cols(start, stop).contiguous()

    def _read_blocks(self, name: str, dims: LocalDims | None) -> QuantWeight:
        """A stored quantized weight, or this rank's slice of its blocks (output channels, or whole
        groups of input features)."""
        kind, unit = self._split(name)
        start, stop = dims.rows(unit) if dims is not None and kind in ("out", "in") else (None, None)
        if kind == "in" and start is not None and (start % GROUP or stop % GROUP):
            raise CheckpointError(f"{name}: input features {start}:{stop} cut a quantization group of {GROUP}")
        parts = {}
        for part in _BLOCK_PARTS:
            if name + part not in self.files:
                continue
            path = self.files[name + part]
            try:
                view = self._handle(path).get_slice(name + part)
                if start is None:
                    parts[part] = view[:]
                elif kind == "in":
                    parts[part] = view[start // GROUP: stop // GROUP]
                else:  # output channels are the last axis of every part
                    parts[part] = view[:, :, start:stop] if part == ".q" else view[:, start:stop]
            except SafetensorError as e:
                raise CheckpointError(f"{path}: cannot read tensor {name + part!r} ({e})") from e
        return QuantWeight.from_plain(self._blocks[name], parts[".q"], parts[".scale"], parts.get(".min"))

    @staticmethod
    def _split(name: str):
        return split_for(name.split(".", 3)[-1] if name.startswith("model.layers.") else name)

    def _slice(self, view, name: str, dims: LocalDims) -> torch.Tensor | None:
        kind, unit = self._split(name)
        if kind == "replicated":
            return view[:]
        if kind == "rank0":
            return view[:] if dims.rank == 0 else None
        start, stop = dims.rows(unit)
        return view[start:stop] if kind == "out" else view[:, start:stop]

    def close(self) -> None:
        self._handles.clear()
