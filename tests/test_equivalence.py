"""`edge-llm generate --json` against transformers' greedy output on checkpoints transformers made."""

import json
import subprocess
import sys

import pytest
from hf_reference import hf_greedy, make_hf_checkpoint

from edge_llm.cli import main

PROMPT = [0, 17, 250, 33, 99, 5, 120]
NEW_TOKENS = 24
CASES = [(kind, seed, legacy) for kind in ("llama", "qwen2", "qwen3", "mistral")
         for seed in (0, 1) for legacy in (False, True)]


def run_generate_json(capsys, model, prompt_ids, n=NEW_TOKENS, extra=()):
    ids = ",".join(map(str, prompt_ids))
    code = main(["generate", "--model", str(model), "--prompt-ids", ids, "--max-tokens", str(n),
                 "--json", *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize(("kind", "seed", "legacy"), CASES)
def test_greedy_tokens_and_logprobs_match_transformers(tmp_path, capsys, kind, seed, legacy):
    model = make_hf_checkpoint(tmp_path / kind, kind, seed=seed, legacy_form=legacy)
    ref_tokens, ref_logprobs = hf_greedy(model, PROMPT, NEW_TOKENS)
    ours = run_generate_json(capsys, model, PROMPT)
    assert ours["token_ids"] == ref_tokens
    assert ours["logprobs"] == pytest.approx(ref_logprobs, abs=1e-4)
    assert len(ours["token_ids"]) >= 20 or ref_tokens[-1] in (1, 3)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_a_long_prompt_prefills_like_transformers(tmp_path, capsys, kind):
    """A prompt of more positions than a decode step's kernels take runs the op-by-op prefill."""
    model = make_hf_checkpoint(tmp_path / kind, kind, seed=9)
    prompt = [(7 * i + 3) % 384 for i in range(40)]
    ref_tokens, ref_logprobs = hf_greedy(model, prompt, 8)
    ours = run_generate_json(capsys, model, prompt, n=8)
    assert ours["token_ids"] == ref_tokens
    assert ours["logprobs"] == pytest.approx(ref_logprobs, abs=1e-4)


@pytest.mark.parametrize("rope", ["default", "linear", "dynamic", "yarn", "llama3"])
def test_every_rope_type_generates_like_transformers(tmp_path, capsys, rope):
    # max_position_embeddings 24 < prompt + output, so dynamic NTK really rescales mid-generation.
    model = make_hf_checkpoint(tmp_path / rope, "llama", seed=3, rope=rope, max_position_embeddings=24)
    ref_tokens, ref_logprobs = hf_greedy(model, PROMPT, 16)
    ours = run_generate_json(capsys, model, PROMPT, n=16)
    assert ours["token_ids"] == ref_tokens
    assert ours["logprobs"] == pytest.approx(ref_logprobs, abs=1e-4)


@pytest.mark.parametrize("workers", [1, 3])
def test_console_script_json(tmp_path, workers):
    """The `edge-llm` entry point as a user runs it, on one device and on an emulated cluster."""
    model = make_hf_checkpoint(tmp_path / "llama", "llama", seed=5)
    ref_tokens, ref_logprobs = hf_greedy(model, PROMPT, 20)
    cmd = [sys.executable, "-m", "edge_llm", "generate", "--model", str(model), "--prompt-ids",
           ",".join(map(str, PROMPT)), "--max-tokens", "20", "--json", "--workers", str(workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["token_ids"] == ref_tokens
    assert result["logprobs"] == pytest.approx(ref_logprobs, abs=1e-4)
    assert all(len(top) == 5 and top[0][1] >= top[-1][1] for top in result["top_logprobs"])
