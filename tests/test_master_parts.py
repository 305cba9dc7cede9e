"""The master's parts in one process, without workers: the step batcher and failover with fakes."""

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest

from edge.batcher import StepBatcher, StepRequest, step_rows
from edge.failover import Failover
from edge.split import SplitError
from models.engine import EngineUnavailable
from transport.errors import ChannelClosed, FailureCause, PeerFailed


@dataclass(eq=False)
class FakeSession:
    name: str
    closed: bool = False
    failed: bool = False
    replay: bool = False
    offload: bool = False
    history: list[int] = field(default_factory=list)


class Recorder:
    """A run_batch that records each batch (names and tokens) and answers each row with its tokens."""

    def __init__(self, fail: BaseException | None = None):
        self.batches: list[list[tuple[str, list[int]]]] = []
        self.fail = fail

    async def __call__(self, batch: list[StepRequest]) -> None:
        self.batches.append([(e.session.name, e.tokens) for e in batch])
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        for e in batch:
            e.result.set_result(e.tokens)


async def _batcher(run, max_batch=16, follow=0.005, alone=lambda _: False) -> StepBatcher:
    b = StepBatcher(run, max_batch, alone, follow)
    b.start()
    return b


async def test_prefills_run_alone_and_decode_steps_batch_up_to_max_batch():
    run = Recorder()
    b = StepBatcher(run, max_batch=3)  # not started: batches are taken by hand
    s = [FakeSession(f"s{i}") for i in range(5)]
    b.submit(s[0], [1, 2, 3])  # a prefill
    for x in s[1:]:
        b.submit(x, [7])  # decode steps
    assert [e.session.name for e in b.take_batch()] == ["s0"]
    assert [e.session.name for e in b.take_batch()] == ["s1", "s2", "s3"]
    assert [e.session.name for e in b.take_batch()] == ["s4"]
    assert b.take_batch() == []


async def test_a_prefill_behind_decode_steps_waits_for_its_own_step_in_order():
    b = StepBatcher(Recorder(), max_batch=8)
    a, c, d = FakeSession("a"), FakeSession("c"), FakeSession("d")
    b.submit(a, [1])
    b.submit(c, [5, 6])  # prefill: ends the decode batch before it
    b.submit(d, [1])
    assert [e.session.name for e in b.take_batch()] == ["a"]
    assert [e.session.name for e in b.take_batch()] == ["c"]
    assert [e.session.name for e in b.take_batch()] == ["d"]


async def test_replays_scoring_and_alone_steps_are_not_batched():
    b = StepBatcher(Recorder(), max_batch=8, alone=lambda e: e.session.name == "lonely")
    replaying, scoring = FakeSession("r", replay=True), FakeSession("k")
    others = [FakeSession("x"), FakeSession("lonely"), FakeSession("y")]
    b.submit(others[0], [1])
    b.submit(replaying, [1])
    b.submit(scoring, [1], score_k=2)
    b.submit(others[1], [1])
    b.submit(others[2], [1])
    assert [[e.session.name for e in b.take_batch()] for _ in range(5)] == [["x"], ["r"], ["k"], ["lonely"], ["y"]]


async def test_closed_and_abandoned_requests_are_dropped_before_they_run():
    b = StepBatcher(Recorder(), max_batch=8)
    gone, left, stays = FakeSession("gone"), FakeSession("left"), FakeSession("stays")
    b.submit(gone, [1])
    b.submit(left, [1]).cancel()  # its client disconnected
    b.submit(stays, [1])
    gone.closed = True
    assert [e.session.name for e in b.take_batch()] == ["stays"]


async def test_runner_batches_requests_that_follow_within_the_window():
    run = Recorder()
    b = await _batcher(run, follow=0.5)
    a, c = FakeSession("a"), FakeSession("c")
    first = [b.submit(a, [1]), b.submit(c, [2])]
    assert await asyncio.gather(*first) == [[1], [2]]
    step_a = b.submit(a, [3])  # a asks at once; c asks 50 ms later, inside the window
    await asyncio.sleep(0.05)
    step_c = b.submit(c, [4])
    assert await asyncio.gather(step_a, step_c) == [[3], [4]]
    assert run.batches == [[("a", [1]), ("c", [2])], [("a", [3]), ("c", [4])]]
    await b.aclose()


async def test_runner_does_not_wait_past_the_window_for_a_request_that_stays_silent():
    run = Recorder()
    b = await _batcher(run, follow=0.05)
    a, c = FakeSession("a"), FakeSession("c")
    await asyncio.gather(b.submit(a, [1]), b.submit(c, [2]))
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await asyncio.wait_for(b.submit(a, [3]), 5) == [3]  # c never asks again
    assert loop.time() - began >= 0.04  # it waited for c, but only the window
    assert run.batches[-1] == [("a", [3])]
    await b.aclose()


async def test_runner_does_not_wait_for_requests_that_ended():
    run = Recorder()
    b = await _batcher(run, follow=30.0)
    a, c = FakeSession("a"), FakeSession("c")
    await asyncio.gather(b.submit(a, [1]), b.submit(c, [2]))
    c.closed = True  # a long window, but c ended: a's next step runs at once
    assert await asyncio.wait_for(b.submit(a, [3]), 5) == [3]
    await b.aclose()


async def test_a_batch_that_raises_fails_each_waiter_once_and_the_runner_goes_on():
    run = Recorder(fail=RuntimeError("bug"))
    b = await _batcher(run)
    futures = [b.submit(FakeSession(n), [1]) for n in "ab"]
    for f in futures:
        with pytest.raises(EngineUnavailable, match="bug"):
            await f
    run.fail = None
    assert await asyncio.wait_for(b.submit(FakeSession("c"), [9]), 5) == [9]
    await b.aclose()


class FakeCluster:
    """forward/rebuild for Failover: forward fails with the queued errors first, then succeeds."""

    def __init__(self, *errors: BaseException, up: bool = True, offload_ready: bool = True):
        self.errors, self.up, self.ready = list(errors), up, offload_ready
        self.calls: list[list[str]] = []
        self.rebuilt: list[str] = []

    async def forward(self, sessions, tokens, score_k, every):
        self.calls.append([s.name for s in sessions])
        if self.errors:
            raise self.errors.pop(0)
        return [np.array([len(s.name), t[0]], dtype=np.float32) for s, t in zip(sessions, tokens, strict=True)]

    async def rebuild(self, session, reason):
        self.rebuilt.append(session.name)
        session.offload, session.replay = False, True

    def failover(self) -> Failover:
        return Failover(self.forward, self.rebuild, lambda: self.up, lambda: self.ready)


def _entries(*sessions: FakeSession, score_k=None) -> list[StepRequest]:
    loop = asyncio.get_running_loop()
    return [StepRequest(s, [i + 1], loop.create_future(), score_k) for i, s in enumerate(sessions)]


async def test_failover_gives_each_request_its_own_row():
    cluster = FakeCluster()
    batch = _entries(FakeSession("a"), FakeSession("bb"))
    await cluster.failover().run(batch)
    assert [e.result.result().tolist() for e in batch] == [[1, 1], [2, 2]]
    assert cluster.calls == [["a", "bb"]]


async def test_scoring_pass_gets_the_whole_output():
    cluster = FakeCluster()
    (entry,) = _entries(FakeSession("a"), score_k=3)
    await cluster.failover().run([entry])
    assert entry.result.result().tolist() == [1, 1]


def test_step_rows_pad_verification_rows_and_say_where_each_result_lies():
    plain, drafting, replayed = FakeSession("p"), FakeSession("d"), FakeSession("r", replay=True)
    plain.history, drafting.history, replayed.history = [1, 2, 3], [4, 5], [6, 7]
    rows, starts, wanted, wide = step_rows([plain, drafting], [[9], [8, 30, 31]], [False, True])
    assert rows == [[9, 9, 9], [8, 30, 31]] and starts == [3, 2] and wide
    assert wanted == [0, slice(0, 3)]  # the plain row's one position; every position of the drafts
    rows, starts, wanted, wide = step_rows([replayed], [[8, 30]], [True])
    assert rows == [[6, 7, 8, 30]] and starts == [0] and wanted == [slice(2, 4)]
    assert step_rows([plain, drafting], [[9], [8]], None) == ([[9], [8]], [3, 2], [None, None], False)


async def test_verification_steps_batch_with_decode_steps_while_the_padding_fits_the_context():
    b = StepBatcher(Recorder(), max_batch=8)
    a, v, near_end, last = FakeSession("a"), FakeSession("v"), FakeSession("end"), FakeSession("z")
    b.submit(a, [1])
    b.submit(v, [1, 2, 3, 4], every=True)  # a token and three drafts
    b.submit(near_end, [1], room=1)  # padding it to 4 positions would pass the end of its context
    b.submit(last, [5])
    assert [e.session.name for e in b.take_batch()] == ["a", "v", "z"]
    assert [e.session.name for e in b.take_batch()] == ["end"]


@pytest.mark.parametrize("error", [ChannelClosed("worker gone"), TimeoutError(), SplitError("bad file"),
                                   PeerFailed("rank 1: weights", FailureCause.WEIGHTS)])
async def test_a_worker_failure_fails_every_request_of_the_step_exactly_once(error):
    cluster = FakeCluster(error)
    sessions = [FakeSession("a", offload=True), FakeSession("b")]
    batch = _entries(*sessions)
    await cluster.failover().run(batch)
    assert cluster.calls == [["a", "b"]] and cluster.rebuilt == []  # no retry
    for e in batch:
        with pytest.raises(EngineUnavailable, match="failed during the step"):
            e.result.result()
    assert all(s.failed for s in sessions)
    who = "rank 0" if isinstance(error, SplitError) else "a worker"
    assert who in str(batch[0].result.exception())


async def test_a_lost_attention_node_rebuilds_each_request_and_retries_it_once_alone():
    cluster = FakeCluster(PeerFailed("node 1 died", FailureCause.ATTENTION))
    sessions = [FakeSession("a", offload=True), FakeSession("b", offload=True)]
    batch = _entries(*sessions)
    await cluster.failover().run(batch)
    assert cluster.calls == [["a", "b"], ["a"], ["b"]]
    assert cluster.rebuilt == ["a", "b"]
    assert [e.result.result().tolist() for e in batch] == [[1, 1], [1, 2]]
    assert not any(s.failed for s in sessions)


async def test_a_retry_that_fails_again_fails_that_request_once_and_not_the_others():
    attention = PeerFailed("node 0 died", FailureCause.ATTENTION)
    cluster = FakeCluster(attention, ChannelClosed("worker gone too"))
    sessions = [FakeSession("a", offload=True), FakeSession("b", offload=True)]
    batch = _entries(*sessions)
    await cluster.failover().run(batch)
    assert cluster.calls == [["a", "b"], ["a"], ["b"]]
    with pytest.raises(EngineUnavailable, match="rebuilding its KV on the compute ranks failed too"):
        batch[0].result.result()
    assert batch[1].result.result().tolist() == [1, 2]
    assert [s.failed for s in sessions] == [True, False]


async def test_an_attention_failure_while_a_worker_is_missing_is_not_retried():
    cluster = FakeCluster(PeerFailed("node 0 died", FailureCause.ATTENTION), up=False)
    batch = _entries(FakeSession("a", offload=True))
    await cluster.failover().run(batch)
    assert cluster.calls == [["a"]] and cluster.rebuilt == []
    assert isinstance(batch[0].result.exception(), EngineUnavailable)


async def test_a_peer_failure_of_a_request_that_is_not_offloaded_is_not_retried():
    cluster = FakeCluster(PeerFailed("node 0 died", FailureCause.ATTENTION))
    batch = _entries(FakeSession("a"))
    await cluster.failover().run(batch)
    assert cluster.calls == [["a"]] and cluster.rebuilt == []
    assert batch[0].session.failed


async def test_offloaded_requests_whose_nodes_are_known_lost_are_rebuilt_before_the_step():
    cluster = FakeCluster(offload_ready=False)
    batch = _entries(FakeSession("a", offload=True))
    await cluster.failover().run(batch)
    assert cluster.rebuilt == ["a"] and cluster.calls == [["a"]]
    assert batch[0].result.result().tolist() == [1, 1]


async def test_a_request_that_left_gets_nothing_and_breaks_nothing():
    cluster = FakeCluster(ChannelClosed("gone"))
    batch = _entries(FakeSession("a"), FakeSession("b"))
    batch[0].result.cancel()
    await cluster.failover().run(batch)
    assert batch[0].result.cancelled()
    assert isinstance(batch[1].result.exception(), EngineUnavailable)


async def test_engine_unavailable_before_the_step_fails_each_request_without_a_retry():
    cluster = FakeCluster(EngineUnavailable("worker rank(s) [2] disconnected"))
    batch = _entries(FakeSession("a", offload=True), FakeSession("b"))
    await cluster.failover().run(batch)
    assert cluster.calls == [["a", "b"]]
    assert all("disconnected" in str(e.result.exception()) for e in batch)


class Replans:
    """A replan callable: answers from a list (None: re-planned; a string: why not) and counts calls."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), 0

    async def __call__(self):
        self.calls += 1
        return self.answers.pop(0)


async def test_a_lost_worker_re_plans_and_retries_each_request_alone():
    cluster, replans = FakeCluster(ChannelClosed("rank 2 gone")), Replans(None)
    batch = _entries(FakeSession("a"), FakeSession("bb"))
    await Failover(cluster.forward, cluster.rebuild, lambda: False, lambda: False, replans).run(batch)
    assert replans.calls == 1 and cluster.calls == [["a", "bb"], ["a"], ["bb"]]
    assert [e.result.result().tolist() for e in batch] == [[1, 1], [2, 2]]
    assert not any(e.session.failed for e in batch)


async def test_a_re_plan_that_fails_fails_each_request_once_saying_why():
    cluster, replans = FakeCluster(ChannelClosed("rank 1 gone")), Replans("rank 0: the budget is too small")
    batch = _entries(FakeSession("a"), FakeSession("b"))
    await Failover(cluster.forward, cluster.rebuild, lambda: False, lambda: False, replans).run(batch)
    assert cluster.calls == [["a", "b"]]
    for e in batch:
        assert "budget is too small" in str(e.result.exception()) and e.session.failed


@pytest.mark.parametrize("error", [SplitError("bad file"), PeerFailed("rank 1: bad file", FailureCause.WEIGHTS),
                                   PeerFailed("rank 1: bug", FailureCause.INTERNAL)])
async def test_broken_weights_or_bugs_do_not_re_plan(error):
    cluster, replans = FakeCluster(error), Replans(None)
    batch = _entries(FakeSession("a"))
    await Failover(cluster.forward, cluster.rebuild, lambda: True, lambda: False, replans).run(batch)
    assert replans.calls == 0 and isinstance(batch[0].result.exception(), EngineUnavailable)
