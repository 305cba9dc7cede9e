"""bf16 and fp16 checkpoints served in the dtype they ship in, against transformers in that dtype.

Tolerance: transformers computes a bf16 model with bf16 activations (norms and softmax in float32),
and so do we. Where the two differ is which side of a bf16 rounding a value lands on: a decode
step's GEMVs (models.f32_kernels) sum the same exact float32 products as torch's bf16 GEMV in
another order before the one rounding of each output to bf16, and with N devices each rank rounds
its partial output projections to bf16 before the float32 all-reduce, one extra rounding of the
same size as the ones the reference makes everywhere. Either way our result and the reference are
two roundings of the same exact computation, each as far from it as the reference's own roundings,
so their distance is bounded by twice the reference's own deviation from exact arithmetic, which we
measure per checkpoint as the largest |logprob(transformers, dtype) - logprob(transformers, float32)|
over the same tokens: tol = 2 x that (about 0.1 for bf16, 0.015 for fp16 on these checkpoints).
Prefill (more than 8 rows) takes torch's own GEMM, as transformers does.
"""

import functools
import re

import aiohttp
import pytest
import torch
from cluster_proc import ClusterProcess
from hf_reference import hf_forced_logprobs, hf_greedy, make_hf_checkpoint
from safetensors import safe_open
from test_cluster import complete

from models.config import load_config
from models.sharding import local_dims

PROMPT = [0, 17, 250, 33, 99, 5, 120]
NEW_TOKENS = 24
ELEMENT_BYTES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}


@functools.cache
def checkpoint(root, dtype: torch.dtype, seed: int):
    """A GQA llama (6 heads / 2 KV heads) saved by transformers in `dtype`, its greedy run in that
    dtype (eager attention, the op order we follow) and the derived logprob tolerance."""
    folder = make_hf_checkpoint(root / f"{dtype}-{seed}", "llama", seed=seed, dtype=dtype)
    tokens, logprobs = hf_greedy(folder, PROMPT, NEW_TOKENS, dtype=dtype, attn="eager")
    exact = hf_forced_logprobs(folder, PROMPT, tokens, torch.float32)
    tol = 2 * max(abs(a - b) for a, b in zip(logprobs, exact, strict=True))
    return folder, tokens, logprobs, tol


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("dtypes")


async def weight_bytes(url: str) -> dict[int, int]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        text = await r.text()
    found = re.findall(r'^edge_worker_weight_bytes\{rank="(\d+)"\} (\S+)$', text, re.M)
    return {int(rank): int(float(value)) for rank, value in found}


def expected_bytes(folder, workers: int, element_bytes: int) -> dict[int, int]:
    """Each rank's parameters (its heads, KV heads, MLP columns, vocabulary rows; rank 0 also the
    embedding table) x the element size."""
    cfg = load_config(folder)
    d, hd = cfg.hidden_size, cfg.head_dim
    out = {}
    for dims in local_dims(cfg, workers):
        layer = 2 * d + 2 * dims.n_local_heads * hd * d + 2 * dims.n_local_kv_heads * hd * d \
            + 3 * dims.local_intermediate * d
        params = cfg.num_layers * layer + dims.local_vocab * d + d + (cfg.vocab_size * d if dims.rank == 0 else 0)
        out[dims.rank] = params * element_bytes
    return out


def parameter_count(folder) -> int:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return sum(f.get_tensor(name).numel() for name in f.keys())  # noqa: SIM118 (safe_open has no iter)


CASES = [(torch.bfloat16, seed, workers) for seed in (0, 1, 2) for workers in (1, 2, 3)] + \
        [(torch.float16, 0, 1), (torch.float16, 0, 2), (torch.float16, 1, 3)]


@pytest.mark.parametrize(("dtype", "seed", "workers"), CASES, ids=lambda v: str(v).replace("torch.", ""))
async def test_half_precision_cluster_matches_transformers(root, tmp_path, dtype, seed, workers):
    folder, ref_tokens, ref_logprobs, tol = checkpoint(root, dtype, seed)
    assert 0 < tol < 0.25  # the dtype's own noise on these checkpoints, not a blanket allowance
    cluster = ClusterProcess(folder, workers, tmp_path)  # --dtype auto: the checkpoint's own
    try:
        status, body = await complete(cluster.url, PROMPT)
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["token_ids"] == ref_tokens
        got = choice["logprobs"]["token_logprobs"]
        assert got == pytest.approx(ref_logprobs, abs=tol)
        resident = await weight_bytes(cluster.url)
        assert resident == expected_bytes(folder, workers, ELEMENT_BYTES[dtype])
        if workers == 1:  # independent of the plan: every parameter once, at 2 bytes
            assert resident[0] == parameter_count(folder) * 2
    finally:
        cluster.stop()


async def test_bf16_checkpoint_served_in_float32_is_exact(root, tmp_path):
    """--dtype float32 upcasts a bf16 checkpoint exactly: transformers' float32 run to 1e-4, 4 bytes each."""
    folder, *_ = checkpoint(root, torch.bfloat16, 0)
    ref_tokens, ref_logprobs = hf_greedy(folder, PROMPT, NEW_TOKENS, dtype=torch.float32)
    cluster = ClusterProcess(folder, 2, tmp_path, "--dtype", "float32")
    try:
        status, body = await complete(cluster.url, PROMPT)
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == ref_tokens
        assert body["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(ref_logprobs, abs=1e-4)
        assert await weight_bytes(cluster.url) == expected_bytes(folder, 2, 4)
    finally:
        cluster.stop()


async def test_bf16_split_files_stream_through_the_window(root, tmp_path):
    """Under a memory budget the split files, the window and rank 0's mapped embedding rows hold bf16."""
    folder, ref_tokens, ref_logprobs, tol = checkpoint(root, torch.bfloat16, 1)
    split = tmp_path / "split"
    cluster = ClusterProcess(folder, 2, tmp_path, "--memory-budget-mb", "0.45", "--split-dir", str(split))
    try:
        status, body = await complete(cluster.url, PROMPT)
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == ref_tokens
        assert body["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(ref_logprobs, abs=tol)
        async with aiohttp.ClientSession() as s, s.get(f"{cluster.url}/metrics") as r:
            metrics = await r.text()
        assert re.search(r'^edge_window_bytes_read_total\{rank="1"\} [1-9]', metrics, re.M), metrics
    finally:
        cluster.stop()
    manifest = (split / "manifest.json").read_text()
    assert '"dtype": "bfloat16"' in manifest
    with safe_open(str(split / "rank-1-of-2" / "layer-000.safetensors"), framework="pt") as f:
        assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.bfloat16}  # noqa: SIM118


async def test_fetching_worker_gets_bf16_shard_files(root, tmp_path):
    """A worker without a checkpoint fetches its shard in the master's dtype: 2 bytes per parameter."""
    from test_fetch import _restart_worker

    folder, ref_tokens, ref_logprobs, tol = checkpoint(root, torch.bfloat16, 2)
    (tmp_path / "c").mkdir()
    cluster = ClusterProcess(folder, 2, tmp_path / "c", "--split-dir", str(tmp_path / "master-split"))
    shards, running = tmp_path / "device-disk", []
    try:
        await _restart_worker(cluster, shards, running)
        status, body = await complete(cluster.url, PROMPT)
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == ref_tokens
        assert body["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(ref_logprobs, abs=tol)
        assert (await weight_bytes(cluster.url))[1] == expected_bytes(folder, 2, 2)[1]
    finally:
        for worker in running:
            worker.kill()
            worker.wait(timeout=20)
        cluster.stop()
    with safe_open(str(shards / "rank-1-of-2" / "layer-000.safetensors"), framework="pt") as f:
        assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.bfloat16}  # noqa: SIM118
