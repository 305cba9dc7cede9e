"""A model's quantized-weight kernels are compiled (or loaded from numba's cache) when the model
loads (models.kernel_warmup), not in the middle of its first request."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_quant import make_quant_checkpoint

# In a new interpreter (nothing compiled yet): load, then count the compiled signatures of the
# decode GEMV and the prefill kernel each weight will take. No forward runs.
PROBE = r"""
import sys
from models import dequant_kernels, vnni_kernels
from models.quant import QuantWeight
from models.quant_kernels import _bound
from models.threads import kernel_threads
loader, folder, method = sys.argv[1:4]
if loader == "local":
    from models.model import LocalModel
    model = LocalModel(folder, quantize=method)
    weights = [model.layers[0].w_down, model.head.lm_head]
else:
    from edge.engine import ShardModel
    from models.checkpoint import Checkpoint
    from models.sharding import local_dims
    ckpt = Checkpoint(folder).with_quant(method)
    shard = ShardModel.from_checkpoint(ckpt, local_dims(ckpt.config, 1)[0])  # a rank's load, the whole model
    weights = [shard.layers(0).w_down, shard.output.lm_head]
for w in weights:
    assert isinstance(w, QuantWeight), type(w)
    gemv = _bound(w.kind, w.tile, kernel_threads(), vnni_kernels.ENABLED)[0]
    prefill = dequant_kernels._kernel_args(w)[0]
    print(w.kind, len(gemv.signatures), len(prefill.signatures))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_quant_checkpoint(tmp_path_factory.mktemp("warmup"))


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("loader", ["local", "shard"])
def test_loading_compiles_the_kernels_its_quantized_weights_take(checkpoint, loader, method):
    out = subprocess.run([sys.executable, "-c", PROBE, loader, str(checkpoint), method], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines()]
    assert len(rows) == 2  # a layer's weight and the LM head
    for kind, gemv_signatures, prefill_signatures in rows:
        assert int(gemv_signatures) >= 1, f"{kind}: decode GEMV not compiled at load"
        assert int(prefill_signatures) >= 1, f"{kind}: prefill kernel not compiled at load"
