"""models.prefetch: the int8 kernel asks for rows ahead of the ones it reads; that changes no bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import quant_kernels as qk
from models.prefetch import CACHE_LINE, PREFETCH_ROWS, prefetch_ahead
from models.quant import quantize


@pytest.mark.parametrize("k", [333, 512])  # an odd K ends in a remainder row
@pytest.mark.parametrize("rows", [1, 3])
def test_the_int8_kernel_gives_the_same_bits_at_every_prefetch_distance(k, rows):
    g = torch.Generator().manual_seed(5)
    w = quantize(torch.randn(72, k, generator=g), "int8")  # tiles of 8 channels
    x = torch.randn(rows, k, generator=g).numpy()
    kernel = qk._kernel("int8")
    outs = []
    for ahead in (0, 1, 2, 16, 32, k - 1, k + 40):  # up to and past the last row
        out = np.full((rows, 72), np.nan, np.float32)
        kernel(*w.arrays, x, out, 1, ahead)
        outs.append(out.view(np.uint32))
    assert not np.isnan(outs[0].view(np.float32)).any()
    assert all((o == outs[0]).all() for o in outs[1:])
    reference = x.astype(np.float64) @ w.dequantize().double().numpy().T
    assert np.allclose(outs[0].view(np.float32), reference, rtol=1e-4, atol=1e-3)


def test_gemv_rows_uses_the_hosts_prefetch_distance():
    """What gemv_rows runs is the kernel at PREFETCH_ROWS (0 on AMD cores, 16 elsewhere)."""
    g = torch.Generator().manual_seed(6)
    w = quantize(torch.randn(64, 256, generator=g), "int8")
    x = torch.randn(1, 256, generator=g).numpy()
    out = np.empty((1, 64), np.float32)
    qk._kernel("int8")(*w.arrays, x, out, 1, PREFETCH_ROWS)
    assert (qk.gemv_rows(x, w).view(np.uint32) == out.view(np.uint32)).all()
    assert PREFETCH_ROWS in (0, 16) and CACHE_LINE == 64


@pytest.mark.parametrize("shape", [(3, 5, 100), (2, 4, 8, 16)])
def test_prefetch_ahead_compiles_for_both_tile_layouts_and_changes_nothing(shape):
    """Rows of int8 tiles (1-D blocks) and groups of grouped tiles (2-D), up to and past the end."""
    q = np.arange(np.prod(shape), dtype=np.uint8 if len(shape) == 3 else np.uint32).reshape(shape)
    before = q.copy()
    for c in range(shape[0]):
        for k in range(shape[1] + 3):
            prefetch_ahead(q, c, k, 2)
    assert (q == before).all()
