"""Losing a device mid-stream: the cluster re-plans on the devices that remain and every stream
goes on with exactly the tokens of an uninterrupted run; the device that returns is planned back in.
Real processes on loopback."""

import asyncio
import json
import math

import aiohttp
import psutil
import pytest
from budgets import budget_between_one_and_two_devices
from cluster_proc import ClusterProcess, wait_plan
from hf_reference import hf_greedy, make_hf_checkpoint
from safetensors import safe_open

from models.config import load_config
from models.sharding import TENSOR_SPLITS, local_dims

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
        await _three_streams_survive(cluster, reference, lambda: cluster.kill_worker(2))
        await wait_plan(cluster.url, [0, 1])
        assert list((tmp_path / "fetched").rglob("rank-1-of-2/*.safetensors"))  # its slice of the 2-device plan
        async with aiohttp.ClientSession() as s, s.get(f"{cluster.url}/metrics") as r:
            metrics = await r.text()
        # it held position 1 of 3 and now serves 1 of 2: only the rows and columns it lacked came over
        assert f'edge_worker_fetched_bytes{{rank="1"}} {float(missing_bytes(folder, 3, 1, 2, 1))}' in metrics
    finally:
        if fetcher is not None:
            fetcher.terminate()
            fetcher.wait(timeout=20)
        cluster.stop()


def missing_bytes(folder, old_world: int, old_position: int, new_world: int, new_position: int) -> int:
    """The float32 bytes of a device's slice of the new plan that its slice of the old plan lacks:
    per split tensor, the rows (or columns) of its new range outside its old range."""
    config = load_config(folder)
    old, new = local_dims(config, old_world)[old_position], local_dims(config, new_world)[new_position]
    total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        for name in fh.keys():
            kind, unit = TENSOR_SPLITS[name.split(".", 3)[-1] if name.startswith("model.layers.") else name]
            if kind not in ("out", "in") or name == "model.embed_tokens.weight":  # rank 0's embedding
                continue
            shape = fh.get_slice(name).get_shape()
            (s0, e0), (s1, e1) = old.rows(unit), new.rows(unit)
            lacking = (e1 - s1) - max(0, min(e0, e1) - max(s0, s1))
            total += lacking * (math.prod(shape) // shape[0 if kind == "out" else 1]) * 4
    return total


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
