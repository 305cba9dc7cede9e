"""A worker's steps on the data link (edge.worker_steps): read on the compute thread in the order the
master sent them, after the control commands sent before each, stale ones dropped, bad ones reported."""

import asyncio
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from edge.kv_stores import KVStores
from edge.messages import CloseRequest, OpenRequest, Replan, Step
from edge.tensors import pack_tensor
from edge.worker_steps import CommandCount, DataSteps
from models.attention import KVCache
from transport.codec import encode
from transport.collectives import STEP_SHIFT
from transport.errors import CollectiveTimeout, FailureCause, PeerFailed
from transport.fastpath import STEP, DataLink

REPLAN = Replan(epoch=2, world_size=2, position=1, weights=[1.0, 1.0])


def step(number: int, rids: list[str]) -> Step:
    return Step(rids, number, pack_tensor(torch.zeros(1, 1, 4)), True)


@pytest.fixture
def links():
    a, b = socket.socketpair()
    hub, worker = DataLink(a, "rank 1", 2.0), DataLink(b, "rank 0", 2.0)
    yield hub, worker
    hub.close()
    worker.close()


@pytest.fixture
def compute():
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute-test")
    yield pool
    pool.shutdown(wait=True)


def test_a_step_waits_for_the_commands_sent_before_it():
    count = CommandCount()
    ready: list[bool] = []
    waiting = threading.Thread(target=lambda: ready.append(count.ready(2, timeout=5.0)))
    waiting.start()
    count.handled_one(OpenRequest("r1", 8))
    waiting.join(0.1)
    assert waiting.is_alive()  # one of its two commands is handled
    count.handled_one(None)  # a command that did not parse counts too: the master sent it
    waiting.join(5)
    assert ready == [True]


def test_a_step_sent_before_a_replan_the_worker_handled_is_stale():
    count = CommandCount()
    for msg in (OpenRequest("r1", 8), REPLAN, CloseRequest("r1")):
        count.handled_one(msg)
    assert not count.ready(1, timeout=0.1)  # sent after the open, before the re-plan
    assert count.ready(2, timeout=0.1)  # sent after the re-plan
    assert count.ready(3, timeout=0.1)


def test_a_step_whose_commands_never_come_times_out():
    with pytest.raises(CollectiveTimeout, match="control command 1"):
        CommandCount().ready(1, timeout=0.05)


async def test_the_loop_runs_steps_in_order_each_after_its_commands(links, compute):
    hub, worker = links
    count, ran = CommandCount(), []
    loop = DataSteps(worker, count, lambda msg: ran.append((msg.step, msg.rids)), compute, 2.0)
    try:
        hub.send(STEP, 1, encode(step(1, ["r1"]).wire()))  # needs the OpenRequest it was sent after
        hub.send(STEP, 1, encode(step(2, ["r1"]).wire()))
        await asyncio.sleep(0.1)
        assert ran == []
        count.handled_one(OpenRequest("r1", 8))
        await _until(lambda: len(ran) == 2)
        assert ran == [(1, ["r1"]), (2, ["r1"])]
        count.handled_one(REPLAN)  # the master re-planned: a step it sent before is abandoned
        hub.send(STEP, 1, encode(step(3, ["r1"]).wire()))
        hub.send(STEP, 2, encode(step(4, ["r1"]).wire()))
        await _until(lambda: len(ran) == 3)
        assert ran[-1] == (4, ["r1"])
    finally:
        await loop.stop()
    assert loop._done.done()


async def test_a_step_that_does_not_parse_fails_the_hubs_step_and_the_loop_goes_on(links, compute):
    hub, worker = links
    ran: list[int] = []
    loop = DataSteps(worker, CommandCount(), lambda msg: ran.append(msg.step), compute, 2.0)
    try:
        hub.send(STEP, 0, encode({"t": "ctl", "op": "step", "rids": "not a list"}))
        with pytest.raises(PeerFailed, match="did not parse") as failed:
            hub.recv_into((9 << STEP_SHIFT) + 1, np.empty(4, np.float32))  # the hub waits in step 9
        assert failed.value.cause == FailureCause.INTERNAL
        hub.send(STEP, 0, encode(step(5, ["r2"]).wire()))
        await _until(lambda: ran == [5])
    finally:
        await loop.stop()


async def test_stop_ends_a_loop_waiting_for_steps_at_once(links, compute):
    hub, worker = links
    ran: list[int] = []
    loop = DataSteps(worker, CommandCount(), lambda msg: ran.append(msg.step), compute, 2.0)
    await asyncio.wait_for(loop.stop(), 1.0)
    assert loop._done.done() and loop._done.exception() is None
    hub.send(STEP, 0, encode(step(6, []).wire()))  # left on the link for the next loop
    loop = DataSteps(worker, CommandCount(), lambda msg: ran.append(msg.step), compute, 2.0)
    try:
        await _until(lambda: ran == [6])
    finally:
        await loop.stop()


async def test_the_loop_ends_when_the_master_closes_the_link(links, compute):
    hub, worker = links
    loop = DataSteps(worker, CommandCount(), lambda msg: None, compute, 2.0)
    hub.close()
    await asyncio.wait_for(asyncio.shield(loop._done), 2.0)
    await loop.stop()


async def _until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


class TinyShard:
    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(1, 1, 4, capacity, torch.float32)


async def test_a_failed_step_drops_the_stores_it_began_with_but_not_one_reopened_meanwhile():
    """A step on the compute thread fails while the event loop handles the master's rebuild of one of
    its requests (a re-open): dropping the failed step's stores must keep the rebuilt one."""
    kv, shard = KVStores(1, b"s" * 32, None, 1.0), TinyShard()
    for rid in ("r1", "r2"):
        await kv.open(shard, rid, 8, False)
    held = kv.held(["r1", "r2", "r3"])  # r3 was closed before the step: it ran on a scratch cache
    await kv.open(shard, "r2", 8, False)  # the rebuild, handled while the step ran
    await kv.drop(["r1", "r2", "r3"], held)
    assert "r1" not in kv.stores
    assert kv.stores["r2"] is not held[1]
