"""The kernels' CPU target (models.numba_target), the float kernel's two ways of streaming W and its
bf16 / fp16 weights widened as they are read (models.f32_kernels).

Oracles: the quantized kernels compiled for 256-bit vectors (LLVM's default tuning of AVX-512 Intel
cores, what numba used before) give the same bits as the 512-bit build (the vector width only
changes how many channels one instruction computes); the float32 kernel against a float64 product
within the float32 dot-product bound K u sum|w||x|.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from llvmlite import binding as llvm

from models import numba_target
from models import quant_kernels as qk
from models.f32_kernels import f32_channels, store
from models.numba_target import WIDE_VECTORS, amd_cores, numba
from models.quant import GROUP, QuantWeight, quantize, tile_width

ROOT = Path(__file__).resolve().parent.parent
U = 2.0**-24  # float32 unit roundoff

KERNEL_BITS = r"""
import json, sys
import numpy as np, torch
from models.numba_target import numba
from models.quant import quantize_int8, quantize_int4
from models.quant_kernels import gemv_rows
from models.threads import set_threads
set_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
w = torch.randn(520, 640, generator=g) * 0.04
out = {"features": numba.config.CPU_FEATURES}
for rows in (1, 3):
    x = torch.randn(rows, 640, generator=g).numpy()
    for name, q in (("int8", quantize_int8(w)), ("int4", quantize_int4(w))):
        out[f"{name}-{rows}"] = gemv_rows(x, q).view(np.uint32).tolist()
print(json.dumps(out))
"""


def run_python(code: str, *args: str, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def avx512_host() -> bool:
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512f") and features.get("avx512bw"))


@pytest.mark.parametrize("threads", ["1", "2"])
def test_quantized_kernels_give_the_same_bits_at_either_vector_width(threads):
    wide = run_python(KERNEL_BITS, threads)
    narrow = run_python(KERNEL_BITS, threads, NUMBA_CPU_FEATURES=llvm.get_host_cpu_features().flatten())
    assert narrow["features"] == llvm.get_host_cpu_features().flatten()  # the user's target, untouched
    if avx512_host():
        assert wide["features"].endswith(WIDE_VECTORS)
    else:  # nothing to widen: numba's own default
        assert wide["features"] is None
    for key in ("int8-1", "int4-1", "int8-3", "int4-3"):
        assert wide[key] == narrow[key], key


def test_a_users_target_is_left_alone():
    probe = "import json; from models.numba_target import numba; print(json.dumps([numba.config.CPU_NAME, numba.config.CPU_FEATURES]))"
    assert run_python(probe, NUMBA_CPU_NAME="haswell") == ["haswell", None]
    assert run_python(probe, NUMBA_ENABLE_AVX="0")[1] is None


@pytest.mark.parametrize(("name", "amd"), [("znver3", True), ("znver4", True), ("bdver2", True),
                                           ("sapphirerapids", False), ("rocketlake", False),
                                           ("neoverse-n1", False)])
def test_amd_cores_by_the_compile_target(monkeypatch, name, amd):
    monkeypatch.setattr(numba_target.numba.config, "CPU_NAME", name)
    assert amd_cores() is amd


@pytest.mark.parametrize("spread", [True, False])
@pytest.mark.parametrize(("start", "stop"), [(0, 64), (64, 101), (101, 104), (104, 105)])
@pytest.mark.parametrize("rows", [1, 3])
def test_float32_kernel_within_the_dot_product_bound(spread, start, stop, rows):
    """Every channel of start..stop written (blocks that 4 does not divide: the spread pass leaves
    a remainder), none outside, each within K u sum|w||x| of the float64 product."""
    k = 333
    rng = np.random.default_rng(3)
    w = rng.standard_normal((105, k)).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    out = np.full((rows, 105), np.nan, np.float32)
    f32_channels(w, x, out, start, stop, spread)
    exact = x.astype(np.float64) @ w[start:stop].T.astype(np.float64)
    bound = k * U * (np.abs(x).astype(np.float64) @ np.abs(w[start:stop]).T.astype(np.float64))
    assert (np.abs(out[:, start:stop] - exact) <= bound).all()
    assert np.isnan(np.delete(out, np.s_[start:stop], axis=1)).all()


@pytest.mark.parametrize("kind", ["int8", "int8g", "int4"])
def test_tiles_read_one_or_four_at_a_time_give_the_same_bits(kind):
    """The tile loops read however many tiles the host is given (GROUPED_STREAMS is 1 on AMD cores,
    4 elsewhere): every span gives the same bits, so both ways are checked on any host and each
    channel's sum does not depend on which one a rank took."""
    g = torch.Generator().manual_seed(1)
    w = quantize(torch.randn(40, 256, generator=g), "int4" if kind == "int4" else "int8")  # 5 tiles of 8
    if kind == "int8g":
        codes = w.plain()[0].T.reshape(40, 256 // GROUP, GROUP).permute(1, 2, 0)  # [G, 32, N]
        w = QuantWeight.from_plain("int8g", codes, (torch.rand(256 // GROUP, 40, generator=g) / 100).half())
    tiles = {"int8": qk.int8_tiles, "int8g": qk.int8g_tiles, "int4": qk.int4_tiles}[kind]
    x = torch.randn(3, 256, generator=g).numpy()
    by_span = []
    for span in (1, 4, 5):
        out = np.full((3, 40), np.nan, np.float32)
        for c in range(0, 5, span):
            tiles(*w.arrays, x, out, c, min(5, c + span), *((0,) if kind == "int8" else ()))
        by_span.append(out.view(np.uint32))
    assert not np.isnan(by_span[0].view(np.float32)).any()
    assert (by_span[0] == by_span[1]).all() and (by_span[0] == by_span[2]).all()


def sixteen_bit_weights(dtype: torch.dtype, n: int, k: int) -> torch.Tensor:
    """Random weights in `dtype` with the awkward values planted: +-0, the extremes and (fp16)
    subnormals, which the widening must carry over exactly."""
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(7)) * 0.05).to(dtype)
    info = torch.finfo(dtype)
    specials = [0.0, -0.0, info.max, -info.max, info.tiny, -info.tiny, info.tiny / 8, 1.0, -2.5]
    w.view(-1)[: len(specials)] = torch.tensor(specials).to(dtype)
    return w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spread", [True, False])
def test_sixteen_bit_weights_are_widened_exactly(dtype, spread):
    """x = the unit vectors e_0..e_K-1 (8 rows at a time, the most a GEMV serves, and one row): each
    output is one weight x 1 plus zeros, so it must equal torch's own widening of that weight exactly
    (extremes and subnormals included; -0 compares equal: a sum that starts at +0 ends at +0)."""
    n, k = 70, 24
    w = sixteen_bit_weights(dtype, n, k)
    bits = w.view(torch.int16).numpy().view(np.uint16)
    expected = w.float().numpy().T  # [K, N]: row j is column j of W
    for rows in (1, 8):
        for k0 in range(0, k, rows):
            x = np.eye(k, dtype=np.float32)[k0:k0 + rows]
            out = np.full((rows, n), np.nan, np.float32)
            f32_channels(bits, x, out, 0, n, spread, dtype == torch.bfloat16)
            assert (out == expected[k0:k0 + rows]).all()


@numba.njit(cache=False)
def _store_all(src, dst, bf16):
    for i in range(src.shape[0]):
        store(dst, i, src[i], bf16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_is_rounded_to_sixteen_bits_as_torch_rounds_it(dtype):
    """What a 16-bit KV cache keeps of a decode step's float32 keys and values (models.f32_kernels.store):
    torch's .to(dtype) bit for bit, on every kind of float32: random bit patterns (subnormals, huge,
    infinite), ties at both parities, values that overflow the dtype; a NaN stays a NaN."""
    rng = np.random.default_rng(3)
    patterns = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (np.arange(1, 2**16, 97, dtype=np.uint32) << 16) | 0x8000  # exactly halfway between two bf16
    values = np.concatenate([patterns, ties]).view(np.float32)
    values = np.concatenate([values, np.float32([0.0, -0.0, np.inf, -np.inf, 65504, 65520, 3.4e38, 1e-8, 2**-24])])
    got = np.empty(values.shape, np.uint16)
    _store_all(values, got, dtype == torch.bfloat16)
    expected = torch.from_numpy(values).to(dtype)
    nan = np.isnan(values)
    assert (got[~nan] == expected.view(torch.int16).numpy().view(np.uint16)[~nan]).all()
    assert torch.from_numpy(got.view(np.int16)).view(dtype)[torch.from_numpy(nan)].isnan().all()
    kept = np.empty(values.shape, np.float32)
    _store_all(values, kept, dtype == torch.bfloat16)  # into a float32 array: as it is
    assert np.array_equal(kept, values, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3])
def test_sixteen_bit_gemv_within_the_dot_product_bound(dtype, rows):
    """gemv_rows on a bf16 / fp16 weight against the float64 product of the widened weights, within
    K u sum|w||x|; linear() on 16-bit x rounds that float32 result once to x's dtype."""
    n, k = 130, 300
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(8)) * 0.05).to(dtype)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(9))
    y = qk.gemv_rows(x.numpy(), w)
    exact = x.double() @ w.double().T
    bound = k * U * (x.double().abs() @ w.double().abs().T)
    assert ((torch.from_numpy(y).double() - exact).abs() <= bound).all()
    xh = x.to(dtype)
    y16 = qk.linear(xh, w)
    assert y16.dtype == dtype
    assert torch.equal(y16, torch.from_numpy(qk.gemv_rows(xh.float().numpy(), w)).to(dtype))


def test_tiles_are_whole_vectors_as_wide_as_divide_the_width():
    """SmolLM2's 576- and 192-wide matrices (and their halves on 2 devices) get tiles of 12, 9 and 6
    vectors instead of the 4 of the widest power of two; widths no vector divides keep small tiles."""
    assert [tile_width(n) for n in (576, 192, 288, 96, 1536, 5632, 720)] == [192, 192, 144, 96, 256, 256, 240]
    assert [tile_width(n) for n in (72, 40, 7)] == [8, 8, 1]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_tile_width_does_not_change_the_bits(kind):
    """A channel's sum is the same sequence of operations whatever tile holds it: the same weights
    held in tiles of 64, 192 (what tile_width picks for 576) and 576 give the same output bits."""
    g = torch.Generator().manual_seed(2)
    w = quantize(torch.randn(576, 320, generator=g), kind)
    q, scale, minimum = w.plain()
    x = torch.randn(2, 320, generator=g).numpy()
    outs = []
    for width in (64, 192, 576):
        held = QuantWeight.from_plain(kind, q, scale, minimum, width)
        assert held.tile == width
        outs.append(qk.gemv_rows(x, held).view(np.uint32))
    assert w.tile == 192
    assert (outs[0] == outs[1]).all() and (outs[0] == outs[2]).all()
