"""The opt-in all-reduce trace (edge.trace) that splits the decode profile's all-reduce time."""

import json
import re

import aiohttp
import numpy as np
import pytest
from cluster_proc import ClusterProcess
from hf_reference import make_hf_checkpoint

from edge.trace import TRACE_ENV, AllReduceTrace, read_trace, split_allreduces


def test_split_by_hand():
    # two all-reduces of three ranks, (entry, exit) ns; the last rank to enter: 2 (30), then 0 (55)
    trace = {0: np.array([[10, 40], [55, 70]]), 1: np.array([[20, 45], [50, 72]]), 2: np.array([[30, 50], [52, 75]])}
    split = split_allreduces(trace, since=0, until=100)
    assert split[0] == {"wait_s": (20 + 0) / 2e9, "exchange_s": (10 + 15) / 2e9, "count": 2}
    assert split[1] == {"wait_s": (10 + 5) / 2e9, "exchange_s": (15 + 17) / 2e9, "count": 2}
    assert split[2] == {"wait_s": (0 + 3) / 2e9, "exchange_s": (20 + 20) / 2e9, "count": 2}
    only_second = split_allreduces(trace, since=50, until=100)  # rank 0's window picks the k-th of all
    assert only_second[1] == {"wait_s": 5e-9, "exchange_s": 17e-9, "count": 1}


def test_ranks_that_disagree_are_an_error_not_a_guess():
    with pytest.raises(ValueError, match="different numbers"):
        split_allreduces({0: np.zeros((3, 2), np.int64), 1: np.zeros((2, 2), np.int64)}, 0, 1)


def test_records_append_per_flush(tmp_path):
    trace = AllReduceTrace(tmp_path, rank=3)
    trace.add(1, 2)
    trace.flush()
    trace.add(3, 5)
    trace.add(8, 13)
    trace.flush()
    trace.flush()  # nothing new: nothing written
    assert read_trace(tmp_path)[3].tolist() == [[1, 2], [3, 5], [8, 13]]


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
    assert {r: len(t) for r, t in trace.items()} == {r: 6 * 2 * layers for r in range(3)} == counted  # a forward per token
    entered, left = np.stack([t[:, 0] for t in trace.values()]), np.stack([t[:, 1] for t in trace.values()])
    assert (left >= entered.max(axis=0)).all()  # no rank has the sum before every rank has entered
    split = split_allreduces(trace, 0, int(left.max()))
    for r, t in trace.items():  # waiting + exchange is all of a rank's time in all-reduces
        assert split[r]["wait_s"] + split[r]["exchange_s"] == pytest.approx((t[:, 1] - t[:, 0]).mean() / 1e9)
