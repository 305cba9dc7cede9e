"""The kernels' CPU target (models.numba_target) and the float32 one-row kernel's two ways of
streaming W (models.f32_kernels).

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
from models.f32_kernels import f32_channels
from models.numba_target import WIDE_VECTORS, amd_cores
from models.quant import GROUP, QuantWeight, quantize

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
            tiles(*w.arrays, x, out, c, min(5, c + span))
        by_span.append(out.view(np.uint32))
    assert not np.isnan(by_span[0].view(np.float32)).any()
    assert (by_span[0] == by_span[1]).all() and (by_span[0] == by_span[2]).all()
