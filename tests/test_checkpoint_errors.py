"""Corrupt or incomplete checkpoints fail at load with one message naming the file and tensor."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from edge_llm.cli import main

NAME = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def broken(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    return folder


def _edit_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _error(capsys, folder) -> str:
    assert main(["generate", "--model", str(folder), "--max-tokens", "2", "hi"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    return err


def test_missing_tensor(broken, capsys):
    _edit_tensors(broken, lambda t: t.pop(NAME))
    err = _error(capsys, broken)
    assert NAME in err and "missing" in err


def test_wrong_shape(broken, capsys):
    _edit_tensors(broken, lambda t: t.__setitem__(NAME, t[NAME][:, :-1].contiguous()))
    err = _error(capsys, broken)
    assert NAME in err and "model.safetensors" in err and "shape" in err


def test_truncated_safetensors(broken, capsys):
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    err = _error(capsys, broken)
    assert "model.safetensors" in err and "truncated" in err


def test_garbage_header(broken, capsys):
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert "corrupt" in _error(capsys, broken)


def test_unknown_architecture(broken, capsys):
    raw = json.loads((broken / "config.json").read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(raw))
    err = _error(capsys, broken)
    assert "config.json" in err and "GPT2LMHeadModel" in err and "not supported" in err


def test_missing_tokenizer(broken, capsys):
    (broken / "tokenizer.json").unlink()
    err = _error(capsys, broken)
    assert "tokenizer.json" in err and "missing" in err


def test_missing_shard_of_an_index(broken, capsys):
    index = {"metadata": {}, "weight_map": {n: "model-00002-of-00002.safetensors"
                                            for n in load_file(broken / "model.safetensors")}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    err = _error(capsys, broken)
    assert "model-00002-of-00002.safetensors" in err and "missing" in err


def test_missing_config(broken, capsys):
    (broken / "config.json").unlink()
    assert "config.json" in _error(capsys, broken)
