"""The typed control plane (edge.messages) and the typed failure cause of a worker's report."""

import socket

import numpy as np
import pytest

from edge.messages import (
    COMMANDS,
    AttentionLinked,
    CloseRequest,
    Join,
    LinkAttention,
    LinkRing,
    OpenRequest,
    Plan,
    Ready,
    Refused,
    Step,
    receive,
    receive_command,
    receive_plan,
    send,
)
from transport.collectives import StarAllReduce
from transport.errors import FailureCause, FrameError, PeerFailed
from transport.fastpath import ERROR, DataLink, FastStar
from transport.memory import memory_pair


async def test_messages_travel_as_tagged_maps_and_come_back_equal():
    master, worker = memory_pair()
    sent = [Join(rank=2, fingerprint="abc", profile={"free_bytes": 5}, listen=["127.0.0.1", 9]),
            Ready(2, weight_bytes=10, fixed_rss_bytes=20, fetched_bytes=0)]
    for msg in sent:
        await send(worker, msg)
    assert await receive(master, Join, 1) == sent[0]
    assert await receive(master, Ready, 1) == sent[1]
    assert Step(["r1"], 7, {"x": 1}, True).wire() == {"t": "ctl", "op": "step", "rids": ["r1"], "step": 7,
                                                      "h": {"x": 1}, "fast": True, "every": False}


async def test_commands_are_told_apart_by_op():
    master, worker = memory_pair()
    for msg in (OpenRequest("r1", 128, True), CloseRequest("r1"), LinkAttention(3, 2, {"0": ["h", 1]})):
        await send(master, msg)
    got = [await receive_command(worker, 1) for _ in range(3)]
    assert [type(m) for m in got] == [OpenRequest, CloseRequest, LinkAttention]
    assert got[0].cap == 128 and got[2].node_addrs() == {0: ["h", 1]}
    assert set(COMMANDS) == {"open", "close", "step", "ring", "attn", "replan"}


async def test_a_plan_or_its_refusal():
    master, worker = memory_pair()
    await send(master, Plan(2, [1.0, 2], "bfloat16", "int4", [32, 32], data_port=5))
    await send(master, Refused("rank 7 is not in 1..1"))
    plan = await receive_plan(worker, Plan, 1)
    assert isinstance(plan, Plan) and plan.align == [32, 32] and plan.data_port == 5
    assert await receive_plan(worker, Plan, 1) == Refused("rank 7 is not in 1..1")


@pytest.mark.parametrize(("kind", "raw", "problem"), [
    (Ready, {"t": "ready"}, "without 'rank'"),
    (Ready, {"t": "ready", "rank": "1"}, "rank='1'"),
    (Ready, {"t": "ready", "rank": True}, "rank=True"),
    (Plan, {"t": "plan", "world_size": 2, "weights": [1, "x"]}, "weights"),
    (Step, {"t": "ctl", "op": "step", "rids": ["a"], "step": 1, "h": [1]}, "h=[1]"),
    (AttentionLinked, {"t": "attn.ok", "epoch": 1, "error": 5}, "error=5"),
    (Step, {"t": "ctl", "op": "step", "rids": ["a"], "step": 1, "h": {}, "starts": [0, "1"]}, "starts"),
    (Step, {"t": "ctl", "op": "step", "rids": ["a", 2], "step": 1, "h": {}}, "rids"),
    (LinkRing, {"t": "ctl", "op": "ring", "epoch": 1, "algorithm": "ring", "addrs": {"1": "x"}}, "addrs"),
])
async def test_malformed_messages_are_frame_errors_that_name_the_field(kind, raw, problem):
    master, worker = memory_pair()
    await master.send(raw)
    with pytest.raises(FrameError, match=problem.replace("[", r"\[")):
        await receive(worker, kind, 1)


async def test_an_unknown_command_is_a_frame_error():
    master, worker = memory_pair()
    await master.send({"t": "ctl", "op": "reboot"})
    with pytest.raises(FrameError, match="unknown command 'reboot'"):
        await receive_command(worker, 1)


async def test_bad_node_addresses_are_a_frame_error():
    with pytest.raises(FrameError, match="bad attention link"):
        LinkAttention(1, 1, {"node-a": ["h", 1]}).node_addrs()


@pytest.mark.parametrize("cause", list(FailureCause))
async def test_a_workers_failure_cause_reaches_the_hub_on_the_control_channel(cause):
    hub_ch, worker_ch = memory_pair()
    hub = StarAllReduce(0, 2, {1: worker_ch}, timeout=1)
    worker = StarAllReduce(1, 2, {0: hub_ch}, timeout=1)
    hub.begin(1), worker.begin(1)
    await worker.fail("rank 1: why", cause)
    with pytest.raises(PeerFailed, match="rank 1: why") as failed:
        await hub.allreduce(np.ones(4, np.float32))
    assert failed.value.cause == cause


@pytest.mark.parametrize("cause", list(FailureCause))
def test_a_workers_failure_cause_reaches_the_hub_on_the_data_plane(cause):
    a, b = socket.socketpair()
    hub, worker = DataLink(a, "rank 1", 1.0), DataLink(b, "rank 0", 1.0)
    try:
        FastStar(1, 2, {0: worker}, lambda: 3).report(ERROR, 3, "rank 1: why", cause)
        with pytest.raises(PeerFailed, match="rank 1: why") as failed:
            hub.recv_into(3, np.empty(4, np.float32))
        assert failed.value.cause == cause
    finally:
        hub.close(), worker.close()


def test_an_unknown_cause_counts_as_a_peer_failure():
    assert FailureCause.parse("cosmic rays") == FailureCause.PEER
