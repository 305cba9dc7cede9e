"""models.generation.generate runs the next step while its consumer holds the events of the last one
(the HTTP write overlaps the step), starts none after the last event, and cancels the one in flight
when the consumer leaves. An in-memory engine: what is checked is the order of calls, not numbers."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from models.generation import generate
from models.sampling import SamplingParams

VOCAB = 4


class GatedSession:
    """Greedy next token = (last fed + 1) % VOCAB; decode steps wait for `opened` when it is set."""

    def __init__(self, gate: asyncio.Event | None):
        self.fed: list[list[int]] = []
        self.gate, self.cancelled, self.closed = gate, 0, False

    async def step(self, tokens: list[int]) -> torch.Tensor:
        self.fed.append(tokens)
        return await self._answer(tokens, self.gate is not None and len(self.fed) > 1)

    async def _answer(self, tokens: list[int], wait: bool) -> torch.Tensor:
        """The greedy logits for `tokens`, after the gate opens when `wait` (a cancel is counted)."""
        if wait:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        logits = torch.zeros(VOCAB)
        logits[(tokens[-1] + 1) % VOCAB] = 5.0
        return logits

    async def close(self) -> None:
        self.closed = True


class GatedEngine:
    config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=64)
    tokenizer = SimpleNamespace(eos_ids=(), decode=lambda ids: "")

    def __init__(self, gate: asyncio.Event | None = None):
        self.gate, self.sessions = gate, []

    async def open_session(self, capacity: int) -> GatedSession:
        self.sessions.append(GatedSession(self.gate))
        return self.sessions[-1]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


async def test_the_next_step_runs_while_the_consumer_holds_an_event():
    engine = GatedEngine()
    stream = generate(engine, [0], greedy(4))
    first = await anext(stream)
    for _ in range(3):  # the consumer is busy elsewhere (an HTTP write) and has not asked again
        await asyncio.sleep(0)
    session = engine.sessions[0]
    assert first.token_id == 1
    # The step after the first token ran, and the step of the token it chose started (PlainStep).
    assert session.fed == [[0], [1], [2]]
    rest = [e.token_id async for e in stream]
    assert rest == [2, 3, 0]
    assert session.fed == [[0], [1], [2], [3]]  # none after the last event: 4 tokens, 4 steps
    assert session.closed


async def test_a_consumer_that_leaves_cancels_the_step_in_flight():
    engine = GatedEngine(asyncio.Event())  # decode steps never finish unless opened
    stream = generate(engine, [0], greedy(10))
    await anext(stream)
    await asyncio.sleep(0)
    session = engine.sessions[0]
    assert session.fed == [[0], [1]] and session.cancelled == 0  # in flight
    await stream.aclose()
    assert session.cancelled == 1 and session.closed


async def test_a_step_that_fails_ahead_raises_at_its_events():
    class Failing(GatedSession):
        async def step(self, tokens):
            if self.fed:
                raise RuntimeError("a worker died")
            return await super().step(tokens)

    session = Failing(None)
    engine = GatedEngine()
    engine.open_session = lambda capacity: asyncio.sleep(0, session)  # type: ignore[method-assign]
    stream = generate(engine, [0], greedy(3))
    assert (await anext(stream)).token_id == 1
    with pytest.raises(RuntimeError, match="a worker died"):
        await anext(stream)
    assert session.closed


class StartingSession(GatedSession):
    """Starts a step at the call (as the cluster's and one device's sessions do): `started` records
    the call, the step itself runs when awaited; a step feeding a token in `held` waits for the gate."""

    def __init__(self, held: set[int] = frozenset()):
        super().__init__(asyncio.Event())
        self.started: list[list[int]] = []
        self.held = held

    def step(self, tokens: list[int]):
        self.started.append(tokens)
        return self._run(tokens)

    async def _run(self, tokens: list[int]) -> torch.Tensor:
        self.fed.append(tokens)
        return await self._answer(tokens, tokens[-1] in self.held)


def starting_engine(session: StartingSession) -> GatedEngine:
    engine = GatedEngine()
    engine.tokenizer = SimpleNamespace(eos_ids=(), decode=lambda ids: "".join("abcd"[i] for i in ids))
    engine.open_session = lambda capacity: asyncio.sleep(0, session)  # type: ignore[method-assign]
    return engine


async def test_the_step_of_a_chosen_token_starts_before_its_event_reaches_the_consumer():
    """models.decoding.PlainStep: the event's work and the consumer's write overlap the next step."""
    session = StartingSession()
    tokens = []
    async for event in generate(starting_engine(session), [0], greedy(5)):
        tokens.append(event.token_id)
        if len(tokens) > 1:  # the first token comes from the prefill, before any decode step
            assert session.started[-1] == [event.token_id] or len(tokens) == 5  # the last starts none
    assert tokens == [1, 2, 3, 0, 1]
    assert session.started == [[0], [1], [2], [3], [0]]  # one step per token: none after the last
    assert session.closed


async def test_a_stop_string_cancels_the_step_started_for_its_token():
    session = StartingSession(held={2})  # the step feeding token 2 ("c") would never end
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=("c",))
    events = [e async for e in generate(starting_engine(session), [0], params)]
    assert [e.token_id for e in events] == [1, 2] and events[-1].finish_reason == "stop"
    assert session.started[-1] == [2] and session.cancelled == 1 and session.closed


async def test_logprobs_are_computed_only_when_asked_for():
    """SamplingParams.keep_logprob: the API leaves it off unless a request wants logprobs."""
    asked = [e async for e in generate(GatedEngine(), [0], greedy(4))]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, keep_logprob=False)
    skipped = [e async for e in generate(GatedEngine(), [0], params)]
    assert [e.token_id for e in skipped] == [e.token_id for e in asked] == [1, 2, 3, 0]
    want = torch.log_softmax(torch.tensor([0.0] * (VOCAB - 1) + [5.0]), 0)[-1].item()
    assert all(e.logprob == pytest.approx(want, abs=1e-6) for e in asked)
    assert all(e.logprob is None and not e.top_logprobs for e in skipped)
    with_top = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, keep_logprob=False, logprobs=2)
    tops = [len(e.top_logprobs) async for e in generate(GatedEngine(), [0], with_top)]
    assert tops == [2, 2]
