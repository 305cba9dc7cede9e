"""Channels over real loopback TCP: authentication, fuzzed frames, collectives, link emulation."""

import asyncio
import logging
import os
import random
import struct
import time

import msgpack
import numpy as np
import psutil
import pytest

from transport.collectives import LinkModel, RingAllReduce, StarAllReduce, make_allreduce
from transport.errors import AuthError, ChannelClosed, CollectiveAborted
from transport.link import LinkSpec
from transport.memory import memory_mesh
from transport.mesh import build_mesh, free_ports
from transport.tcp import ChannelServer, connect

SECRET = b"s" * 32


async def _echo_server(received: list):
    async def on_channel(ch):
        received.append(ch)

    server = ChannelServer(SECRET, on_channel)
    port = await server.start("127.0.0.1", 0)
    return server, port


async def test_authenticated_peers_exchange_messages():
    received = []
    server, port = await _echo_server(received)
    try:
        client = await connect("127.0.0.1", port, SECRET)
        await client.send({"t": "ping", "n": 1})
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.01)
        assert (await received[0].recv("ping", 2))["n"] == 1
        await client.aclose()
        with pytest.raises(ChannelClosed):
            await received[0].recv("ping", 2)
    finally:
        await server.aclose()


async def test_wrong_secret_is_refused_before_any_tensor(caplog):
    received = []
    server, port = await _echo_server(received)
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(AuthError):
            await connect("127.0.0.1", port, b"w" * 32)
        # A raw peer that skips the handshake and sends a tensor frame straight away.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = msgpack.packb({"t": "ar", "s": 1, "x": {"dtype": "float32", "shape": [1], "data": b"\0" * 4}})
        writer.write(struct.pack(">I", len(body)) + body)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # dropped, nothing answered
        writer.close()
        assert received == [] and server.refused == 2
        assert "authentication failed" in caplog.text
    finally:
        await server.aclose()


def _mutations(rng: random.Random, good: bytes) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 64))
    if kind == 1:
        body = rng.randbytes(rng.randrange(0, 200))
        return struct.pack(">I", len(body)) + body
    if kind == 2:  # flip bytes of a valid frame
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 3:  # an absurd length prefix
        return struct.pack(">I", rng.randrange(1 << 28, 1 << 32)) + b"x" * 10
    return good[: rng.randrange(1, len(good))]  # truncated, then the peer hangs up


async def _send_raw(port: int, data: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 5)  # the server must close; a hang fails here
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def test_fuzzed_frames_never_hurt_the_server(caplog):
    received = []
    server, port = await _echo_server(received)
    rng = random.Random(7)
    good = struct.pack(">I", 40) + msgpack.packb({"t": "hello", "v": 1, "nonce": b"n" * 16}).ljust(40, b"\0")
    rss_before = psutil.Process(os.getpid()).memory_info().rss
    try:
        with caplog.at_level(logging.WARNING, logger="edge_llm.transport"):
            sent = 0
            while sent < 10_000:
                batch = [_send_raw(port, _mutations(rng, good)) for _ in range(50)]
                await asyncio.gather(*batch)
                sent += len(batch)
            # Still serving good peers, which can talk normally.
            client = await connect("127.0.0.1", port, SECRET)
            await client.send({"t": "ping"})
            await client.aclose()
        assert sent == 10_000 and server.refused > 9_000
        assert "dropping peer" in caplog.text
        assert psutil.Process(os.getpid()).memory_info().rss - rss_before < 100 * 2**20
    finally:
        await server.aclose()


async def test_fuzzed_frames_after_authentication_drop_only_that_peer(caplog):
    received = []
    server, port = await _echo_server(received)
    rng = random.Random(11)
    try:
        with caplog.at_level(logging.WARNING, logger="edge_llm.transport"):
            for _ in range(100):
                client = await connect("127.0.0.1", port, SECRET)
                client._proto.transport.write(_mutations(rng, b"\0\0\0\x05hello"))
                await asyncio.sleep(0)
                await client.aclose()
            good = await connect("127.0.0.1", port, SECRET)
            await good.send({"t": "ok"})
            await asyncio.sleep(0.05)
            assert (await received[-1].recv("ok", 2)) == {"t": "ok"}
            await good.aclose()
    finally:
        await server.aclose()


def _expected(xs):
    acc = xs[0].astype(np.float32)
    for x in xs[1:]:
        acc = acc + x
    return acc


@pytest.mark.parametrize("algo", [StarAllReduce, RingAllReduce])
@pytest.mark.parametrize("world", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("size", [1, 5, 4097, 1 << 22])
async def test_allreduce_sums_like_numpy_in_memory(algo, world, dtype, size):
    if size == 1 << 22 and world > 3:
        size = 1 << 20  # keep the suite fast; 4M elements run on 2-3 ranks
    mesh = memory_mesh(world)
    rng = np.random.default_rng(world * size)
    xs = [rng.standard_normal(size).astype(dtype) for _ in range(world)]

    async def run():
        ranks = [algo(r, world, mesh[r], timeout=30) for r in range(world)]
        return await asyncio.gather(*[a.allreduce(x) for a, x in zip(ranks, xs)])

    first, second = await run(), await run()
    for out in first:
        assert out.dtype == dtype
        np.testing.assert_allclose(out.astype(np.float32), _expected(xs), rtol=1e-5 if dtype == np.float32 else 2e-3,
                                   atol=1e-5 if dtype == np.float32 else 1e-2)
        assert out.tobytes() == first[0].tobytes()  # every rank holds the same bits
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second))  # and so does every run


@pytest.mark.parametrize("algorithm", ["star", "ring", "auto"])
async def test_allreduce_over_tcp_matches_numpy(algorithm):
    world = 4
    addrs = [("127.0.0.1", p) for p in free_ports(world)]
    meshes = await asyncio.gather(*[build_mesh(r, addrs, SECRET) for r in range(world)])
    try:
        algos = await asyncio.gather(*[make_allreduce(algorithm, r, world, meshes[r].channels)
                                       for r in range(world)])
        xs = [np.random.default_rng(r).standard_normal(10_000).astype(np.float32) for r in range(world)]
        outs = await asyncio.gather(*[a.allreduce(x) for a, x in zip(algos, xs)])
        for out in outs:
            np.testing.assert_allclose(out, _expected(xs), rtol=1e-5, atol=1e-5)
            assert out.tobytes() == outs[0].tobytes()
    finally:
        for m in meshes:
            await m.aclose()


async def _median_time(algo_cls, world, link, size, iters=5):
    addrs = [("127.0.0.1", p) for p in free_ports(world)]
    meshes = await asyncio.gather(*[build_mesh(r, addrs, SECRET, link=link) for r in range(world)])
    try:
        algos = [algo_cls(r, world, meshes[r].channels, timeout=60) for r in range(world)]
        x = np.ones(size, np.float32)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            await asyncio.gather(*[a.allreduce(x) for a in algos])
            times.append(time.perf_counter() - start)
        return float(np.median(times))
    finally:
        for m in meshes:
            await m.aclose()


async def test_emulated_latency_costs_star_two_hops_and_ring_two_n_minus_one():
    latency, world = 20.0, 4
    link = LinkSpec(latency_ms=latency)
    star = await _median_time(StarAllReduce, world, link, 1024)
    ring = await _median_time(RingAllReduce, world, link, 1024)
    assert 2 * latency / 1000 <= star < 3 * latency / 1000
    assert 2 * (world - 1) * latency / 1000 <= ring < (2 * (world - 1) + 2) * latency / 1000


async def test_two_ranks_exchange_in_one_hop():
    """With 2 ranks the star is a direct exchange: one link latency per all-reduce, not two."""
    latency = 20.0
    star = await _median_time(StarAllReduce, 2, LinkSpec(latency_ms=latency), 1024)
    assert latency / 1000 <= star < 1.5 * latency / 1000
    assert LinkModel(alpha=1e-3, bandwidth=1e9).star_cost(4096, 2) < 1.1e-3


async def test_emulated_low_bandwidth_makes_ring_beat_star_and_auto_agrees():
    world, size = 4, 1 << 16  # 256 KiB per rank over 10 Mbit/s: bandwidth-bound
    link = LinkSpec(latency_ms=1.0, bandwidth_mbps=10.0)
    star = await _median_time(StarAllReduce, world, link, size, iters=1)
    ring = await _median_time(RingAllReduce, world, link, size, iters=1)
    assert ring < star
    model = LinkModel(alpha=1e-3, bandwidth=10e6 / 8)
    assert model.choose(size * 4, world) == "ring"
    wifi = LinkModel(alpha=5e-3, bandwidth=125e6)  # 5 ms, 1 Gbit/s: latency-bound
    assert wifi.choose(4096 * 4, world) == "star" and wifi.choose(size * 4, world) == "star"


async def test_an_abort_releases_a_worker_waiting_in_a_later_all_reduce_of_the_step():
    """The hub aborts at the all-reduce it reached (#1 of step 8); a worker already waiting in #2
    of that step is released, not left to read the next step's messages as out of step."""
    mesh = memory_mesh(2)
    hub, worker = StarAllReduce(0, 2, mesh[0], timeout=5), StarAllReduce(1, 2, mesh[1], timeout=5)
    hub.begin(8)
    worker.begin(8)
    hub.next_seq()
    worker.next_seq()  # both were in #1; the worker went on to #2
    waiting = asyncio.ensure_future(worker.allreduce(np.ones(4, np.float32)))
    await asyncio.sleep(0.05)
    await hub.abort("step 8 failed")
    with pytest.raises(CollectiveAborted, match="step 8 failed"):
        await asyncio.wait_for(waiting, 5)
