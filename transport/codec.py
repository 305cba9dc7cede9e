"""msgpack message codec with tensors as {dtype, shape, data}; a dtype whitelist, no pickle, no ext types."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from transport.errors import FrameError

# bfloat16 has no numpy type: it travels as its raw 16 bits (uint16) and the receiver reinterprets.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16),
    "int32": np.dtype(np.int32), "int64": np.dtype(np.int64),
}
_NAME_OF = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
            np.dtype(np.int32): "int32", np.dtype(np.int64): "int64"}
MAX_DIMS = 8


def pack_array(arr: np.ndarray, dtype: str | None = None) -> dict[str, Any]:
    """A tensor as a msgpack map; `dtype='bfloat16'` for a uint16 view of bf16 data."""
    name = dtype or _NAME_OF.get(arr.dtype)
    if name is None or DTYPES[name] != arr.dtype:
        raise ValueError(f"dtype {arr.dtype} is not on the wire whitelist {sorted(DTYPES)}")
    data = arr.data if arr.flags.c_contiguous else np.ascontiguousarray(arr).data
    return {"dtype": name, "shape": list(arr.shape), "data": data}


def unpack_array(obj: Any) -> np.ndarray:
    """Validate and view a tensor map as a read-only array over the frame's bytes (no copy)."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise FrameError("tensor must be a map with exactly dtype, shape, data")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in DTYPES:
        raise FrameError(f"tensor dtype {dtype!r} is not allowed")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise FrameError(f"tensor shape {shape!r} is not a list of non-negative ints")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FrameError("tensor data must be bytes")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if len(data) != expected:
        raise FrameError(f"tensor data has {len(data)} bytes, shape {shape} of {dtype} needs {expected}")
    return np.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)


def _no_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"msgpack ext type {code} is not allowed")


def encode(msg: dict[str, Any]) -> bytes:
    """A message map to msgpack bytes (bin type for bytes, str for text)."""
    return msgpack.packb(msg, use_bin_type=True)


def decode(body: bytes | memoryview) -> dict[str, Any]:
    """msgpack bytes to a message map with a string tag `t`; raises FrameError on anything else."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext, use_list=True)
    except FrameError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # incl. ExtraData, unhashable keys
        raise FrameError(f"invalid msgpack: {type(e).__name__}: {e}") from e
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise FrameError("a message must be a map with a string tag 't'")
    return msg
