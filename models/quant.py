"""Weight-only quantized Linear weights: `--quantize int8|int4`, and GGUF Q8_0/Q4_0/Q4_1 blocks as they are.

Three formats, all for a Linear weight W [N out, K in] (y = x @ W^T):
  int8   one float32 scale per output channel:       W[n, k] = scale[n] * q[n, k]        8 bits/weight
  int8g  groups of 32 along K, float16 scale (Q8_0):  W[n, 32g + j] = scale[g, n] * q[g, j, n]   8.5 bits
  int4   groups of 32 along K, float16 scale and min (Q4_1; Q4_0 is min = -8 scale):
         W[n, 32g + j] = scale[g, n] * q + min[g, n], q in 0..15                       5 bits/weight
Grouped formats store q output-channel innermost, [G, 32 or 16, N], so the GEMV kernel's inner loop
runs over output channels with x broadcast (it vectorizes at any width; a loop over the 32
elements of one group does not). An int4 byte holds element j of its group in the low nibble and
element j + 16 in the high one, as GGUF's Q4 blocks do, so a GGUF block is a byte shuffle away,
never a dequantize-requantize.

Quantization is per output row and per group, so it does not depend on the plan: a tensor-parallel
slice of the quantized tensor is the quantized slice, as long as a column slice never cuts a group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.errors import CheckpointError

GROUP = 32  # elements per group of the grouped formats (GGUF's block size)
QUANT_CHOICES = ("auto", "none", "int8", "int4")  # auto: as the checkpoint stores them (GGUF blocks kept)
KINDS = ("int8", "int8g", "int4")


@dataclass(frozen=True)
class QuantWeight:
    """A quantized Linear weight of logical shape [N, K]; `linear` (models.quant_kernels) applies it."""

    kind: str
    q: torch.Tensor  # int8 [N, K] | int8 [G, 32, N] | uint8 [G, 16, N]
    scale: torch.Tensor  # float32 [N] | float16 [G, N]
    min: torch.Tensor | None = None  # float16 [G, N] (int4 only)

    @property
    def shape(self) -> tuple[int, int]:
        if self.kind == "int8":
            return tuple(self.q.shape)
        groups, _, n = self.q.shape
        return n, groups * GROUP

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.q, self.scale, self.min) if t is not None)

    def numel(self) -> int:
        n, k = self.shape
        return n * k

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in float32 (then `dtype`): the weights the kernels compute with, exactly."""
        n, k = self.shape
        if self.kind == "int8":
            return (self.q.float() * self.scale[:, None]).to(dtype)
        if self.kind == "int8g":
            w = self.q.float() * self.scale.float()[:, None, :]  # [G, 32, N]
        else:
            codes = torch.cat([self.q & 15, self.q >> 4], 1).float()  # [G, 32, N]: low nibbles, then high
            w = codes * self.scale.float()[:, None, :] + self.min.float()[:, None, :]
        return w.reshape(k, n).T.contiguous().to(dtype)

    def rows(self, start: int, stop: int) -> QuantWeight:
        """Output channels start..stop (a column-parallel slice: q/k/v, gate/up, LM-head rows)."""
        if self.kind == "int8":
            return QuantWeight("int8", self.q[start:stop], self.scale[start:stop])
        return QuantWeight(self.kind, self.q[:, :, start:stop], self.scale[:, start:stop],
                           None if self.min is None else self.min[:, start:stop])

    def cols(self, start: int, stop: int) -> QuantWeight:
        """Input features start..stop (a row-parallel slice: o_proj, down_proj). Per-channel scales are
        kept whole (each rank's partial sum carries the row's scale); a group is never cut."""
        if self.kind == "int8":
            return QuantWeight("int8", self.q[:, start:stop], self.scale)
        if start % GROUP or stop % GROUP:
            raise CheckpointError(f"a slice of input features {start}:{stop} cuts a quantization group of "
                                  f"{GROUP}; the plan must align slices to {GROUP}")
        g0, g1 = start // GROUP, stop // GROUP
        return QuantWeight(self.kind, self.q[g0:g1], self.scale[g0:g1],
                           None if self.min is None else self.min[g0:g1])

    def contiguous(self) -> QuantWeight:
        return QuantWeight(self.kind, self.q.contiguous(), self.scale.contiguous(),
                           None if self.min is None else self.min.contiguous())

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors a safetensors file stores for `name` (kind follows from their dtypes and ranks)."""
        out = {f"{name}.q": self.q, f"{name}.scale": self.scale}
        if self.min is not None:
            out[f"{name}.min"] = self.min
        return out


def kind_of(q: torch.Tensor) -> str:
    """The format of stored tensors: int8 [N, K] -> int8, int8 [G, 32, N] -> int8g, uint8 [G, 16, N] -> int4."""
    if q.dtype == torch.int8 and q.dim() == 2:
        return "int8"
    if q.dtype == torch.int8 and q.dim() == 3 and q.shape[1] == GROUP:
        return "int8g"
    if q.dtype == torch.uint8 and q.dim() == 3 and q.shape[1] == GROUP // 2:
        return "int4"
    raise CheckpointError(f"quantized weights of dtype {q.dtype} and shape {list(q.shape)} are not a known format")


def gather_quantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | QuantWeight]:
    """Stored tensors by name -> weights by name: NAME.q / NAME.scale [/ NAME.min] become one QuantWeight."""
    out: dict[str, torch.Tensor | QuantWeight] = {}
    for name, tensor in tensors.items():
        if name.endswith((".scale", ".min")):
            continue
        if name.endswith(".q"):
            base = name[:-2]
            if f"{base}.scale" not in tensors:
                raise CheckpointError(f"quantized tensor {base!r} has no scale")
            out[base] = QuantWeight(kind_of(tensor), tensor, tensors[f"{base}.scale"], tensors.get(f"{base}.min"))
        else:
            out[name] = tensor
    return out


def quantize(w: torch.Tensor, method: str) -> QuantWeight:
    """W [N, K] float -> `method` ('int8' per channel, 'int4' groups of 32 with scale and min)."""
    w = w.float()
    if method == "int8":
        return quantize_int8(w)
    if method == "int4":
        return quantize_int4(w)
    raise CheckpointError(f"--quantize {method!r} is not supported (choose from {list(QUANT_CHOICES)})")


def quantize_int8(w: torch.Tensor) -> QuantWeight:
    """Symmetric per output channel: scale = max|w| / 127, q = round(w / scale) in -127..127."""
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # [N]
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantWeight("int8", q, scale)


def _groups(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    if k % GROUP:
        raise CheckpointError(f"int4 needs input features in multiples of {GROUP}; this weight has {k}")
    return w.reshape(n, k // GROUP, GROUP)  # [N, G, 32]


def quantize_int4(w: torch.Tensor) -> QuantWeight:
    """Asymmetric groups of 32 (as GGUF Q4_1): min and scale = (max - min) / 15 rounded to float16 first,
    then q = round((w - min) / scale) in 0..15, so the stored scale and min are the ones q was made for."""
    groups = _groups(w)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)  # [N, G]
    scale = ((hi - lo) / 15.0).to(torch.float16)
    minimum = lo.to(torch.float16)
    step = scale.float()
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((groups - minimum.float()[:, :, None]) / safe[:, :, None]).clamp_(0, 15).to(torch.uint8)
    return QuantWeight("int4", pack_int4(q), scale.T.contiguous(), minimum.T.contiguous())


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, G, 32] in 0..15 -> bytes [G, 16, N]: low nibble element j, high nibble element j + 16."""
    packed = q[:, :, : GROUP // 2] | (q[:, :, GROUP // 2:] << 4)  # [N, G, 16]
    return packed.permute(1, 2, 0).contiguous()


def check_quantizable(config, method: str | None) -> None:
    """Refuse, at start, a model whose Linear inputs do not come in whole groups for `method`
    (config: a models.config.LlamaConfig)."""
    if method != "int4":  # int8 is per row; blocks stored by a GGUF file come in whole groups
        return
    inputs = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
              "heads x head_dim": config.num_heads * config.head_dim}
    for what, k in inputs.items():
        if k % GROUP:
            raise CheckpointError(f"--quantize int4 needs {what} in multiples of {GROUP}; this model has {k}")
