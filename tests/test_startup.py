"""Start-up failures are one line and an exit status of 2, at once: a port in use (HTTP or workers)
before or without a traceback, a spawned worker that cannot load its shard without waiting for it."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest
from hf_reference import make_hf_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=1)


def edge_llm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_llm", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def taken_port():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


def test_a_spawned_worker_that_cannot_load_stops_the_cluster_at_once(model, tmp_path):
    """Rank 1 (three times rank 0's share) does not fit the budget that rank 0 fits: the worker exits
    with its reason and the cluster command stops with both lines, instead of waiting for it."""
    out = edge_llm("cluster", "--model", str(model), "--workers", "2", "--weights", "1,3", "--memory-budget-mb",
                   "0.5", "--split-dir", str(tmp_path / "split"), "--port", "0")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "too small for rank 1" in out.stderr
    assert re.search(r"worker rank 1 \(pid \d+\) exited with status 2 before joining", out.stderr), out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_http_port_in_use_is_one_line_before_anything_starts(model, taken_port):
    out = edge_llm("cluster", "--model", str(model), "--workers", "2", "--port", str(taken_port))
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"cannot serve HTTP on 127.0.0.1:{taken_port}" in out.stderr
    assert "Traceback" not in out.stderr and "worker rank" not in out.stdout  # nothing was spawned


def test_worker_port_in_use_is_one_line(model, tmp_path, taken_port):
    with socket.create_server(("127.0.0.1", 0)) as free:
        http_port = free.getsockname()[1]
    (tmp_path / "secret").write_text("startup-secret-" + "z" * 20)
    config = tmp_path / "cluster.toml"
    config.write_text(f"""
model = "{model}"
secret_file = "{tmp_path / 'secret'}"
worker_port = {taken_port}
http_host = "127.0.0.1"
http_port = {http_port}

[[nodes]]
id = "a"
address = "127.0.0.1"

[[nodes]]
id = "b"
address = "127.0.0.1"
""")
    out = edge_llm("serve", "--config", str(config))
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"cannot listen for workers on 127.0.0.1:{taken_port}" in out.stderr
    assert "Traceback" not in out.stderr
