"""Weight-only quantized Linear weights: `--quantize int8|int4`, and GGUF Q8_0/Q4_0/Q4_1 blocks as they are.

Three formats, all for a Linear weight W [N out, K in] (y = x @ W^T):
  int8   one float32 scale per output channel:       W[n, k] = scale[n] * q[k, n]        8 bits/weight
  int8g  groups of 32 along K, float16 scale (Q8_0):  W[n, 32g + j] = scale[g, n] * q[g, j, n]   8.5 bits
  int4   groups of 32 along K, float16 scale and min (Q4_1; Q4_0 is min = -8 scale):
         W[n, 32g + j] = scale[g, n] * q + min[g, n], q in 0..15                       5 bits/weight
Codes are stored output channel innermost (checkpoint files: [K, N] or [G, 32 | 16, N]; held in
memory in tiles of output channels, see QuantWeight), so the GEMV kernel's inner loop runs over
output channels with x broadcast (it vectorizes at any width; a loop over the 32 elements of one
group does not). An int4 byte holds element j of its group in the low nibble and element j + 16 in
the high one, as GGUF's Q4 blocks do, so a GGUF block is a byte shuffle away, never a
dequantize-requantize. Held tiles of the grouped formats keep a channel's bytes 4r..4r+3 of a
group side by side (`interleaved`): the kernel reads them as one 32-bit word and takes its codes
apart with shifts and masks, where widening single bytes to 32-bit lanes was the shuffle unit's
work and limited the kernels (models.quant_kernels).

Quantization is per output row and per group, so it does not depend on the plan: a tensor-parallel
slice of the quantized tensor is the quantized slice, as long as a column slice never cuts a group.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from models.errors import CheckpointError

GROUP = 32  # elements per group of the grouped formats (GGUF's block size)
QUANT_CHOICES = ("auto", "none", "int8", "int4")  # auto: as the checkpoint stores them (GGUF blocks kept)


MAX_TILE = 256  # output channels per tile at most (a tile's partial sums stay in L1)
LANES = 16  # float32 lanes of a 512-bit vector: the kernels' inner loop runs over whole vectors
TILES = (8, 4, 2, 1)  # for widths that are not multiples of LANES


def tile_width(n: int) -> int:
    """Output channels per tile: the widest multiple of LANES up to MAX_TILE that divides n (256 for
    most real models' widths; 192 for SmolLM2's 576 and 192, 144 and 96 for their halves), else the
    widest of TILES. Why not powers of two only: 576 would get tiles of 64, and the int4 kernel ran
    576 x 576 at 9.7 Gparam/s in tiles of 64 against 25.7 in tiles of 192 (one thread, from cache,
    Zen 5 host): per tile and input feature the loop's setup is paid over 4 vectors instead of 12."""
    whole_vectors = [t for t in range(MAX_TILE, 0, -LANES) if n % t == 0]
    return whole_vectors[0] if whole_vectors else next(t for t in TILES if n % t == 0)


def kernel_array(t: torch.Tensor) -> np.ndarray:
    """t as the numpy view a kernel takes (no copy): float16 and bfloat16 as their uint16 bits (numpy
    has no bf16, and numba no float16)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def tiled(t: torch.Tensor, width: int) -> torch.Tensor:
    """[G, ..., N] (output channels last) -> [N / width, G, ..., width]: each tile one contiguous block."""
    n = t.shape[-1]
    return t.reshape(*t.shape[:-1], n // width, width).movedim(-2, 0).contiguous()


def untiled(t: torch.Tensor) -> torch.Tensor:
    """[C, G, ..., T] -> [G, ..., C x T]: the inverse of `tiled`."""
    return t.movedim(0, -2).reshape(*t.shape[1:-1], t.shape[0] * t.shape[-1])


WORD = 4  # code bytes of one channel held side by side (grouped formats): one 32-bit word


def words_readable(w: QuantWeight) -> bool:
    """Whether the compiled kernels may read w's codes: per-channel int8 byte by byte everywhere; the
    grouped formats read a channel's WORD code bytes as one little-endian uint32 (byte b at bits 8b),
    so not on a big-endian host."""
    return w.kind == "int8" or sys.byteorder == "little"


def interleaved(q: torch.Tensor) -> torch.Tensor:
    """Grouped tiles [C, G, R, T] (R = 16 int4 bytes | 32 int8g codes) -> [C, G, R / 4, T, 4]:
    [c, g, r, t, b] is byte 4r + b of channel t's group g (int4: elements 4r + b and 4r + b + 16)."""
    tiles, groups, rows, width = q.shape
    return q.reshape(tiles, groups, rows // WORD, WORD, width).transpose(3, 4).contiguous()


def deinterleaved(q: torch.Tensor) -> torch.Tensor:
    """[C, G, R / 4, T, 4] -> [C, G, R, T]: the inverse of `interleaved`."""
    tiles, groups, words, width, _ = q.shape
    return q.transpose(3, 4).reshape(tiles, groups, words * WORD, width)


@dataclass(frozen=True)
class QuantWeight:
    """A quantized Linear weight of logical shape [N, K]; `linear` (models.quant_kernels) applies it.

    Codes are held in tiles of T output channels, [N / T, K, T] (int8) or [N / T, G, 8 | 4, T, 4]
    (int8g, int4: `interleaved`): a GEMV streams one contiguous tile after another (in the
    plain [K, N] or [G, 32 | 16, N] order the same bytes read at about half the speed). Checkpoint
    files keep the plain order (`plain`, `from_plain`); split files the held one.
    """

    kind: str
    q: torch.Tensor  # int8 [C, K, T] | int8 [C, G, 8, T, 4] | uint8 [C, G, 4, T, 4]
    scale: torch.Tensor  # float32 [N] | float16 [C, G, T]
    min: torch.Tensor | None = None  # float16 [C, G, T] (int4 only)

    @classmethod
    def from_plain(cls, kind: str, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None,
                   width: int | None = None) -> QuantWeight:
        """From the plain order: q [K, N] and scale [N] (int8), or q [G, 32 | 16, N], scale and min [G, N];
        in tiles of `width` channels (default: `tile_width`)."""
        width = width or tile_width(q.shape[-1])
        if kind == "int8":
            return cls(kind, tiled(q, width), scale.contiguous())
        return cls(kind, interleaved(tiled(q, width)), tiled(scale, width),
                   None if minimum is None else tiled(minimum, width))

    def plain(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q, scale, min in the plain order (output channels last)."""
        if self.kind == "int8":
            return untiled(self.q), self.scale, None
        return untiled(deinterleaved(self.q)), untiled(self.scale), None if self.min is None else untiled(self.min)

    @cached_property
    def tile(self) -> int:
        """Output channels per tile."""
        return self.q.shape[-1] if self.kind == "int8" else self.q.shape[3]

    @cached_property
    def shape(self) -> tuple[int, int]:
        """[N, K], worked out once: every GEMV asks (SmolLM2 asks 210 times a token)."""
        if self.kind == "int8":
            tiles, k, width = self.q.shape
            return tiles * width, k
        return self.q.shape[0] * self.tile, self.q.shape[1] * GROUP

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.q, self.scale, self.min) if t is not None)

    @cached_property
    def arrays(self) -> tuple[np.ndarray, ...]:
        """The kernel's arguments, made once (views, no copies): codes (grouped formats: a channel's
        four bytes as one uint32, [C, G, R / 4, T]), then scales (float16 as their uint16 bits) and mins."""
        arrays = [kernel_array(t) for t in (self.q, self.scale, self.min) if t is not None]
        if self.kind != "int8":
            arrays[0] = arrays[0].view(np.uint32)[..., 0]
        return tuple(arrays)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in float32 (then `dtype`): the weights the kernels compute with, exactly."""
        n, k = self.shape
        q, scale, minimum = self.plain()
        if self.kind == "int8":
            return (q.float() * scale[None, :]).T.contiguous().to(dtype)
        if self.kind == "int8g":
            w = q.float() * scale.float()[:, None, :]  # [G, 32, N]
        else:
            codes = torch.cat([q & 15, q >> 4], 1).float()  # [G, 32, N]: low nibbles, then high
            w = codes * scale.float()[:, None, :] + minimum.float()[:, None, :]
        return w.reshape(k, n).T.contiguous().to(dtype)

    def rows(self, start: int, stop: int) -> QuantWeight:
        """Output channels start..stop (a column-parallel slice: q/k/v, gate/up, LM-head rows)."""
        q, scale, minimum = self.plain()
        return QuantWeight.from_plain(self.kind, q[..., start:stop], scale[..., start:stop],
                                      None if minimum is None else minimum[:, start:stop])

    def cols(self, start: int, stop: int) -> QuantWeight:
        """Input features start..stop (a row-parallel slice: o_proj, down_proj). Per-channel scales are
        kept whole (each rank's partial sum carries the row's scale); a group is never cut."""
        if self.kind == "int8":
            return QuantWeight("int8", self.q[:, start:stop], self.scale)  # [C, K, T]: K is axis 1
        if start % GROUP or stop % GROUP:
            raise CheckpointError(f"a slice of input features {start}:{stop} cuts a quantization group of "
                                  f"{GROUP}; the plan must align slices to {GROUP}")
        g0, g1 = start // GROUP, stop // GROUP
        return QuantWeight(self.kind, self.q[:, g0:g1], self.scale[:, g0:g1],
                           None if self.min is None else self.min[:, g0:g1])

    def contiguous(self) -> QuantWeight:
        return QuantWeight(self.kind, self.q.contiguous(), self.scale.contiguous(),
                           None if self.min is None else self.min.contiguous())

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors a shard file stores for `name`, as held (the kind follows from dtypes and ranks)."""
        out = {f"{name}.q": self.q, f"{name}.scale": self.scale}
        if self.min is not None:
            out[f"{name}.min"] = self.min
        return out


def kind_of(q: torch.Tensor) -> str:
    """The format of held tensors: int8 [C, K, T] -> int8, int8 [C, G, 8, T, 4] -> int8g, uint8
    [C, G, 4, T, 4] -> int4."""
    if q.dtype == torch.int8 and q.dim() == 3:
        return "int8"
    grouped = q.dim() == 5 and q.shape[4] == WORD
    if q.dtype == torch.int8 and grouped and q.shape[2] * WORD == GROUP:
        return "int8g"
    if q.dtype == torch.uint8 and grouped and q.shape[2] * WORD == GROUP // 2:
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
            if tensor.dim() == 4 and tensor.shape[2] in (GROUP, GROUP // 2):
                tensor = interleaved(tensor)  # grouped tiles as earlier versions' split files hold them
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
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # [N, K]
    return QuantWeight.from_plain("int8", q.T.contiguous(), scale)


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
    return QuantWeight.from_plain("int4", pack_int4(q), scale.T.contiguous(), minimum.T.contiguous())


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
