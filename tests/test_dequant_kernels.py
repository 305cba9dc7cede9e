"""A prefill through quantized weights (models.dequant_kernels) against QuantWeight.dequantize.

`dequantize()` is the weight every reference in tests/test_quant.py is built from (transformers with
the dequantized weights), so the blocks the kernels write must hold exactly its values, for every
format, tile width and block boundary; the product is then torch's own GEMM.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

from models import dequant_kernels, quant_kernels
from models.dequant_kernels import _kernel_args, prefill_linear
from models.quant import GROUP, QuantWeight, quantize
from models.quant_kernels import CHUNKED_ROWS, GEMV_ROWS, kernel_serves, linear


def weight(kind: str, n: int, k: int, seed: int) -> QuantWeight:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    if kind != "int8g":
        return quantize(w, kind)
    codes = torch.randint(-127, 128, (k // GROUP, GROUP, n), dtype=torch.int8, generator=gen)  # plain [G, 32, N]
    scales = (torch.rand(k // GROUP, n, generator=gen) * 0.01 + 1e-4).half()
    return QuantWeight.from_plain("int8g", codes, scales)


SHAPES = [(256, 64), (320, 96), (40, 32), (1536, 576)]  # tiles of 256, 64, 8, 256 output channels


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("kind", ["int8", "int8g", "int4"])
def test_the_blocks_hold_exactly_the_dequantized_weights(kind, n, k):
    w = weight(kind, n, k, seed=n + k)
    kernel, args = _kernel_args(w)
    tile = w.tile
    expected = w.dequantize()
    for c0 in range(0, n // tile, 3):  # blocks of three tiles, the last one short
        c1 = min(n // tile, c0 + 3)
        block = torch.full((k, (c1 - c0) * tile), float("nan"))  # W^T's columns of those tiles
        kernel(*args, c0, c1, block.numpy())
        assert torch.equal(block, expected[c0 * tile:c1 * tile].T)


@pytest.mark.parametrize("rows", [GEMV_ROWS + 1, 37])
@pytest.mark.parametrize("kind", ["int8", "int8g", "int4"])
def test_a_prefill_multiplies_by_the_dequantized_weights(kind, rows, monkeypatch):
    """Blocks smaller than the matrix (a remainder block too): the product is the GEMM's with W."""
    w = weight(kind, 320, 96, seed=rows)
    monkeypatch.setattr(dequant_kernels, "BLOCK_PARAMS", 3 * 64 * 96)  # tiles of 64: blocks of 3, 2
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(1))
    expected = F.linear(x, w.dequantize())
    got = prefill_linear(x, w)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # two GEMMs' float32 rounding


@pytest.mark.parametrize("kind", ["int8", "int8g", "int4"])
def test_a_row_parallel_slice_prefills_from_its_strided_codes(kind):
    """A rank's o_proj / down_proj slice (QuantWeight.cols) is a strided view of the codes: the
    kernels read it in place, as the words it holds."""
    whole = weight(kind, 1024, 128, seed=3)  # four tiles of 256: the slice is not contiguous
    w = whole.cols(32, 96)
    assert not w.q.is_contiguous()
    x = torch.randn(GEMV_ROWS + 3, 64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(prefill_linear(x, w), F.linear(x, w.dequantize()), rtol=1e-6, atol=1e-6)


def test_linear_prefills_without_building_the_whole_float32_matrix(monkeypatch):
    """More rows than the GEMV kernels serve go through the blocks; `dequantize()` is never called."""
    w = weight("int4", 256, 64, seed=2)
    expected = F.linear(torch.ones(2, 12, 64), w.dequantize())
    monkeypatch.setattr(QuantWeight, "dequantize", lambda self, dtype=None: pytest.fail("whole matrix built"))
    got = linear(torch.ones(2, 12, 64), w)  # [B, S, K] with B x S = 24 rows
    assert got.shape == (2, 12, 256)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("kind", "rows", "passes"), [("int4", CHUNKED_ROWS, True), ("int8g", GEMV_ROWS + 1, True),
                                                      ("int4", CHUNKED_ROWS + 1, False), ("int8", GEMV_ROWS + 1, False)])
def test_a_few_rows_more_than_a_gemv_takes_are_passes_of_it(kind, rows, passes, monkeypatch):
    """int4 and int8g take up to CHUNKED_ROWS rows (a short prompt, a batch of decode steps) through
    passes of their GEMV kernel, GEMV_ROWS rows each; more rows, and int8 past GEMV_ROWS (its
    multi-row GEMV is slower than its GEMM), dequantize blocks. Either way the product is W's."""
    w = weight(kind, 256, 64, seed=rows)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(5))
    dequantized = []
    monkeypatch.setattr(quant_kernels, "prefill_linear", lambda x, w: dequantized.append(x.shape[0]) or prefill_linear(x, w))
    got = linear(x, w)
    assert dequantized == ([] if passes else [rows])
    torch.testing.assert_close(got, F.linear(x, w.dequantize()), rtol=1e-3, atol=1e-3)  # integer kernels: x in int8


def test_a_big_endian_host_reads_grouped_codes_only_through_torch(monkeypatch):
    """The grouped formats' kernels read four code bytes as one little-endian word (models.quant
    .words_readable): on a big-endian host neither the GEMV nor the blocks take them, and every
    product goes through the dequantized matrix; per-channel int8, read byte by byte, still does."""
    monkeypatch.setattr(sys, "byteorder", "big")
    assert kernel_serves(weight("int8", 256, 64, seed=1))
    w = weight("int4", 256, 64, seed=1)
    assert not kernel_serves(w)
    built = []
    dequantize = QuantWeight.dequantize
    monkeypatch.setattr(QuantWeight, "dequantize", lambda self, dtype=torch.float32: built.append(1) or dequantize(self, dtype))
    x = torch.randn(CHUNKED_ROWS + 1, 64, generator=torch.Generator().manual_seed(6))
    expected = F.linear(x, dequantize(w))
    torch.testing.assert_close(prefill_linear(x, w), expected, rtol=0, atol=0)
    assert built == [1]
