"""A fetching worker's wider slice after a re-plan, assembled from the files of the slice it held plus
the pieces the master serves: byte for byte the file the master split for the new plan, with only
the missing ranges fetched. In-process (the master's piece reader called directly); the transport
path is in test_replan."""

import asyncio
import json

import pytest
import torch
from hf_reference import make_hf_checkpoint
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from edge.fetch import _read_piece
from edge.reslice import HeldSlice, Reslice, assemble, load_weights, parts_of
from edge.split import (
    MANIFEST,
    SplitPlan,
    layer_file,
    rank_dir,
    sha256_file,
    split_model,
    stored_tensors,
)
from edge.weights import WeightWindow
from models.checkpoint import Checkpoint
from models.files import checkpoint_fingerprint
from models.quant import gather_quantized
from models.sharding import TENSOR_SPLITS, local_dims
from transport.errors import FrameError

FORMATS = {"float32": ("auto", "none"), "bfloat16": ("bfloat16", "none"), "int8": ("auto", "int8"),
           "int4": ("auto", "int4")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # MLP and heads in whole groups of 32 (int4); GQA: 6 heads over 2 KV heads, which the plans cut differently
    return make_hf_checkpoint(tmp_path_factory.mktemp("reslice") / "llama", "llama", seed=5, intermediate_size=512)


def test_parts_cover_the_new_range_once():
    assert [(p.start, p.stop, p.held) for p in parts_of((10, 20), (15, 30))] == [(0, 5, True), (5, 15, False)]
    assert [(p.start, p.stop, p.held, p.old_start) for p in parts_of((10, 20), (0, 30))] == \
        [(0, 10, False, 0), (10, 20, True, 0), (20, 30, False, 0)]
    assert [(p.start, p.stop, p.held) for p in parts_of((0, 10), (10, 20))] == [(0, 10, False)]
    assert [(p.start, p.stop, p.held, p.old_start) for p in parts_of((0, 30), (12, 20))] == [(0, 8, True, 12)]


def _split(checkpoint, tmp_path, world: int, fmt: str):
    dtype, quantize = FORMATS[fmt]
    return split_model(checkpoint, world, out=tmp_path / f"{fmt}-{world}", quiet=True, dtype=dtype, quantize=quantize)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("old_position", [1, 2])
def test_an_assembled_file_is_the_masters_file(checkpoint, tmp_path, fmt, old_position):
    """3 devices -> 2: the device at `old_position` of 3 serves position 1 of 2."""
    old_dir, new_dir = _split(checkpoint, tmp_path, 3, fmt), _split(checkpoint, tmp_path, 2, fmt)
    ckpt = Checkpoint(checkpoint)
    config = ckpt.config
    quantize = FORMATS[fmt][1]
    align = ckpt.with_quant(quantize).plan_align()
    old_dims, new_dims = local_dims(config, 3, None, align)[old_position], local_dims(config, 2, None, align)[1]
    held = HeldSlice(old_dir, 3, old_dims)
    manifest = json.loads((new_dir / MANIFEST).read_text())
    for name in [n for n in manifest["files"] if n.startswith(rank_dir(2, 1) + "/")]:
        requests = []

        async def fetch_piece(field, start, stop, name=name):
            requests.append((field, start, stop))
            return gather_quantized(load_safetensors(_read_piece(new_dir / name, field, start, stop)))[field]

        old = load_weights(held.file_for(name))
        weights = asyncio.run(assemble(old, old_dims, new_dims, fetch_piece))
        with safe_open(str(new_dir / name), "pt") as fh:
            expected = {k: fh.get_tensor(k) for k in fh.keys()}
        got = stored_tensors(weights)
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), (name, key)
        save_file(got, str(tmp_path / "assembled.safetensors"))  # what the worker checks: the very bytes
        assert sha256_file(tmp_path / "assembled.safetensors") == manifest["files"][name]["sha256"]
        _only_missing_ranges_were_fetched(requests, old_dims, new_dims, name)


def _only_missing_ranges_were_fetched(requests, old_dims, new_dims, name):
    """Per field, the requested ranges are exactly the new range less the old one (new coordinates)."""
    names = {"wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
             "wo": "self_attn.o_proj.weight", "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
             "w_down": "mlp.down_proj.weight", "lm_head": "lm_head.weight"}
    for field, hf in names.items():
        if field == "lm_head" and not name.endswith("head.safetensors") or \
                field != "lm_head" and name.endswith("head.safetensors"):
            continue
        unit = TENSOR_SPLITS[hf][1]
        (s0, e0), (s1, e1) = old_dims.rows(unit), new_dims.rows(unit)
        wanted = {i for i in range(s1, e1) if not s0 <= i < e0}
        asked = [i + s1 for f, a, b in requests if f == field for i in range(a, b)]
        assert sorted(asked) == sorted(wanted), (name, field)  # each missing element once, nothing held


@pytest.mark.parametrize("field,start,stop", [("nope", 0, 1), ("wq", 0, 10**6), ("wq", 5, 5), ("wq", -1, 2),
                                              ("attn_norm", 0, 1), ("../wq", 0, 1)])
def test_the_master_refuses_a_piece_it_does_not_hold(checkpoint, tmp_path, field, start, stop):
    split = _split(checkpoint, tmp_path, 2, "float32")
    with pytest.raises(FrameError):
        _read_piece(split / rank_dir(2, 1) / "layer-000.safetensors", field, start, stop)


@pytest.mark.parametrize("fmt", ["float32", "int4"])
def test_the_master_refuses_a_piece_larger_than_a_worker_asks_for(checkpoint, tmp_path, monkeypatch, fmt):
    split = _split(checkpoint, tmp_path, 2, fmt)
    monkeypatch.setattr("edge.fetch.PIECE_BYTES", 64)
    with pytest.raises(FrameError, match="too large"):
        _read_piece(split / rank_dir(2, 1) / "layer-000.safetensors", "w_up", 0, 64)


@pytest.mark.parametrize("fmt", ["float32", "int4"])
def test_a_resident_window_takes_assembled_weights_as_a_read_of_its_files_gives_them(checkpoint, tmp_path, fmt):
    old_dir, new_dir = _split(checkpoint, tmp_path, 3, fmt), _split(checkpoint, tmp_path, 2, fmt)
    ckpt = Checkpoint(checkpoint)
    align = ckpt.with_quant(FORMATS[fmt][1]).plan_align()
    old_dims, new_dims = local_dims(ckpt.config, 3, None, align)[2], local_dims(ckpt.config, 2, None, align)[1]
    reslice = Reslice(HeldSlice(old_dir, 3, old_dims), new_dims, keep=True)
    manifest = json.loads((new_dir / MANIFEST).read_text())
    for name in [n for n in manifest["files"] if n.startswith(rank_dir(2, 1) + "/")]:
        async def fetch_piece(field, start, stop, name=name):
            return gather_quantized(load_safetensors(_read_piece(new_dir / name, field, start, stop)))[field]

        reslice.keep_weights(name, asyncio.run(assemble(load_weights(reslice.held.file_for(name)), old_dims,
                                                        new_dims, fetch_piece)))
    plan = SplitPlan(2, (1.0, 1.0), checkpoint_fingerprint(checkpoint), quantize=FORMATS[fmt][1], align=align)
    assembled = reslice.kept[layer_file(2, 1, 0)]
    kept = WeightWindow(new_dir, plan, 1, ckpt.config.num_layers, 1 << 40, in_memory=reslice.kept)
    read = WeightWindow(new_dir, plan, 1, ckpt.config.num_layers, 1 << 40)
    assert kept.stats.resident_bytes == read.stats.resident_bytes
    assert kept(0).w_down is assembled["w_down"]  # taken, not read back (w_up is fused: models.fusion)
    assert kept(0).w_gate_up is not None
    assert all(not n.startswith(rank_dir(2, 1) + "/layer-") for n in reslice.kept)  # released as taken
    for layer in range(ckpt.config.num_layers):
        a, b = stored_tensors(vars(kept(layer))), stored_tensors(vars(read(layer)))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = stored_tensors(vars(kept.head)), stored_tensors(vars(read.head))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
