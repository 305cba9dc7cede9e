"""torch tensors on the wire: float32, float16 and bfloat16 (as its raw 16 bits) over transport.codec."""

from __future__ import annotations

from typing import Any

import torch

from transport.codec import pack_array, unpack_array


def pack_tensor(t: torch.Tensor) -> dict[str, Any]:
    """A tensor map for a frame; bf16 (no numpy type) travels as its bits, exactly."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return pack_array(t.view(torch.int16).numpy().view("uint16"), "bfloat16")
    return pack_array(t.numpy())


def unpack_tensor(obj: Any) -> torch.Tensor:
    """A writable tensor from a frame's tensor map; raises FrameError on a malformed map."""
    arr = unpack_array(obj).copy()
    if obj["dtype"] == "bfloat16":
        return torch.from_numpy(arr.view("int16")).view(torch.bfloat16)
    return torch.from_numpy(arr)
