"""Devices and the cluster around them: a device without the secret, with a wrong one, or without a
master says so and exits; no device outlives its cluster; a worker that dies is reaped and can be
restarted with the command the cluster prints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from cluster_proc import ClusterProcess, wait_plan
from hf_reference import make_hf_checkpoint

from transport.mesh import free_ports


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=12)


def worker(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "EDGE_LLM_SECRET"}
    return subprocess.run([sys.executable, "-m", "edge_llm", "worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=base | (env or {}))


def test_a_worker_without_the_secret_says_it_needs_one(model):
    out = worker("--model", str(model), "--rank", "1", "--master", "127.0.0.1:9")
    assert out.returncode == 2 and "needs the cluster's secret" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_worker_with_a_wrong_secret_stops_at_once(model, tmp_path):
    cluster = ClusterProcess(model, 2, tmp_path)
    try:
        out = worker("--model", str(model), "--rank", "1", "--master", f"127.0.0.1:{cluster.worker_port}",
                     env={"EDGE_LLM_SECRET": "not-the-cluster-secret-at-all"}, timeout=30)
        assert out.returncode == 2 and "does not accept this device" in out.stderr, out.stderr[-1000:]
        assert "Traceback" not in out.stderr
    finally:
        cluster.stop()


def test_a_worker_without_a_master_gives_up_after_the_master_timeout(model):
    (port,) = free_ports(1)  # nobody listens here
    began = time.monotonic()
    out = worker("--model", str(model), "--rank", "1", "--master", f"127.0.0.1:{port}", "--master-timeout", "1",
                 env={"EDGE_LLM_SECRET": "s" * 32}, timeout=60)
    assert out.returncode == 2 and "unreachable for 1 s" in out.stderr, out.stderr[-1000:]
    assert time.monotonic() - began < 30


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_spawned_devices_die_with_a_killed_cluster(model, tmp_path):
    cluster = ClusterProcess(model, 3, tmp_path)
    pids = list(cluster.worker_pids.values())
    os.killpg(cluster.proc.pid, 0)  # the cluster is up
    cluster.proc.send_signal(signal.SIGKILL)  # no chance to stop its workers itself
    cluster.proc.wait()
    deadline = time.monotonic() + 20
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids)
    cluster.worker_pids.clear()
    cluster.stop()


async def test_a_dead_worker_is_reaped_and_restarts_with_the_printed_command(model, tmp_path):
    cluster = ClusterProcess(model, 2, tmp_path)
    restarted = None
    try:
        pid = cluster.worker_pids[1]
        cluster.kill_worker(1)
        await wait_plan(cluster.url, [0])
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and time.monotonic() < deadline:  # reaped, not a zombie
            time.sleep(0.1)
        assert not psutil.pid_exists(pid)
        hint = cluster.restart_hint(1)
        assert hint.startswith("edge-llm worker --model") and "--rank 1" in hint and "--secret-file" in hint
        command = [sys.executable, "-m", "edge_llm", *hint.split()[1:]]  # as a user pastes it
        restarted = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_plan(cluster.url, [0, 1])
    finally:
        if restarted is not None:
            restarted.terminate()
            restarted.wait(timeout=20)
        cluster.stop()


def test_the_restart_hint_parser_reads_the_cluster_line():
    line = "edge-llm: worker rank 3 (pid 12) exited with status -9; restart it with: edge-llm worker --rank 3"
    assert re.search(r"restart it with: (.*)$", line)[1] == "edge-llm worker --rank 3"


DRAIN_TOKENS = 24  # at 20-50 ms per link hop: seconds of streaming, long enough to be caught mid-way


async def _stream_lines(url: str, on_first=None) -> list[str]:
    import aiohttp

    body = {"prompt": [0, 17, 250], "max_tokens": DRAIN_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}
    lines = []
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as r:
        try:
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 1 and on_first is not None:
                        on_first()
        except aiohttp.ClientPayloadError:
            lines.append("CUT")  # the server closed the stream mid-way
    return lines


async def test_sigterm_drains_requests_in_flight_then_stops(model, tmp_path):
    cluster = ClusterProcess(model, 2, tmp_path, "--link-latency-ms", "20", "--drain-timeout", "60")
    try:
        lines = await _stream_lines(cluster.url, lambda: cluster.proc.send_signal(signal.SIGTERM))
        assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
        assert len(lines) == DRAIN_TOKENS + 1  # every token, then [DONE]
        assert cluster.proc.wait(timeout=30) == 0
        log = (tmp_path / "cluster-2.log").read_text()
        assert "Traceback" not in log
    finally:
        cluster.stop()
    assert "draining 1 request(s) for up to 60 s" in cluster.stdout_text()


async def test_a_second_signal_stops_at_once(model, tmp_path):
    cluster = ClusterProcess(model, 2, tmp_path, "--link-latency-ms", "50", "--drain-timeout", "600")

    def twice() -> None:
        cluster.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        cluster.proc.send_signal(signal.SIGINT)

    try:
        began = time.monotonic()
        lines = await _stream_lines(cluster.url, twice)
        assert lines[-1] == "CUT" and len(lines) < DRAIN_TOKENS + 1  # cut short, not drained
        assert cluster.proc.wait(timeout=30) == 0 and time.monotonic() - began < 30
    finally:
        cluster.stop()


async def test_a_worker_started_without_a_rank_takes_the_free_one(model, tmp_path):
    """The README's `worker --model DIR --master HOST:PORT --secret-file F`, as written."""
    cluster = ClusterProcess(model, 3, tmp_path)
    restarted = None
    try:
        cluster.kill_worker(2)
        await wait_plan(cluster.url, [0, 1])
        restarted = subprocess.Popen(
            [sys.executable, "-m", "edge_llm", "worker", "--model", str(model), "--master",
             f"127.0.0.1:{cluster.worker_port}", "--secret-file", str(cluster.secret_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_plan(cluster.url, [0, 1, 2])
        full = subprocess.run([sys.executable, "-m", "edge_llm", "worker", "--model", str(model), "--master",
                               f"127.0.0.1:{cluster.worker_port}", "--secret-file", str(cluster.secret_file)],
                              capture_output=True, text=True, timeout=60)
        assert full.returncode == 2 and "every worker rank (1..2) is taken" in full.stderr
    finally:
        if restarted is not None:
            restarted.terminate()
            restarted.wait(timeout=20)
        cluster.stop()
