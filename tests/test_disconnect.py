"""A client that leaves a non-streamed request stops it: the generation ends, its slot is freed, a
request abandoned in the queue never runs, and none of it counts as a server error. And time spent
in the queue counts against --request-timeout, and a body that stalls is refused (408)."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from cluster_proc import ClusterProcess
from hf_reference import make_hf_checkpoint


@pytest.fixture(scope="module")
def slow_cluster(tmp_path_factory):
    """One generation slot, 20 ms links (a 100-token request takes many seconds), a 4 s request timeout,
    1 s for a request body to arrive."""
    model = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=6)
    proc = ClusterProcess(model, 2, tmp_path_factory.mktemp("slow"), "--max-running", "1",
                          "--link-latency-ms", "20", "--request-timeout", "4", "--body-timeout", "1")
    yield proc
    proc.stop()


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        return await r.text()


def value(metrics: str, pattern: str) -> float:
    found = re.findall(rf"^{pattern} (\S+)$", metrics, re.M)
    return sum(float(v) for v in found)


async def leave_after(url: str, seconds: float) -> None:
    """POST a long non-streamed completion and hang up after `seconds`."""
    body = {"prompt": "The edge is", "max_tokens": 100, "ignore_eos": True, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(f"{url}/v1/completions", json=body) as r:
                await r.read()


async def until_settled(url: str, cancelled: float, timeout: float = 10.0) -> str:
    """/metrics once nothing runs and `cancelled` requests have been counted as such (or at the timeout:
    a step in flight finishes before its request's handler ends)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        metrics = await scrape(url)
        done = value(metrics, "edge_requests_running") == 0 and \
            value(metrics, "edge_requests_cancelled_total") >= cancelled
        if done or asyncio.get_running_loop().time() > deadline:
            return metrics
        await asyncio.sleep(0.1)


async def test_leaving_a_whole_request_stops_it_and_a_queued_one_never_runs(slow_cluster):
    url = slow_cluster.url
    before = await scrape(url)
    # the first takes the only slot; the second waits in the queue; both clients hang up
    await asyncio.gather(leave_after(url, 2.0), leave_after(url, 1.5))
    metrics = await until_settled(url, value(before, "edge_requests_cancelled_total") + 2)
    assert value(metrics, "edge_requests_running") == 0
    assert value(metrics, "edge_requests_cancelled_total") - value(before, "edge_requests_cancelled_total") == 2
    assert value(metrics, r'edge_requests_total\{route="/v1/completions",status="499"\}') == 2
    assert value(metrics, r'edge_requests_total\{route="[^"]*",status="5\d\d"\}') == 0
    # nothing runs after they left (the queued one's prefill included), once the step that was in
    # flight when the first client hung up (a few hundred ms over these links) has finished
    await asyncio.sleep(1.0)
    steps = value(await scrape(url), "edge_cluster_steps_total")
    await asyncio.sleep(1.0)
    assert value(await scrape(url), "edge_cluster_steps_total") == steps
    log = (slow_cluster.secret_file.parent / "cluster-2.log").read_text()
    assert "Traceback" not in log and "internal error" not in log, log
    # and the slot is free again: a short request is served at once
    body = {"prompt": "The edge is", "max_tokens": 2, "temperature": 0}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()


async def test_time_in_the_queue_counts_against_the_request_timeout(slow_cluster):
    """With the only slot taken, a request that waits in the queue gets its 504 when its own timeout
    (4 s) runs out, counted from its arrival, not 4 s after it finally got the slot."""
    url = slow_cluster.url
    body = {"prompt": "The edge is", "max_tokens": 100, "ignore_eos": True, "temperature": 0}
    loop = asyncio.get_running_loop()

    async def timed(delay: float) -> tuple[int, float]:
        await asyncio.sleep(delay)
        began = loop.time()
        async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions", json=body) as r:
            await r.read()
            return r.status, loop.time() - began

    (first, first_s), (queued, queued_s) = await asyncio.gather(timed(0.0), timed(1.0))
    assert first == 504 and queued == 504
    assert 3.5 < queued_s < 5.0, queued_s  # its own 4 s, though the slot was busy for 3 of them


async def test_a_body_that_never_finishes_arriving_is_refused_with_408(slow_cluster):
    host, port = slow_cluster.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\": \"The")  # and then nothing more
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    body = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert status.startswith(b"HTTP/1.1 408"), status
    assert b"did not arrive within 1 s" in body
    async with aiohttp.ClientSession() as s, s.get(f"{slow_cluster.url}/health") as r:
        assert r.status == 200
