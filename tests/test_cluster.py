"""Real clusters on loopback: N worker processes give transformers' tokens; failures are clean."""

import functools
import subprocess
import sys

import aiohttp
import pytest
from cluster_proc import ClusterProcess
from hf_reference import hf_greedy, hf_prompt_logprobs, make_hf_checkpoint

PROMPT = [0, 17, 250, 33, 99, 5, 120]
NEW_TOKENS = 24


async def complete(url: str, prompt, **fields) -> tuple[int, dict]:
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "logprobs": 1,
            "return_token_ids": True} | fields
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as r:
        return r.status, await r.json()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=2)
    return folder, hf_greedy(folder, PROMPT, NEW_TOKENS)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    folder = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen2", "qwen2", seed=4)
    return folder, hf_greedy(folder, PROMPT, NEW_TOKENS)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3", "qwen3", seed=7)
    return folder, hf_greedy(folder, PROMPT, NEW_TOKENS)


CASES = [("llama", 1, None, "star"), ("llama", 2, None, "star"), ("llama", 3, None, "star"),
         ("llama", 4, None, "star"), ("llama", 3, "2,1,1", "star"), ("llama", 3, "auto", "star"),
         ("llama", 3, None, "ring"), ("llama", 4, "1,2,1,1", "auto"), ("qwen2", 2, None, "star"),
         ("qwen2", 3, "1,2,1", "ring"), ("qwen3", 3, None, "star"), ("qwen3", 4, None, "auto")]


@pytest.mark.parametrize(("kind", "workers", "weights", "allreduce"), CASES)
async def test_cluster_matches_transformers(request, tmp_path, kind, workers, weights, allreduce):
    folder, (ref_tokens, ref_logprobs) = request.getfixturevalue(kind)
    extra = (("--weights", weights) if weights else ()) + ("--allreduce", allreduce)
    cluster = ClusterProcess(folder, workers, tmp_path, *extra)
    try:
        status, first = await complete(cluster.url, PROMPT)
        assert status == 200, first
        choice = first["choices"][0]
        assert choice["token_ids"] == ref_tokens
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(ref_logprobs, abs=1e-4)
        _, second = await complete(cluster.url, PROMPT)
        assert second["choices"][0]["logprobs"] == choice["logprobs"]  # bit-identical run to run
        # echo + logprobs scores the prompt too (the vocabulary is split across the ranks)
        status, echoed = await complete(cluster.url, PROMPT, echo=True, logprobs=2, max_tokens=2)
        ref_prompt, ref_top = prompt_reference(folder)
        logprobs = echoed["choices"][0]["logprobs"]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["token_logprobs"][1:len(PROMPT)] == pytest.approx(ref_prompt, abs=1e-4)
        assert logprobs["token_logprobs"][len(PROMPT):] == choice["logprobs"]["token_logprobs"][:2]
        best = [max(t.values()) for t in logprobs["top_logprobs"][1:len(PROMPT)]]  # texts may coincide
        assert best == pytest.approx([top[0] for top in ref_top], abs=1e-4)
    finally:
        cluster.stop()


@functools.cache
def prompt_reference(folder) -> tuple[list[float], list[list[float]]]:
    return hf_prompt_logprobs(folder, PROMPT, 2)


@pytest.mark.parametrize(("workers", "weights", "message"), [
    (7, None, "only 6 attention heads"),
    (2, "100,1", "leave rank 1 with 0 attention heads"),
    (3, "1,1", "gives 2 numbers for 3 workers"),
])
def test_impossible_plans_are_refused_at_start(llama, workers, weights, message):
    cmd = [sys.executable, "-m", "edge_llm", "cluster", "--model", str(llama[0]), "--workers",
           str(workers), "--port", "0"] + (["--weights", weights] if weights else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_worker_with_a_different_checkpoint_is_refused(llama, qwen2, tmp_path):
    cluster = ClusterProcess(llama[0], 2, tmp_path)
    try:
        cluster.kill_worker(1)
        stranger = cluster.start_worker(1, model=qwen2[0])
        assert stranger.wait(timeout=60) == 2
        assert "checkpoint differs" in cluster.worker_log.read_text()
    finally:
        cluster.stop()
