"""The bytes a weight is held in: `--dtype auto|float32|bfloat16|float16`.

Activations and the KV cache use the weight dtype, as transformers does when it loads a
checkpoint in that dtype; norms, softmax and the all-reduce sum run in float32 (see the README).
"""

from __future__ import annotations

import torch

from models.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
DTYPE_CHOICES = ("auto", *DTYPES)
# Names config.json files use for the same dtypes (transformers writes "bfloat16", older tools "bf16").
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
            "float64": "float32"}


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (the name config.json, split manifests and the CLI use)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise CheckpointError(f"dtype {dtype} is not one of {sorted(DTYPES)}")


def resolve_dtype(choice: str | None, checkpoint_dtype: str) -> torch.dtype:
    """The dtype to hold weights in: `choice`, or for 'auto'/None the checkpoint's own `torch_dtype`.

    Raises CheckpointError (the CLI reports it) for a name that is not a supported dtype.
    """
    name = checkpoint_dtype if choice in (None, "auto") else choice
    name = _ALIASES.get(str(name), str(name))
    if name not in DTYPES:
        if choice in (None, "auto"):  # an exotic torch_dtype in config.json: compute in float32
            return torch.float32
        raise CheckpointError(f"--dtype {choice!r} is not supported (choose from {list(DTYPE_CHOICES)})")
    return DTYPES[name]
