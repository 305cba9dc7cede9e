"""`edge-llm split`: per-rank, per-layer safetensors files, so a layer is one sequential read.

Layout of DIR:
  manifest.json                      plan, source fingerprint, sha256 and size of every file
  rank-R-of-N/layer-007.safetensors  rank R's slice of layer 7 (LayerWeights field names)
  rank-R-of-N/head.safetensors       final norm and rank R's LM-head rows
  rank-0-of-N/embed.safetensors      the embedding table (rank 0 maps it and reads only the rows it needs)
Resumable: files already listed in the manifest with a matching size and checksum are kept.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.checkpoint import Checkpoint
from models.dtypes import DTYPES, dtype_name, resolve_dtype
from models.errors import CheckpointError
from models.files import checkpoint_fingerprint
from models.llama import load_layer, load_output_head
from models.quant import QuantWeight, check_quantizable
from models.sharding import LocalDims, local_dims

MANIFEST = "manifest.json"


class SplitError(CheckpointError):
    """A split folder that does not fit the model or plan, or a damaged shard file (names it)."""


@dataclass(frozen=True)
class SplitPlan:
    """What a split folder holds: the device count, weights, source checkpoint, dtype and quantization."""

    world_size: int
    weights: tuple[float, ...]
    fingerprint: str
    dtype: str = "float32"  # the bytes every tensor of the split is stored (and held) in
    quantize: str = "none"  # Linear weights quantized (models.quant) or not
    align: tuple[int, int] = (1, 1)  # o_proj / down_proj input slices in multiples of these (sharding)

    def as_json(self) -> dict:
        return {"world_size": self.world_size, "weights": list(self.weights), "fingerprint": self.fingerprint,
                "dtype": self.dtype, "quantize": self.quantize, "align": list(self.align)}

    @property
    def element_bytes(self) -> int:
        return DTYPES[self.dtype].itemsize


def rank_dir(world_size: int, rank: int) -> str:
    return f"rank-{rank}-of-{world_size}"


def layer_file(world_size: int, rank: int, layer: int) -> str:
    return f"{rank_dir(world_size, rank)}/layer-{layer:03d}.safetensors"


def head_file(world_size: int, rank: int) -> str:
    return f"{rank_dir(world_size, rank)}/head.safetensors"


def embed_file(world_size: int) -> str:
    return f"{rank_dir(world_size, 0)}/embed.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def default_split_dir(model: str | Path, dtype: str = "float32", quantize: str = "none") -> Path:
    """MODEL.edge-split beside the model (MODEL.edge-split-bfloat16, -int4, -bfloat16-int8 otherwise)."""
    model = Path(model).resolve()
    suffix = "".join(f"-{part}" for part, plain in ((dtype, "float32"), (quantize, "none")) if part != plain)
    return model.with_name(f"{model.name}.edge-split{suffix}")


def plan_folder(folder: Path, plan: SplitPlan) -> Path:
    """Where the split for `plan` lives under a split folder: the folder itself when it holds this
    plan (or none yet), else a subfolder per plan, so the plans of a cluster that re-planned after
    losing a device live side by side with the first one."""
    manifest = read_manifest(folder)
    if manifest is None or same_plan(manifest["plan"], plan):
        return folder
    key = hashlib.sha256(json.dumps(plan.as_json(), sort_keys=True).encode()).hexdigest()[:12]
    return folder / "plans" / f"{plan.world_size}-devices-{key}"


def read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SplitError(f"{path}: corrupt manifest ({e}); delete the folder and split again") from e


def stored_tensors(weights: dict[str, torch.Tensor | QuantWeight | None]) -> dict[str, torch.Tensor]:
    """What a shard file holds: plain tensors by field, quantized ones as FIELD.q/.scale/.min
    (models.quant.gather_quantized reads them back)."""
    out = {}
    for name, value in weights.items():
        if isinstance(value, QuantWeight):
            out |= value.contiguous().tensors(name)
        elif value is not None:
            out[name] = value.contiguous()
    return out


def _tensors_of_layer(ckpt: Checkpoint, layer: int, dims: LocalDims) -> dict[str, torch.Tensor]:
    return stored_tensors(vars(load_layer(ckpt, layer, dims)))


def _tensors_of_head(ckpt: Checkpoint, dims: LocalDims) -> dict[str, torch.Tensor]:
    head = load_output_head(ckpt, dims)
    return stored_tensors({"norm": head.norm, "lm_head": head.lm_head})


def _progress(done: int, total: int, name: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\rsplit [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name:<40}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def split_model(model: str | Path, world_size: int, weights: list[float] | None = None,
                out: str | Path | None = None, ranks: list[int] | None = None, quiet: bool = False,
                dtype: str | None = "auto", quantize: str | None = "auto") -> Path:
    """Write (or finish writing) the split of `model` for this plan, every tensor in `dtype` (auto:
    the checkpoint's own), Linear weights quantized by `quantize`; raises SplitError for another plan."""
    ckpt = Checkpoint(model)
    ckpt = ckpt.with_dtype(resolve_dtype(dtype, ckpt.config.torch_dtype)).with_quant(quantize)
    check_quantizable(ckpt.config, ckpt.quant)
    plan = SplitPlan(world_size, tuple(weights or [1.0] * world_size), checkpoint_fingerprint(model),
                     dtype_name(ckpt.dtype), ckpt.quant_label, ckpt.plan_align())
    plans = local_dims(ckpt.config, world_size, weights, plan.align)  # PlanError before anything is written
    out = Path(out) if out else default_split_dir(model, plan.dtype, plan.quantize)
    manifest = read_manifest(out) or {"plan": plan.as_json(), "files": {}}
    if not same_plan(manifest["plan"], plan):
        raise SplitError(f"{out} holds a split for another plan ({manifest['plan']}); "
                         f"choose another --out or delete it")
    jobs = []
    for dims in plans if ranks is None else [plans[r] for r in ranks]:
        if dims.rank == 0:
            jobs.append((embed_file(world_size), lambda: {"embed": ckpt.read("model.embed_tokens.weight")}))
        jobs.append((head_file(world_size, dims.rank), lambda d=dims: _tensors_of_head(ckpt, d)))
        for layer in range(ckpt.config.num_layers):
            jobs.append((layer_file(world_size, dims.rank, layer),
                         lambda d=dims, i=layer: _tensors_of_layer(ckpt, i, d)))
    for done, (name, tensors) in enumerate(jobs, start=1):
        path = out / name
        entry = manifest["files"].get(name)
        if not (entry and path.is_file() and path.stat().st_size == entry["bytes"]
                and sha256_file(path) == entry["sha256"]):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file(tensors(), str(tmp))
            tmp.replace(path)  # a crash mid-write never leaves a half file under the real name
            manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if not quiet:
            _progress(done, len(jobs), name)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def same_plan(stored: dict, plan: SplitPlan) -> bool:
    """Whether a manifest's plan is `plan` (manifests written before dtypes were float32, unquantized)."""
    return {"dtype": "float32", "quantize": "none", "align": [1, 1]} | stored == plan.as_json()


def verify_rank(out: Path, plan: SplitPlan, rank: int, num_layers: int) -> dict[str, dict]:
    """Check this rank's files against the manifest (size and sha256); raises SplitError naming a bad file."""
    manifest = read_manifest(out)
    if manifest is None:
        raise SplitError(f"{out}: no {MANIFEST}; run `edge-llm split`")
    if not same_plan(manifest["plan"], plan):
        raise SplitError(f"{out}: split for another plan ({manifest['plan']}), expected {plan.as_json()}")
    names = [head_file(plan.world_size, rank)] + [layer_file(plan.world_size, rank, i) for i in range(num_layers)]
    if rank == 0:
        names.append(embed_file(plan.world_size))
    files = {}
    for name in names:
        entry = manifest["files"].get(name)
        path = out / name
        if entry is None or not path.is_file():
            raise SplitError(f"{path}: shard file is missing; run `edge-llm split` to write it")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise SplitError(f"{path}: shard file is damaged (size or checksum differs from {MANIFEST}); "
                             f"run `edge-llm split` to repair it")
        files[name] = entry
    return files
