"""models.vnni_kernels: x held in integers as its contract says, and the integer int4 and int8g
kernels' bits (the same on any thread count and prefetch distance; chosen by gemv_rows where they
apply). Their error against the exact product is tested with the other kernels' (tests/test_quant.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_quant import int8g_weight

from models import quant_kernels as qk
from models import vnni_kernels
from models.quant import QuantWeight, quantize

vnni_host = pytest.mark.skipif(not vnni_kernels.HOST_HAS_VNNI, reason="the host has no AVX-512 VNNI")


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
    then the group's float32 sum of x, as a tree (16 apart, then 8, 4, 2, 1), and each digit's sum."""
    x = awkward_rows()
    words, xf = vnni_kernels.activation_digits(x)
    assert words.shape == (3, 8, vnni_kernels.DIGITS, 8) and words.dtype == np.uint32
    assert xf.shape == (3, 8, 2 + vnni_kernels.DIGITS)
    digits = words.view(np.int8).astype(np.int64)  # [R, G, 3, 32]
    groups = x.reshape(3, 8, 32).astype(np.float64)
    shift = np.minimum(120, 20 - np.frexp(np.abs(groups).max(-1))[1])  # [R, G]
    assert (xf[..., 0] == (2.0 ** -shift).astype(np.float32)).all()
    assert (np.abs(digits[:, :, 0]) <= 65).all()
    assert ((digits[:, :, 1:] >= -64) & (digits[:, :, 1:] <= 63)).all()
    held = (digits[:, :, 0] * 2**14 + digits[:, :, 1] * 2**7 + digits[:, :, 2]) * 2.0 ** -shift[..., None]
    assert (np.abs(groups - held) <= 2.0 ** -(shift[..., None] + 1)).all()
    assert (xf[..., 2:] == digits.sum(-1)).all()
    sums = x.reshape(3, 8, 32)
    while sums.shape[-1] > 1:  # j + 16 onto j, then 8, 4, 2, 1 apart, in float32
        half = sums.shape[-1] // 2
        sums = sums[..., :half] + sums[..., half:]
    assert sums.dtype == np.float32 and (xf[..., 1] == sums[..., 0]).all()


def test_a_group_of_x_with_nan_or_inf_makes_its_row_nan():
    x = awkward_rows()
    x[1, 100], x[2, 7] = np.nan, np.inf
    _, xf = vnni_kernels.activation_digits(x)
    assert np.isnan(xf[1, 3, 0]) and np.isnan(xf[2, 0, 0])
    assert np.isfinite(xf[0, :, 0]).all()


def quantized(kind: str, n: int, k: int, seed: int) -> QuantWeight:
    """A random [n, k] weight in int4, or in int8g with signed codes over the whole -127..127."""
    if kind == "int8g":
        return int8g_weight(n, k, seed)
    return quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), "int4")


@vnni_host
@pytest.mark.parametrize("kind", ["int4", "int8g"])
def test_the_same_bits_on_any_thread_count_and_prefetch_distance(kind):
    """Integer sums do not depend on their order, and the float steps are the same per channel."""
    w = quantized(kind, 5 * 64, 256, seed=1)  # 5 tiles of 64
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2)).numpy()
    outs = []
    for parallel, parts in ((False, 1), (True, 2), (True, 3)):
        for ahead in (0, 1, 2, 50):
            out = np.full((3, 320), np.nan, np.float32)
            vnni_kernels.kernels(parallel)[kind + "v"](*w.arrays, x, out, parts, ahead)
            outs.append(out.view(np.uint32))
    assert not np.isnan(outs[0].view(np.float32)).any()
    assert all((o == outs[0]).all() for o in outs[1:])


@vnni_host
@pytest.mark.parametrize("kind", ["int4", "int8g"])
def test_gemv_rows_takes_the_integer_kernel_where_tiles_are_whole_vectors(monkeypatch, kind):
    """Tiles of 64 channels: the integer kernel's bits when enabled, the float kernel's when not;
    tiles of 8 (72 channels): the float kernel either way."""
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(3)).numpy()
    parts = qk.kernel_threads()
    for n, whole_vectors in ((128, True), (72, False)):
        w = quantized(kind, n, 128, seed=4)
        assert (w.tile % vnni_kernels.LANES == 0) == whole_vectors
        floating = np.empty((1, n), np.float32)
        qk._kernel(kind)(*w.arrays, x, floating, parts)
        integer = floating
        if whole_vectors:
            integer = np.empty((1, n), np.float32)
            vnni_kernels.kernels(False)[kind + "v"](*w.arrays, x, integer, 1, 0)
            assert not np.array_equal(integer, floating)  # the two kernels round differently
        monkeypatch.setattr(vnni_kernels, "ENABLED", True)
        assert np.array_equal(qk.gemv_rows(x, w), integer)
        monkeypatch.setattr(vnni_kernels, "ENABLED", False)
        assert np.array_equal(qk.gemv_rows(x, w), floating)
