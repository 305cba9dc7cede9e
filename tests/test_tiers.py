"""Routing between the edge cluster and a cloud tier: the pure policy, and live failover."""

import json
from contextlib import contextmanager

import aiohttp
import pytest
from budgets import budget_between_one_and_two_devices
from cluster_proc import ClusterProcess, wait_health
from hf_reference import make_hf_checkpoint

from scheduler.router import Policy, RouteInputs, RouteRefused, decide

MB = 1 << 20
# 120 tokens x 1 KiB of KV: 120 KiB; the edge has 1000 MB free, of which the policy lets KV use half.
BASE = dict(prompt_tokens=20, max_tokens=100, kv_bytes_per_token=1024, edge_free_kv_bytes=1000 * MB,
            edge_queue_full=False, edge_up=True, cloud_configured=True, cloud_up=True,
            offload_free_kv_bytes=4000 * MB)
TIGHT = {"edge_free_kv_bytes": 200_000}  # 50% of it is less than 120 KiB
SLOW_EDGE = {"edge_ttft_s": 0.5, "edge_tpot_s": 0.1, "latency_target_s": 2.0}  # edge ~10.5 s for 100 tokens


@pytest.mark.parametrize(("changes", "route", "reason"), [
    ({}, "edge", "room"),
    (TIGHT | {"offload_nodes": 2}, "offload", "exceeds 50% of the compute devices' free memory"),
    (TIGHT | {"offload_nodes": 2, "offload_free_kv_bytes": 100_000}, "cloud", "no attention node can take it"),
    (TIGHT, "cloud", "no attention node can take it"),
    (TIGHT | {"cloud_configured": False}, "edge", "serving on the edge"),
    ({"policy": Policy(offload_above_tokens=64)}, "cloud", "no attention node can take it"),
    ({"offload_nodes": 1, "policy": Policy(offload_above_tokens=64)}, "offload", "above offload_above_tokens"),
    ({"offload_nodes": 1, "policy": Policy(cloud_above_tokens=64)}, "cloud", "above cloud_above_tokens"),
    ({"policy": Policy(edge_kv_fraction=0.0001)}, "cloud", "exceeds 0% of"),
    ({"edge_queue_full": True}, "cloud", "queue is full"),
    ({"cloud_up": False}, "edge", "cloud tier is down"),
    ({"cloud_up": False, "edge_queue_full": True}, "edge", "cloud tier is down"),
    ({"edge_up": False}, "cloud", "edge cluster is down"),
    (SLOW_EDGE | {"cloud_ttft_s": 0.1, "cloud_tpot_s": 0.01}, "cloud", "latency target 2000 ms"),
    (SLOW_EDGE, "cloud", "not measured yet"),
    (SLOW_EDGE | {"cloud_ttft_s": 0.1, "cloud_tpot_s": 0.5}, "edge", "room"),  # the cloud is slower still
    (SLOW_EDGE | {"latency_target_s": 20.0}, "edge", "room"),
    ({"forced": "cloud", "edge_queue_full": True}, "cloud", "forced"),
    ({"forced": "edge"}, "edge", "forced"),
    ({"forced": "offload", "offload_nodes": 1}, "offload", "forced"),
    ({"cloud_configured": False, "edge_queue_full": True}, "edge", "room"),
    # 4 choices of 120 tokens need 480 KiB of KV: more than half of 800 KB, though one fits
    ({"edge_free_kv_bytes": 800_000, "sequences": 4}, "cloud", "KV cache of 0.5 MB (4 sequences) exceeds 50%"),
    ({"edge_free_kv_bytes": 800_000}, "edge", "room"),
])
def test_policy_table(changes, route, reason):
    decision = decide(RouteInputs(**(BASE | changes)))
    assert decision.route == route and reason in decision.reason


@pytest.mark.parametrize("changes", [
    {"forced": "cloud", "cloud_up": False}, {"forced": "offload"}, {"forced": "edge", "edge_up": False},
    {"forced": "offload", "offload_nodes": 2, "edge_up": False}, {"edge_up": False, "cloud_configured": False},
])
def test_impossible_routes_are_refused(changes):
    with pytest.raises(RouteRefused):
        decide(RouteInputs(**(BASE | changes)))


async def _post(url, route=None, stream=False):
    body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0, "stream": stream}
    headers = {"x-edge-route": route} if route else {}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body, headers=headers) as r:
        text = await r.text()
        return r.status, r.headers.get("x-edge-route"), r.headers.get("x-edge-route-reason"), text


@contextmanager
def tiers(tmp_path, cloud_model, edge_model):
    """A 1-device edge-llm as the cloud tier and a 2-device edge cluster that routes to it. The edge's
    memory budget holds the model on two devices, not on one, so a lost worker takes the edge down
    (it cannot re-plan onto the device that remains)."""
    (tmp_path / "cloud").mkdir()
    (tmp_path / "edge").mkdir()
    budget = budget_between_one_and_two_devices(edge_model, tmp_path / "budget")
    cloud = ClusterProcess(cloud_model, 1, tmp_path / "cloud")
    try:
        edge = ClusterProcess(edge_model, 2, tmp_path / "edge", "--cloud", f"{cloud.url}/v1",
                              "--step-timeout", "2", "--memory-budget-mb", f"{budget:.4f}",
                              "--split-dir", str(tmp_path / "split"))
        try:
            yield cloud, edge
        finally:
            edge.stop()
    finally:
        cloud.stop()


async def test_edge_and_cloud_with_failover(tmp_path):
    with tiers(tmp_path, make_hf_checkpoint(tmp_path / "big-model", "qwen2", seed=3),
               make_hf_checkpoint(tmp_path / "small-model", "llama", seed=3)) as (cloud, edge):
        status, route, reason, text = await _post(edge.url)
        assert (status, route) == (200, "edge") and '"small-model"' in text
        status, route, reason, text = await _post(edge.url, "cloud")
        assert (status, route) == (200, "cloud") and '"big-model"' in text and "forced" in reason
        status, route, _, text = await _post(edge.url, "cloud", stream=True)
        assert status == 200 and route == "cloud" and text.rstrip().endswith("data: [DONE]")
        status, _, _, text = await _post(edge.url, "nowhere")
        assert status == 400 and "x-edge-route" in text

        edge.kill_worker(1)  # the edge goes down: new requests go to the cloud and say so
        await wait_health(edge.url, 503)
        status, route, reason, text = await _post(edge.url)
        assert (status, route) == (200, "cloud") and "edge cluster is down" in reason

        cloud.stop()  # and with the cloud gone too, a clear error instead of a hang
        status, _, _, text = await _post(edge.url)
        assert status == 503 and "error" in text


async def test_cloud_down_sends_requests_to_the_edge(tmp_path):
    model = make_hf_checkpoint(tmp_path / "m", "llama", seed=4)
    with tiers(tmp_path, model, model) as (cloud, edge):
        cloud.stop()
        status, _, _, text = await _post(edge.url, "cloud")  # forced onto a dead tier: 503, no hang
        assert status == 503 and "cloud" in text
        status, route, reason, _ = await _post(edge.url)
        assert (status, route) == (200, "edge") and "cloud tier is down" in reason


async def test_edge_failure_mid_stream_migrates_to_the_cloud(tmp_path):
    model = make_hf_checkpoint(tmp_path / "m", "llama", seed=5)
    body = {"prompt": "Once upon a time", "max_tokens": 100, "temperature": 0, "stream": True,
            "ignore_eos": True}
    chunks = []
    with tiers(tmp_path, model, model) as (_, edge):
        async with aiohttp.ClientSession() as s, s.post(f"{edge.url}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    if len(chunks) == 3:
                        edge.kill_worker(1)
                elif line == "data: [DONE]":
                    chunks.append("DONE")
    assert chunks[-1] == "DONE"
    events = chunks[:-1]
    assert not any("error" in c for c in events), [c for c in events if "error" in c]
    assert len(events) > 3 + 1  # the cloud carried on after the edge died
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
