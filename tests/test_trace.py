"""The opt-in step trace (edge.trace): every forward and all-reduce of every rank, for the decode profile."""

import json
import re

import aiohttp
import numpy as np
import pytest
from cluster_proc import ClusterProcess
from hf_reference import make_hf_checkpoint

from edge.trace import (
    ALLREDUCE,
    FORWARD,
    TRACE_ENV,
    StepTrace,
    forward_seconds,
    read_trace,
    split_allreduces,
)


def reduces(*pairs):
    """All-reduce records (kind, entry, exit) from (entry, exit) pairs."""
    return np.array([(ALLREDUCE, a, b) for a, b in pairs])


def test_split_by_hand():
    # two all-reduces of three ranks, (entry, exit) ns; the last rank to enter: 2 (30), then 0 (55)
    trace = {0: reduces((10, 40), (55, 70)), 1: reduces((20, 45), (50, 72)), 2: reduces((30, 50), (52, 75))}
    split = split_allreduces(trace, since=0, until=100)
    assert split[0] == {"wait_s": (20 + 0) / 2e9, "exchange_s": (10 + 15) / 2e9, "count": 2}
    assert split[1] == {"wait_s": (10 + 5) / 2e9, "exchange_s": (15 + 17) / 2e9, "count": 2}
    assert split[2] == {"wait_s": (0 + 3) / 2e9, "exchange_s": (20 + 20) / 2e9, "count": 2}
    only_second = split_allreduces(trace, since=50, until=100)  # rank 0's window picks the k-th of all
    assert only_second[1] == {"wait_s": 5e-9, "exchange_s": 17e-9, "count": 1}


def test_forwards_are_apart_from_all_reduces():
    trace = np.array([(ALLREDUCE, 1, 2), (FORWARD, 0, 4), (ALLREDUCE, 11, 12), (FORWARD, 10, 16), (FORWARD, 20, 30)])
    assert forward_seconds(trace, since=5, until=30) == (8e-9, 2)
    assert forward_seconds(trace, since=5, until=29) == (6e-9, 1)


def test_ranks_that_disagree_are_an_error_not_a_guess():
    with pytest.raises(ValueError, match="different numbers"):
        split_allreduces({0: reduces((1, 2), (3, 4), (5, 6)), 1: reduces((1, 2), (3, 4))}, 0, 10)


def test_records_append_per_flush(tmp_path):
    trace = StepTrace(tmp_path, rank=3)
    trace.add(ALLREDUCE, 1, 2)
    trace.flush()
    trace.add(ALLREDUCE, 3, 5)
    trace.add(FORWARD, 0, 13)
    trace.flush()
    trace.flush()  # nothing new: nothing written
    assert read_trace(tmp_path)[3].tolist() == [[ALLREDUCE, 1, 2], [ALLREDUCE, 3, 5], [FORWARD, 0, 13]]


async def rank_allreduces(url: str) -> dict[int, float]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        text = await r.text()
    return {int(rank): float(v) for rank, v in re.findall(r'^edge_rank_allreduces_total\{rank="(\d+)"\} (\S+)$',
                                                           text, re.M)}


async def test_a_traced_cluster_records_every_all_reduce_of_every_rank(tmp_path, monkeypatch):
    folder = make_hf_checkpoint(tmp_path / "llama", "llama", seed=2)
    traces = tmp_path / "trace"
    traces.mkdir()
    monkeypatch.setenv(TRACE_ENV, str(traces))
    cluster = ClusterProcess(folder, 3, tmp_path)
    try:
        body = {"prompt": [1, 2, 3], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        async with aiohttp.ClientSession() as s, s.post(f"{cluster.url}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
        counted = await rank_allreduces(cluster.url)
    finally:
        cluster.stop()
    trace = read_trace(traces)
    assert sorted(trace) == [0, 1, 2]
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]  # two all-reduces each
    kinds = {r: (t[:, 0] == ALLREDUCE).sum() for r, t in trace.items()}
    assert kinds == {r: 6 * 2 * layers for r in range(3)} == counted  # one forward per token
    assert [(t[:, 0] == FORWARD).sum() for t in trace.values()] == [6, 6, 6]
    for t in trace.values():  # each forward's record follows its all-reduces, which lie inside it
        forwards = np.flatnonzero(t[:, 0] == FORWARD)
        assert forwards.tolist() == [(2 * layers + 1) * i + 2 * layers for i in range(6)]
        for f in forwards:
            inside = t[f - 2 * layers:f]
            assert (inside[:, 0] == ALLREDUCE).all()
            assert (inside[:, 1] >= t[f, 1]).all() and (inside[:, 2] <= t[f, 2]).all()
    reduces_only = {r: t[t[:, 0] == ALLREDUCE, 1:] for r, t in trace.items()}
    entered = np.stack([t[:, 0] for t in reduces_only.values()])
    left = np.stack([t[:, 1] for t in reduces_only.values()])
    assert (left >= entered.max(axis=0)).all()  # no rank has the sum before every rank has entered
    split = split_allreduces(trace, 0, int(left.max()))
    for r, t in reduces_only.items():  # waiting + exchange is all of a rank's time in all-reduces
        assert split[r]["wait_s"] + split[r]["exchange_s"] == pytest.approx((t[:, 1] - t[:, 0]).mean() / 1e9)
