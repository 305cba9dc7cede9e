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
    MARK,
    STAGES,
    TRACE_ENV,
    StepTrace,
    between_forwards,
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


def marks(**times):
    """MARK records of the named stages at the given ns."""
    return [(MARK, STAGES.index(stage), t) for stage, t in times.items()]


def test_between_forwards_by_hand():
    # rank 0: forward 0..100, then back on the loop at 110, gathered 130, next step begun 160, its
    # rows embedded 200, next forward from 230; the worker got the command at 210, entered at 225
    rank0 = np.array([(FORWARD, 0, 100), *marks(on_loop=110, gathered=130, step_begun=160, rows_embedded=200),
                      (FORWARD, 230, 400)])
    rank1 = np.array([(FORWARD, 5, 98), *marks(step_received=210), (FORWARD, 225, 390)])
    assert between_forwards({0: rank0, 1: rank1}, 0, 500) == {
        "to_loop": 10e-9, "gather": 20e-9, "next_step": 30e-9, "embed": 40e-9, "to_compute": 30e-9,
        "worker_receive": 10e-9, "worker_to_compute": 15e-9, "steps": 1}
    assert between_forwards({0: rank0, 1: rank1}, 0, 229) == {"steps": 0}  # the next forward begins later
    embedded = STAGES.index("rows_embedded")
    unmarked = rank0[[i for i, r in enumerate(rank0) if r[0] != MARK or r[1] != embedded]]
    assert between_forwards({0: unmarked, 1: rank1}, 0, 500) == {"steps": 0}  # an unmarked step is left out
    fast = np.array([(FORWARD, 0, 100), *marks(gathered=120, on_loop=130, step_begun=160, rows_embedded=200),
                     (FORWARD, 230, 400)])  # the gather on the compute thread, before the hop back
    assert between_forwards({0: fast, 1: rank1}, 0, 500) == {
        "gather": 20e-9, "to_loop": 10e-9, "next_step": 30e-9, "embed": 40e-9, "to_compute": 30e-9,
        "worker_receive": 10e-9, "worker_to_compute": 15e-9, "steps": 1}
    alone = between_forwards({0: rank0}, 0, 500)  # one device: no worker columns
    assert alone == {"to_loop": 10e-9, "gather": 20e-9, "next_step": 30e-9, "embed": 40e-9,
                     "to_compute": 30e-9, "steps": 1}


def test_marks_are_kept_in_order_with_the_records(tmp_path):
    trace = StepTrace(tmp_path, rank=0)
    trace.add(FORWARD, 1, 2)
    trace.mark("gathered")
    trace.flush()
    records = read_trace(tmp_path)[0]
    assert records[0].tolist() == [FORWARD, 1, 2]
    assert records[1, :2].tolist() == [MARK, STAGES.index("gathered")] and records[1, 2] > 2
    with pytest.raises(ValueError):
        trace.mark("no such stage")


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
    traced = read_trace(traces)
    trace = {r: t[t[:, 0] != MARK] for r, t in traced.items()}  # forwards and all-reduces
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
    stages = {r: sorted(STAGES[i] for i in t[t[:, 0] == MARK, 1]) for r, t in traced.items()}
    # one of each a step; a rank writes its marks with its forwards, so the last step's marks after its
    # forward wait for a next one
    assert stages[0] == sorted(["step_begun", "rows_embedded"] * 6 + ["on_loop", "gathered"] * 5)
    assert stages[1] == stages[2] == sorted(["step_received"] * 6 + ["on_loop", "gathered"] * 5)
    between = between_forwards(traced, 0, int(trace[0][:, 2].max()))
    assert between["steps"] == 5  # every gap between rank 0's six forwards
    assert all(v >= 0 for v in between.values()), between
    forwards = trace[0][trace[0][:, 0] == FORWARD]
    gaps = (forwards[1:, 1] - forwards[:-1, 2]).mean() / 1e9
    rank0_parts = ("to_loop", "gather", "next_step", "embed", "to_compute")
    assert sum(between[k] for k in rank0_parts) == pytest.approx(gaps)  # they split the gaps, nothing more
