"""Losing a device mid-stream: the cluster re-plans on the devices that remain and every stream
goes on with exactly the tokens of an uninterrupted run; the device that returns is planned back in.
Real processes on loopback."""

import asyncio
import json

import aiohttp
import psutil
import pytest
import torch
from budgets import budget_between_one_and_two_devices
from cluster_proc import ClusterProcess, wait_plan
from hf_reference import hf_greedy, make_hf_checkpoint

from edge.engine import ShardModel
from models.checkpoint import Checkpoint
from models.config import load_config
from models.llama import layer_tensor_names
from models.sharding import local_dims, split_for

PROMPT = [0, 17, 250, 33, 99, 5, 120]
LONG = 80


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=11)
    return folder, hf_greedy(folder, PROMPT, LONG)


async def stream(url: str, on_token=None, at: int = 10) -> tuple[list[int], list[float], list[dict]]:
    """One streamed greedy request of LONG tokens: its token ids, logprobs and any error events;
    `on_token()` runs once when token `at` arrives."""
    body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True, "ignore_eos": True,
            "logprobs": 1, "return_token_ids": True}
    tokens, logprobs, errors = [], [], []
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                errors.append(chunk)
                continue
            choice = chunk["choices"][0]
            tokens += choice.get("token_ids") or []
            logprobs += (choice.get("logprobs") or {}).get("token_logprobs") or []
            if len(tokens) == at and on_token is not None:
                on_token()
    return tokens, logprobs, errors


async def health(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/health") as r:
        return r.status, await r.json()


def assert_uninterrupted(result, reference) -> None:
    tokens, logprobs, errors = result
    assert not errors, errors
    assert tokens == reference[0]  # no token repeated, none missing
    assert logprobs == pytest.approx(reference[1], abs=1e-4)  # the sum order changed with the plan


async def _three_streams_survive(cluster: ClusterProcess, reference, lose) -> None:
    results = await asyncio.wait_for(asyncio.gather(
        stream(cluster.url, lose), stream(cluster.url), stream(cluster.url)), 120)
    for result in results:
        assert_uninterrupted(result, reference)


@pytest.mark.parametrize("allreduce", ["star", "ring"])
async def test_a_killed_worker_is_planned_around_and_planned_back_in(llama, tmp_path, allreduce):
    """On a ring the devices that remain are relinked in their new positions (0 -> 1 -> 0 after
    the loss, 0 -> 1 -> 2 -> 0 again once the device is back)."""
    folder, reference = llama
    cluster = ClusterProcess(folder, 3, tmp_path, "--allreduce", allreduce)
    try:
        await _three_streams_survive(cluster, reference, lambda: cluster.kill_worker(2))
        body = await wait_plan(cluster.url, [0, 1])
        assert body["lost_ranks"] == [2]
        async with aiohttp.ClientSession() as s, s.get(f"{cluster.url}/metrics") as r:
            metrics = await r.text()
        assert "edge_cluster_replans_total 1.0" in metrics and "edge_cluster_replayed_requests_total 3.0" in metrics
        worker = cluster.start_worker(2)  # the device comes back
        try:
            body = await wait_plan(cluster.url, [0, 1, 2])
            assert body["lost_ranks"] == []
            assert_uninterrupted(await stream(cluster.url), reference)
        finally:
            worker.terminate()
            worker.wait(timeout=20)
    finally:
        cluster.stop()


@pytest.mark.parametrize("allreduce", ["star", "ring"])
async def test_a_frozen_worker_is_planned_around_and_back_in_when_it_wakes(llama, tmp_path, allreduce):
    """SIGSTOP: its sockets stay open; the step times out, the silent device is dropped."""
    folder, reference = llama
    cluster = ClusterProcess(folder, 3, tmp_path, "--step-timeout", "2", "--allreduce", allreduce)
    frozen = psutil.Process(cluster.worker_pids[1])
    try:
        await _three_streams_survive(cluster, reference, frozen.suspend)
        assert (await wait_plan(cluster.url, [0, 2]))["lost_ranks"] == [1]
        frozen.resume()
        await wait_plan(cluster.url, [0, 1, 2])
        assert_uninterrupted(await stream(cluster.url), reference)
    finally:
        if frozen.status() == psutil.STATUS_STOPPED:
            frozen.resume()
        cluster.stop()


async def test_a_worker_without_a_checkpoint_fetches_its_wider_slice(llama, tmp_path):
    folder, reference = llama
    cluster = ClusterProcess(folder, 3, tmp_path)
    fetcher = None
    try:
        cluster.kill_worker(1)  # rank 1 comes back as a device with no checkpoint of its own
        await wait_plan(cluster.url, [0, 2])
        fetcher = cluster.start_worker(1, None, "--split-dir", str(tmp_path / "fetched"), fetch=True)
        await wait_plan(cluster.url, [0, 1, 2])
        result = await asyncio.wait_for(stream(cluster.url, lambda: cluster.kill_worker(2)), 120)
        assert_uninterrupted(result, reference)
        await wait_plan(cluster.url, [0, 1])
        assert list((tmp_path / "fetched").rglob("rank-1-of-2/*.safetensors"))  # its slice of the 2-device plan
    finally:
        if fetcher is not None:
            fetcher.terminate()
            fetcher.wait(timeout=20)
        cluster.stop()


async def test_two_devices_that_lose_one_go_on_with_one(llama, tmp_path):
    folder, reference = llama
    cluster = ClusterProcess(folder, 2, tmp_path)
    try:
        result = await asyncio.wait_for(stream(cluster.url, lambda: cluster.kill_worker(1)), 120)
        assert_uninterrupted(result, reference)
        body = await wait_plan(cluster.url, [0])
        assert body["plan"][0]["heads"] == load_config(folder).num_heads
    finally:
        cluster.stop()


async def test_a_loss_that_leaves_too_little_memory_answers_503_naming_why(llama, tmp_path):
    folder, reference = llama
    budget = budget_between_one_and_two_devices(folder, tmp_path)
    cluster = ClusterProcess(folder, 2, tmp_path, "--memory-budget-mb", f"{budget:.4f}", "--split-dir",
                             str(tmp_path / "split"))
    try:
        tokens, _, errors = await asyncio.wait_for(stream(cluster.url, lambda: cluster.kill_worker(1)), 120)
        assert errors and "budget" in errors[0]["error"]["message"]
        status, body = await health(cluster.url)
        assert status == 503 and body["missing_ranks"] == [1]
        worker = cluster.start_worker(1, None, "--memory-budget-mb", f"{budget:.4f}")
        try:
            await wait_plan(cluster.url, [0, 1])
            assert_uninterrupted(await stream(cluster.url), reference)
        finally:
            worker.terminate()
            worker.wait(timeout=20)
    finally:
        cluster.stop()


@pytest.mark.parametrize("qwen", [False, True], ids=["llama", "qwen2 (biases)"])
def test_a_wider_slice_reads_only_what_the_device_lacks(llama, tmp_path, monkeypatch, qwen):
    """Position 1 of 3 -> position 1 of 2 (the re-plan after device 2 is lost): the new slice equals
    one read from scratch, and the rows read are exactly those of the new slice the old one lacks."""
    folder = make_hf_checkpoint(tmp_path / "qwen2", "qwen2", seed=3) if qwen else llama[0]
    ckpt = Checkpoint(folder)
    old_dims, new_dims = local_dims(ckpt.config, 3)[1], local_dims(ckpt.config, 2)[1]
    held = ShardModel.from_checkpoint(ckpt, old_dims)
    fresh = ShardModel.from_checkpoint(ckpt, new_dims)

    read = []  # elements the checkpoint read, per call
    for method in ("read", "_read_rows", "read_weight"):
        original = getattr(Checkpoint, method)

        def counting(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            if out is not None:
                read.append(out.numel())
            return out
        monkeypatch.setattr(Checkpoint, method, counting)
    reused = ShardModel.from_checkpoint(ckpt, new_dims, held=held)

    names = {f"L{i}.{f}": n for i in range(ckpt.config.num_layers) for f, n in layer_tensor_names(i).items()}
    tensors = {f"L{i}.{f}": (getattr(held.layers(i), f), getattr(reused.layers(i), f), getattr(fresh.layers(i), f))
               for i in range(ckpt.config.num_layers) for f in vars(fresh.layers(i))}
    head = "lm_head.weight" if not ckpt.config.tie_word_embeddings else "model.embed_tokens.weight"
    names["head"], tensors["head"] = head, (held.output.lm_head, reused.output.lm_head, fresh.output.lm_head)
    tensors["norm"] = (held.output.norm, reused.output.norm, fresh.output.norm)
    lacking = 0  # elements of the new slice outside the old one, from the split table
    for key, (old, new, want) in tensors.items():
        assert (new is None) == (want is None), key
        if want is None:
            continue
        assert torch.equal(new, want), key
        name = names.get(key, "model.norm.weight")
        kind, unit = split_for(name.split(".", 3)[-1] if name.startswith("model.layers.") else name)
        if kind in ("out", "in"):
            (a, b), (c, d) = old_dims.rows(unit), new_dims.rows(unit)
            per_row = want.numel() // (d - c)
            lacking += per_row * ((d - c) - max(0, min(b, d) - max(a, c)))
        elif kind == "rank0":
            lacking += want.numel()
    assert 0 < sum(read) == lacking
