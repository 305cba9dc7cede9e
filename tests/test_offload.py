"""Attention offload (Lamina): KV caches on attention nodes give the same tokens, grow by the
KV formula only there, and survive the loss of a node."""

import asyncio
import json

import aiohttp
import psutil
import pytest
from cluster_proc import ClusterProcess
from hf_reference import hf_greedy, make_hf_checkpoint

PROMPT = [0, 17, 250, 33, 99, 5, 120]
NEW_TOKENS = 24
MB = 1 << 20


async def complete(url: str, route: str | None, prompt=PROMPT, **fields) -> tuple[int, dict, str | None]:
    """POST /v1/completions (route forced unless None) -> status, body, and the route header."""
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "logprobs": 1,
            "return_token_ids": True} | fields
    headers = {"x-edge-route": route} if route else {}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body, headers=headers) as r:
        body = await r.json()
        return r.status, body | {"reason": r.headers.get("x-edge-route-reason")}, r.headers.get("x-edge-route")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Reference checkpoints by kind, each with transformers' greedy tokens and logprobs."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            folder = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / kind, kind, seed=6)
            cache[kind] = folder, hf_greedy(folder, PROMPT, NEW_TOKENS)
        return cache[kind]

    return get


# (kind, compute workers, attention nodes): Llama GQA 6/2 with 1 and 2 nodes, a rank whose KV
# heads span both nodes (3 workers), Qwen2 biases, Qwen3's q and k norms, and Mistral's sliding window
# on the nodes.
CASES = [("llama", 2, 1), ("llama", 2, 2), ("llama", 3, 2), ("qwen2", 2, 2), ("qwen3", 2, 1), ("mistral", 1, 2)]


@pytest.mark.parametrize(("kind", "workers", "nodes"), CASES)
async def test_offloaded_attention_is_exact(reference, tmp_path, kind, workers, nodes):
    folder, (ref_tokens, ref_logprobs) = reference(kind)
    cluster = ClusterProcess(folder, workers, tmp_path, "--attention-nodes", str(nodes))
    try:
        status, offloaded, route = await complete(cluster.url, "offload")
        assert (status, route) == (200, "offload"), offloaded
        choice = offloaded["choices"][0]
        assert choice["token_ids"] == ref_tokens
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(ref_logprobs, abs=1e-4)
        status, local, route = await complete(cluster.url, "edge")
        assert (status, route) == (200, "edge")
        assert local["choices"][0]["token_ids"] == ref_tokens
        assert local["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
            choice["logprobs"]["token_logprobs"], abs=1e-5)
        together = await asyncio.gather(*[complete(cluster.url, "offload") for _ in range(3)])
        assert [r[1]["choices"][0]["token_ids"] for r in together] == [ref_tokens] * 3  # KV kept apart
    finally:
        cluster.stop()


def _rss(pids: list[int]) -> list[int]:
    return [psutil.Process(p).memory_info().rss for p in pids]


async def test_kv_lives_only_on_the_attention_nodes(tmp_path):
    """As the context grows by T tokens, each node's RSS grows by its share of the KV formula
    (2 x layers x kv_heads x head_dim x 4 bytes per token) and the compute ranks' stays flat."""
    layers, kv_heads, head_dim = 8, 8, 64
    folder = make_hf_checkpoint(tmp_path / "wide-kv", "llama", seed=1, hidden_size=kv_heads * head_dim,
                                num_attention_heads=kv_heads, num_key_value_heads=kv_heads,
                                num_hidden_layers=layers, intermediate_size=256, max_position_embeddings=2048)
    per_token = 2 * layers * kv_heads * head_dim * 4  # 32 KiB
    first, last = 50, 550
    cluster = ClusterProcess(folder, 2, tmp_path, "--attention-nodes", "2")
    compute = [cluster.proc.pid, cluster.worker_pids[1]]
    nodes = [cluster.node_pids[0], cluster.node_pids[1]]
    body = {"prompt": PROMPT, "max_tokens": last + 10, "temperature": 0, "ignore_eos": True, "stream": True}
    samples = {}
    try:
        async with aiohttp.ClientSession() as s, s.post(f"{cluster.url}/v1/completions", json=body,
                                                        headers={"x-edge-route": "offload"}) as r:
            assert r.status == 200, await r.text()
            count = 0
            async for raw in r.content:
                if raw.startswith(b"data: {"):
                    assert b'"error"' not in raw, raw
                    count += 1
                    if count in (first, last):
                        samples[count] = (_rss(compute), _rss(nodes))
    finally:
        cluster.stop()
    grown = last - first
    compute_growth = [b - a for a, b in zip(samples[first][0], samples[last][0], strict=True)]
    node_growth = [b - a for a, b in zip(samples[first][1], samples[last][1], strict=True)]
    expected_node = per_token * grown / 2  # each node holds half of the KV heads
    for g in node_growth:
        assert abs(g - expected_node) < 0.15 * expected_node + 2 * MB, (node_growth, expected_node)
    for g in compute_growth:  # had the KV stayed local, each rank would have grown by expected_node
        assert g < 0.25 * expected_node, (compute_growth, expected_node)


async def _stream(url: str, body: dict, route: str, on_chunk) -> list[dict]:
    chunks = []
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        assert r.headers["x-edge-route"] == route, r.headers["x-edge-route-reason"]
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                on_chunk(len(chunks))
    return chunks


async def _metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith((name + " ", name + "{")):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_lost_attention_node_is_rebuilt_and_used_again(reference, tmp_path):
    folder, _ = reference("llama")
    cluster = ClusterProcess(folder, 2, tmp_path, "--attention-nodes", "2", "--step-timeout", "2",
                             "--offload-above-tokens", "40")
    body = {"prompt": PROMPT, "max_tokens": 80, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    node = None
    try:
        _, whole, _ = await complete(cluster.url, "edge", max_tokens=80, ignore_eos=True)
        expected = whole["choices"][0]["token_ids"]

        def kill_at_five(n: int) -> None:
            if n == 5:
                cluster.kill_attention_node(1)

        # two streams, routed to offload by their length and decoding in one batch, lose a node
        both = await asyncio.gather(_stream(cluster.url, body, "offload", kill_at_five),
                                    _stream(cluster.url, body, "offload", lambda n: None))
        for chunks in both:
            assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
            assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == expected  # same tokens
        assert await _metric(cluster.url, "edge_offload_kv_rebuilds_total") == 2
        assert await _metric(cluster.url, "edge_cluster_step_rows_total") > \
            await _metric(cluster.url, "edge_cluster_steps_total")  # they did share steps

        status, refused, _ = await complete(cluster.url, "offload")  # the node is gone: refused, says why
        assert status == 400 and "attention node(s) [1]" in refused["error"]["message"]
        status, local, route = await complete(cluster.url, None, max_tokens=80, ignore_eos=True)
        assert (status, route) == (200, "edge") and "neither attention nodes" in local["reason"]
        assert local["choices"][0]["token_ids"] == expected
        async with aiohttp.ClientSession() as s, s.get(f"{cluster.url}/health") as r:
            health = await r.json()
            assert r.status == 200 and health["attention_nodes"]["missing"] == [1]

        node = cluster.start_attention_node(1)  # back again: offload is used again
        for _ in range(200):
            status, again, route = await complete(cluster.url, None, max_tokens=80, ignore_eos=True)
            if route == "offload":
                break
            await asyncio.sleep(0.1)
        assert (status, route) == (200, "offload"), again
        assert "above offload_above_tokens" in again["reason"]
        assert again["choices"][0]["token_ids"] == expected
        assert await _metric(cluster.url, "edge_offload_kv_rebuilds_total") == 2
    finally:
        if node is not None:
            node.terminate()
            node.wait(timeout=10)
        cluster.stop()


async def test_hung_attention_node_times_out_and_the_request_goes_on(reference, tmp_path):
    """A node that stops answering (SIGSTOP, not dead: its sockets stay open) fails the step at
    the step timeout; the request is rebuilt on the compute ranks and completes with the same
    tokens. Resumed, the node rejoins and serves offload again."""
    folder, _ = reference("llama")
    cluster = ClusterProcess(folder, 2, tmp_path, "--attention-nodes", "1", "--step-timeout", "2")
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    node = psutil.Process(cluster.node_pids[0])
    try:
        _, whole, _ = await complete(cluster.url, "edge", max_tokens=30, ignore_eos=True)

        def stop_at_three(n: int) -> None:
            if n == 3:
                node.suspend()

        async with aiohttp.ClientSession() as s, s.post(f"{cluster.url}/v1/completions", json=body,
                                                        headers={"x-edge-route": "offload"}) as r:
            chunks = []
            async for raw in r.content:
                if raw.startswith(b"data: {"):
                    chunks.append(json.loads(raw[6:]))
                    stop_at_three(len(chunks))
        assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
        assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == whole["choices"][0]["token_ids"]
        node.resume()
        for _ in range(300):  # its heartbeat lapsed, so it rejoins and is linked again
            status, again, route = await complete(cluster.url, "offload")
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert (status, route) == (200, "offload"), again
        assert again["choices"][0]["token_ids"] == whole["choices"][0]["token_ids"][:NEW_TOKENS]
        stranger = cluster.start_attention_node(5)  # this cluster has node 0 only: refused, exit 2
        assert stranger.wait(timeout=60) == 2
        log = (tmp_path / "node-5.log").read_text()
        assert "attention node 5 is not in 0..0" in log and "Traceback" not in log
    finally:
        if node.status() == psutil.STATUS_STOPPED:
            node.resume()
        cluster.stop()


async def test_a_cluster_without_attention_nodes_refuses_them(reference, tmp_path):
    folder, _ = reference("llama")
    cluster = ClusterProcess(folder, 1, tmp_path)
    try:
        status, body, _ = await complete(cluster.url, "offload")
        assert status == 400 and "no attention nodes are configured" in body["error"]["message"]
        stranger = cluster.start_attention_node(0)
        assert stranger.wait(timeout=60) == 2
        log = (tmp_path / "node-0.log").read_text()
        assert "runs without attention nodes" in log and "Traceback" not in log
    finally:
        cluster.stop()
