"""A worker with no checkpoint fetches exactly its own shard files from the master, once."""

import json
import re
import signal

import aiohttp
from cluster_proc import ClusterProcess, wait_plan
from hf_reference import hf_greedy, make_hf_checkpoint

from edge.split import MANIFEST, layer_file

PROMPT = [0, 17, 250, 33, 99, 5, 120]


async def _tokens_and_fetched(url: str) -> tuple[list[int], float]:
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 200
            tokens = (await r.json())["choices"][0]["token_ids"]
        async with s.get(f"{url}/metrics") as r:
            fetched = float(re.search(r'edge_worker_fetched_bytes\{rank="1"\} (\S+)', await r.text())[1])
    return tokens, fetched


def _kill(worker) -> None:
    worker.kill()
    worker.wait(timeout=20)


async def _restart_worker(cluster: ClusterProcess, shards, running: list) -> None:
    """Kill rank 1 (whichever process it is now) and start it again with an empty checkpoint."""
    if running:
        _kill(running.pop())
    else:
        cluster.kill_worker(1)
    await wait_plan(cluster.url, [0])  # the cluster goes on without it
    running.append(cluster.start_worker(1, None, "--split-dir", str(shards), fetch=True))
    await wait_plan(cluster.url, [0, 1])


async def test_empty_worker_fetches_its_files_then_reuses_them(tmp_path):
    model = make_hf_checkpoint(tmp_path / "llama", "llama", seed=10)
    ref_tokens, _ = hf_greedy(model, PROMPT, 12)
    (tmp_path / "c").mkdir()
    cluster = ClusterProcess(model, 2, tmp_path / "c", "--split-dir", str(tmp_path / "master-split"))
    shards = tmp_path / "device-disk"  # the worker's own disk: empty
    running: list = []
    try:
        await _restart_worker(cluster, shards, running)
        tokens, fetched = await _tokens_and_fetched(cluster.url)
        assert tokens == ref_tokens
        files = json.loads((shards / MANIFEST).read_text())["files"]
        assert set(files) == {n for n in files if n.startswith("rank-1-of-2/")}  # only its own
        assert fetched == sum(e["bytes"] for e in files.values())

        await _restart_worker(cluster, shards, running)
        tokens, fetched = await _tokens_and_fetched(cluster.url)
        assert tokens == ref_tokens and fetched == 0  # nothing fetched the second time

        _kill(running.pop())  # a transfer that broke half way resumes where it stopped
        await wait_plan(cluster.url, [0])
        victim = shards / layer_file(2, 1, 1)
        data = victim.read_bytes()
        victim.unlink()
        victim.with_name(victim.name + ".part").write_bytes(data[: len(data) // 2])
        running.append(cluster.start_worker(1, None, "--split-dir", str(shards), fetch=True))
        await wait_plan(cluster.url, [0, 1])
        tokens, fetched = await _tokens_and_fetched(cluster.url)
        assert tokens == ref_tokens and fetched == len(data) - len(data) // 2
        assert victim.read_bytes() == data
    finally:
        for worker in running:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=20)
        cluster.stop()
