"""models.int4_vnni: x held in integers as its contract says, and the integer int4 kernel's bits
(the same on any thread count and prefetch distance; chosen by gemv_rows where it applies).
Its error against the exact product is tested with the other kernels' (tests/test_quant.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import int4_vnni
from models import quant_kernels as qk
from models.quant import quantize

vnni_host = pytest.mark.skipif(not int4_vnni.HOST_HAS_VNNI, reason="the host has no AVX-512 VNNI")


def awkward_rows() -> np.ndarray:
    """[3, 256] float32: Gaussian groups at scales 1e-3..1e3, a group of zeros, one of subnormals and
    one below 2^-100, a group up to 1e37 (its sum stays finite), one element 1000x its group, and exact powers of two."""
    g = np.random.default_rng(3)
    x = (g.standard_normal((3, 256)) * np.repeat(10.0 ** g.integers(-3, 4, (3, 8)), 32, 1)).astype(np.float32)
    x[0, 0:32] = 0.0
    x[0, 32:64] = np.float32(1e-41) * np.arange(32)  # subnormal
    x[1, 0:32] *= np.float32(2.0**-110)
    x[1, 32:64] = np.float32(1e37) * g.uniform(-1, 1, 32).astype(np.float32)
    x[2, 40] *= 1000.0
    x[2, 64:96] = 2.0 ** g.integers(-20, 20, 32)
    return x


def test_activation_digits_hold_each_group_of_x_to_its_stated_precision():
    """Per group: 2^-S with S = min(120, 20 - e) where the largest |x| is below 2^e; digits
    P0 in -65..65 and P1, P2 in -64..63; x_j within 2^-(S+1) of (2^14 P0 + 2^7 P1 + P2) 2^-S;
    the second number the group's float32 sum of x, as a tree (16 apart, then 8, 4, 2, 1)."""
    x = awkward_rows()
    words, xf = int4_vnni.activation_digits(x)
    assert words.shape == (3, 8, int4_vnni.DIGITS, 8) and words.dtype == np.uint32
    digits = words.view(np.int8).astype(np.int64)  # [R, G, 3, 32]
    groups = x.reshape(3, 8, 32).astype(np.float64)
    shift = np.minimum(120, 20 - np.frexp(np.abs(groups).max(-1))[1])  # [R, G]
    assert (xf[..., 0] == (2.0 ** -shift).astype(np.float32)).all()
    assert (np.abs(digits[:, :, 0]) <= 65).all()
    assert ((digits[:, :, 1:] >= -64) & (digits[:, :, 1:] <= 63)).all()
    held = (digits[:, :, 0] * 2**14 + digits[:, :, 1] * 2**7 + digits[:, :, 2]) * 2.0 ** -shift[..., None]
    assert (np.abs(groups - held) <= 2.0 ** -(shift[..., None] + 1)).all()
    sums = x.reshape(3, 8, 32)
    while sums.shape[-1] > 1:  # j + 16 onto j, then 8, 4, 2, 1 apart, in float32
        half = sums.shape[-1] // 2
        sums = sums[..., :half] + sums[..., half:]
    assert sums.dtype == np.float32 and (xf[..., 1] == sums[..., 0]).all()


def test_a_group_of_x_with_nan_or_inf_makes_its_row_nan():
    x = awkward_rows()
    x[1, 100], x[2, 7] = np.nan, np.inf
    _, xf = int4_vnni.activation_digits(x)
    assert np.isnan(xf[1, 3, 0]) and np.isnan(xf[2, 0, 0])
    assert np.isfinite(xf[0, :, 0]).all()


@vnni_host
def test_the_same_bits_on_any_thread_count_and_prefetch_distance():
    """Integer sums do not depend on their order, and the float steps are the same per channel."""
    w = quantize(torch.randn(5 * 64, 256, generator=torch.Generator().manual_seed(1)), "int4")  # 5 tiles
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2)).numpy()
    outs = []
    for parallel, parts in ((False, 1), (True, 2), (True, 3)):
        for ahead in (0, 1, 2, 50):
            out = np.full((3, 320), np.nan, np.float32)
            int4_vnni.kernels(parallel)["int4v"](*w.arrays, x, out, parts, ahead)
            outs.append(out.view(np.uint32))
    assert not np.isnan(outs[0].view(np.float32)).any()
    assert all((o == outs[0]).all() for o in outs[1:])


@vnni_host
def test_gemv_rows_takes_the_integer_kernel_where_tiles_are_whole_vectors(monkeypatch):
    """Tiles of 64 channels: the integer kernel's bits when enabled, the float kernel's when not;
    tiles of 8 (72 channels): the float kernel either way."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 128, generator=g).numpy()
    parts = qk.kernel_threads()
    for n, whole_vectors in ((128, True), (72, False)):
        w = quantize(torch.randn(n, 128, generator=g), "int4")
        assert (w.tile % int4_vnni.LANES == 0) == whole_vectors
        floating = np.empty((1, n), np.float32)
        qk._kernel("int4")(*w.arrays, x, floating, parts)
        integer = floating
        if whole_vectors:
            integer = np.empty((1, n), np.float32)
            int4_vnni.kernels(False)["int4v"](*w.arrays, x, integer, 1, 0)
            assert not np.array_equal(integer, floating)  # the two kernels round differently
        monkeypatch.setattr(int4_vnni, "ENABLED", True)
        assert np.array_equal(qk.gemv_rows(x, w), integer)
        monkeypatch.setattr(int4_vnni, "ENABLED", False)
        assert np.array_equal(qk.gemv_rows(x, w), floating)
