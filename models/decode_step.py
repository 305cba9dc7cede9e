"""A decode step's layers on numpy arrays: the ops of models.llama.decoder_layer, the same kernels
in the same order, without a torch op or a tensor <-> array conversion between them.

Why: once the GEMVs, RMSNorm, RoPE and attention are compiled kernels, what is left of a decode
step's layer is dispatch: a torch op or a wrapper's conversions cost 1-10 us each, a kernel call
from arrays under 1 us. Measured on one process, 2 threads, median ms per token
(/tmp scratch, AMD EPYC host on a slow day): the `small` preset 2.2 -> 1.4, SmolLM2-135M 44 -> 38,
SmolLM2-135M int4 19 -> 13.4. The README's Benchmarks section has the cluster numbers.

Bit for bit the same as decoder_layer in float32: the GEMVs (models.quant_kernels.gemv_rows), RMSNorm,
attention and SiLU(gate) x up kernels (models.decode_kernels, models.attention_kernels) are the
same compiled functions on the same values; RoPE and the cache write run in one call per request
(models.step_attention) on the same elementwise helper; biases and residuals are the same float32
adds. So everything decoder_layer promises (tokens and logprobs against transformers, ranks
identical) holds unchanged, and the tests check equality, not closeness.

Between GEMVs a step reuses its buffers (each GEMV's output, the normed stream, the heads' output)
and adds each summed partial into the residual stream in place: after a GEMV has streamed a
layer's weights, a new array costs tens of microseconds (models.step_attention says why).

Serves a step of B requests of S new positions each with B x S <= ROWS (a decode step, a batch
of them, a verification of drafted tokens: where decoder_layer's kernels serve every op), each row
over its own local KV cache (models.attention.CacheAttention); prefills, larger batches and
attention nodes take decoder_layer. A weight no kernel serves goes through
models.quant_kernels.linear, as in decoder_layer.

Steps of bf16 / fp16 models too, in float32: the stream is widened exactly, every op computes in
float32 (the weights widened exactly as the GEMV reads them), the new keys and values are rounded to
the cache's dtype as they are written, and the step's output is rounded once. decoder_layer instead
rounds each op's output to the 16-bit dtype, as transformers does, and paid for it in torch's
dispatch and 16-bit elementwise ops: SmolLM2-135M in bf16 (the checkpoint as Hugging Face ships
it) decoded at 38 ms per token on one 2-thread device against a floor of 22. So the bits of a 16-bit
step are not decoder_layer's, and its logprobs are closer to float32 math than transformers' own
bf16 ones; the tests bound both against transformers as before (README, "Weights in the dtype they
ship in").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.attention import Attend, BatchAttend, CacheAttention
from models.config import LlamaConfig
from models.decode_kernels import MAX_POSITIONS, njit, rms_norm_array, silu_mul_array
from models.quant_kernels import FLOAT_WEIGHTS, GEMV_ROWS, gemv_rows, kernel_serves, linear
from models.sharding import LocalDims

if TYPE_CHECKING:
    from models.llama import LayerWeights, Weight

ROWS = min(MAX_POSITIONS, GEMV_ROWS)  # rows (B x S) up to which every op of decoder_layer is a kernel
Reduce = Callable[[torch.Tensor], torch.Tensor]  # as models.llama.Reduce: partial [B, S, D] -> sum


def no_reduce(t: torch.Tensor) -> torch.Tensor:
    """The single-device reduce: partial sums are already whole."""
    return t


def row_attends(attend: Attend, batch: int, dtype: torch.dtype) -> list[CacheAttention] | None:
    """The local cache attention of each of a step's `batch` rows, or None when some row's KV lives
    elsewhere, is not held in the activation `dtype` (or `attend` is not one per row)."""
    rows = attend.rows if isinstance(attend, BatchAttend) else [attend]
    local = all(isinstance(a, CacheAttention) and a.kv.dtype == dtype for a in rows)
    return rows if local and len(rows) == batch else None


def serves(h: torch.Tensor, attend: Attend) -> bool:
    """True when `decode_layers` runs this step: h [B, S, D] float32, bf16 or fp16 with B x S <= ROWS,
    numba present, every row's KV in a local cache of h's dtype."""
    rows = h.shape[0] * h.shape[1]
    return (njit is not None and h.dtype in FLOAT_WEIGHTS and 1 <= rows <= ROWS  # the dtypes the kernels read
            and row_attends(attend, h.shape[0], h.dtype) is not None)


def decode_layers(h: torch.Tensor, layers: Callable[[int], LayerWeights], config: LlamaConfig, dims: LocalDims,
                  attend: Attend, cos_sin: tuple[torch.Tensor, torch.Tensor], reduce: Reduce) -> torch.Tensor:
    """h: [B, S, D] -> [B, S, D] after every layer, as models.llama.decoder_layer layer by layer
    (`serves(h, attend)` must hold); `cos_sin` from models.rope.rope_tables ([S, hd] for every row,
    or [B, 1, S, hd]: each row at its own positions)."""
    batch, seqlen, width = h.shape
    cos, signed_sin = (np.ascontiguousarray(t.float().numpy().reshape(-1, seqlen, dims.head_dim)) for t in cos_sin)
    x = np.array(h.float().numpy().reshape(batch * seqlen, width))  # [B x S, D]: the residual stream, ours
    step = _Step(config, row_attends(attend, batch, h.dtype), (batch, seqlen), cos, signed_sin, reduce)
    for layer in range(config.num_layers):
        step.layer(x, layers(layer), layer)
    return torch.from_numpy(x).view(batch, seqlen, width).to(h.dtype)  # a 16-bit stream: rounded once


class _Step:
    """One decode step's constants and buffers; `layer` applies one layer to the residual stream
    [B x S, D] in place. A buffer is made at its first use and serves every layer."""

    def __init__(self, config: LlamaConfig, attends: list[CacheAttention], shape: tuple[int, int],
                 cos: np.ndarray, signed_sin: np.ndarray, reduce: Reduce):
        self.eps, self.attends, self.reduce = config.rms_norm_eps, attends, reduce
        self.shape, self.cos, self.signed_sin = shape, cos, signed_sin
        self.alone = reduce is no_reduce  # one device: the partials are whole, no tensor round trip
        self.sum_arrays = getattr(reduce, "arrays", None)  # a reduce that takes arrays (edge.rank_reduce)
        self._buffers: dict[str, np.ndarray] = {}

    def layer(self, h: np.ndarray, w: LayerWeights, layer: int) -> None:
        attn_norm, mlp_norm = w.norm_arrays
        x = rms_norm_array(h, attn_norm, self.eps, self._buffer("normed", h.shape[1]))
        h += self._sum(self._attention(x, w, layer))
        x = rms_norm_array(h, mlp_norm, self.eps, x)
        h += self._sum(self._linear(self._activation(x, w), w.w_down, w.b_down, "down"))

    def _attention(self, x: np.ndarray, w: LayerWeights, layer: int) -> np.ndarray:
        """x [B x S, D] (normed) -> the partial output projection [B x S, D] over this rank's heads;
        row b attends over its own cache."""
        seqlen = self.shape[1]
        if w.wqkv is not None:  # one GEMV for the three (models.fusion)
            y = self._linear(x, w.wqkv, w.bqkv, "qkv")
        else:
            y = np.concatenate([self._linear(x, wt, b, name) for wt, b, name in
                                ((w.wq, w.bq, "q"), (w.wk, w.bk, "k"), (w.wv, w.bv, "v"))], axis=1)
        if (head_norms := w.head_norm_arrays) is not None:  # Qwen3: each head's q and k RMS-normed first
            self._norm_heads(y, 0, w.wq.shape[0], head_norms[0])
            self._norm_heads(y, w.wq.shape[0], w.wk.shape[0], head_norms[1])
        out = self._buffer("heads", w.wq.shape[0])  # [B x S, H x hd]
        for b, attend in enumerate(self.attends):  # y [B x S, (H + 2 KV) hd]: row b's S positions
            rows, tables = slice(b * seqlen, (b + 1) * seqlen), b if self.cos.shape[0] > 1 else 0
            attend.attend_rows(layer, y[rows], w.wk.shape[0], self.cos[tables], self.signed_sin[tables], out[rows])
        return self._linear(out, w.wo, w.bo, "wo")

    def _norm_heads(self, y: np.ndarray, start: int, width: int, weight: np.ndarray) -> None:
        """y[:, start:start + width] ([B x S, heads x hd]) RMS-normed head by head with weight [hd], in
        place: the compiled RMSNorm decoder_layer's head_norm calls, on the same values."""
        part = y[:, start:start + width]  # contiguous for one row: normed where it lies
        rows = np.ascontiguousarray(part).reshape(-1, weight.shape[0])  # [B x S x heads, hd]
        rms_norm_array(rows, weight, self.eps, rows)
        if not part.flags.c_contiguous:  # rows was a copy: put it back
            part[:] = rows.reshape(part.shape)

    def _activation(self, x: np.ndarray, w: LayerWeights) -> np.ndarray:
        """x [B x S, D] (normed) -> silu(gate) * up [B x S, I] over this rank's columns."""
        if w.w_gate_up is not None:  # one GEMV for both (models.fusion)
            y = self._linear(x, w.w_gate_up, w.b_gate_up, "gate_up")
            gate, up = y[:, :w.w_gate.shape[0]], y[:, w.w_gate.shape[0]:]  # [R, I] each: contiguous for R = 1
            if y.shape[0] > 1:
                gate, up = np.ascontiguousarray(gate), np.ascontiguousarray(up)  # as the kernel takes them
        else:
            gate, up = self._linear(x, w.w_gate, w.b_gate, "gate"), self._linear(x, w.w_up, w.b_up, "up")
        return silu_mul_array(gate, up)  # decoder_layer's silu(gate) * up, in gate's place

    def _linear(self, x: np.ndarray, w: Weight, bias: torch.Tensor | None, name: str) -> np.ndarray:
        """x [R, D] float32 C-contiguous -> [R, N]: the kernel decoder_layer's `linear` picks for it,
        into the step's buffer `name` (torch's linear, for a weight no kernel serves, into its own)."""
        if kernel_serves(w):
            return gemv_rows(x, w, bias, self._buffer(name, w.shape[0]))
        if isinstance(w, torch.Tensor) and w.dtype != torch.float32:  # 16-bit, not contiguous: widened
            w, bias = w.float(), None if bias is None else bias.float()
        return linear(torch.from_numpy(x), w, bias).numpy()

    def _buffer(self, name: str, width: int) -> np.ndarray:
        """The step's [B x S, width] float32 buffer `name`, made at its first use."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[1] != width:
            buffer = self._buffers[name] = np.empty((self.shape[0] * self.shape[1], width), np.float32)
        return buffer

    def _sum(self, partial: np.ndarray) -> np.ndarray:
        """This rank's partial [B x S, D] -> the sum over ranks (the layer's `reduce`, on [B, S, D])."""
        if self.alone:
            return partial
        if self.sum_arrays is not None:
            return self.sum_arrays(partial)
        summed = self.reduce(torch.from_numpy(partial).view(*self.shape, -1))
        return summed.numpy().reshape(partial.shape)
