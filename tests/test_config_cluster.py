"""A 'real' cluster from a TOML file: `edge-llm serve` on the master, `edge-llm worker` per device."""

import asyncio
import os
import subprocess
import sys

import aiohttp
import pytest
from hf_reference import hf_greedy, make_hf_checkpoint

from transport.mesh import free_ports

PROMPT = [0, 17, 250, 33, 99, 5, 120]


async def test_serve_and_worker_from_a_cluster_file(tmp_path):
    model = make_hf_checkpoint(tmp_path / "llama", "llama", seed=9)
    ref_tokens, _ = hf_greedy(model, PROMPT, 12)
    (tmp_path / "secret").write_text("config-secret-" + "y" * 20)
    worker_port, http_port = free_ports(2)
    config = tmp_path / "cluster.toml"
    config.write_text(f"""
model = "{model}"
secret_file = "{tmp_path / 'secret'}"
worker_port = {worker_port}
http_host = "127.0.0.1"
http_port = {http_port}
step_timeout = 3.0

[[nodes]]
id = "laptop"
address = "127.0.0.1"
weight = 2.0

[[nodes]]
id = "jetson"
address = "127.0.0.1"
weight = 1.0

[attention]
nodes = 1

[policy]
offload_above_tokens = 16
""")
    log = open(tmp_path / "log", "w")
    key = "config-api-key"  # from the environment, as the README says: a key never sits in the file
    serve = subprocess.Popen([sys.executable, "-m", "edge_llm", "serve", "--config", str(config)],
                             stdout=log, stderr=log, env=os.environ | {"EDGE_LLM_API_KEY": key})
    worker = subprocess.Popen([sys.executable, "-m", "edge_llm", "worker", "--config", str(config),
                               "--rank", "1"], stdout=log, stderr=log)
    node = subprocess.Popen([sys.executable, "-m", "edge_llm", "worker", "--config", str(config),
                             "--role", "attention", "--node", "0"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{http_port}"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s:
            for _ in range(600):
                try:
                    async with s.get(f"{url}/health") as r:
                        if r.status == 200 and (await r.json())["attention_nodes"]["ready"]:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
            for route in ("offload", "edge"):  # 7 + 12 tokens > offload_above_tokens; then a short one
                async with s.post(f"{url}/v1/completions", json=body) as r:
                    assert r.status == 200, (tmp_path / "log").read_text()[-2000:]
                    assert r.headers["x-edge-route"] == route, r.headers["x-edge-route-reason"]
                    assert (await r.json())["choices"][0]["token_ids"] == ref_tokens[:body["max_tokens"]]
                body["max_tokens"] = 4
        async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 401  # without the key
    finally:
        for p in (node, worker, serve):
            p.terminate()
            p.wait(timeout=20)
        log.close()


def test_bad_policy_keys_are_refused(tmp_path):
    from edge_llm.config import ConfigError, load_cluster_config

    config = tmp_path / "cluster.toml"
    config.write_text('model = "m"\n[[nodes]]\naddress = "127.0.0.1"\n[policy]\noffload_above = 5\n')
    with pytest.raises(ConfigError, match=r"unknown \[policy\] key\(s\) \['offload_above'\]"):
        load_cluster_config(config)


def test_the_example_cluster_file_parses():
    from pathlib import Path

    from edge_llm.config import load_cluster_config

    config = load_cluster_config(Path(__file__).parent.parent / "configs" / "cluster.example.toml")
    assert config.weights == [2.0, 1.0, 1.0] and config.attention_nodes == 1
    assert config.http.policy.offload_above_tokens == 4096 and config.http.cloud is None
