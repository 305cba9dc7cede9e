"""Steps of concurrent requests -> cluster-wide forwards, one at a time.

Every request's step waits here (a StepRequest with a future for its logits). The runner takes a
prefill (or a replay, or a scoring pass) alone, and up to `max_batch` decode steps together, so
the weights are streamed once for all of them. After a step it waits a moment (the follow window)
for those requests to ask for their next step, so concurrent requests decode together instead of
alternating. A request that left (closed, or its future cancelled) is dropped before it runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from models.engine import EngineUnavailable

log = logging.getLogger("edge_llm.master")
# How long the runner waits for the requests of the last step to ask for their next one (their
# sampling and streaming take about a millisecond), so they batch instead of alternating.
FOLLOW_WINDOW_S = 0.005


class Stepper(Protocol):
    """What the batcher reads of a request's session."""

    closed: bool  # the request ended
    failed: bool  # it lost a worker: it asks for no more steps
    replay: bool  # its next step feeds its whole history (KV rebuilt): a prefill
    offload: bool  # its KV lives on the attention nodes


@dataclass
class StepRequest:
    """A session's step waiting for the runner; `result` gets its logits [V] (or scores) or an error."""

    session: Any  # a Stepper
    tokens: list[int]
    result: asyncio.Future
    score_k: int | None = None  # score the tokens (echo + logprobs) instead of predicting the next
    every: bool = False  # verify drafted tokens: the logits after each of them [S, V]
    room: int = 1 << 30  # positions left in the context: how wide (padded) a batch may make its row

    @property
    def decode(self) -> bool:
        """A decode or verification step: it batches with others (shorter rows are padded)."""
        return (len(self.tokens) == 1 or self.every) and not self.session.replay and self.score_k is None


def deliver(result: asyncio.Future, value: object = None, error: BaseException | None = None) -> None:
    """Hand a step's outcome to its request, unless that request already left (its client
    disconnected and its handler was cancelled, which cancels the future it waited on)."""
    if result.done():
        return
    if error is not None:
        result.set_exception(error)
    else:
        result.set_result(value)


def step_rows(sessions: list, tokens: list[list[int]], every: list[bool] | None
              ) -> tuple[list[list[int]], list[int], list[int | slice | None], bool]:
    """A batch's token rows, padded to one width (repeating a row's last token: the positions past a
    row's own tokens are forgotten at its next step), the KV positions each row's stores keep
    before it (a replayed row starts over), and where each row's result lies in the step's output:
    its last position, or with `every` its own positions (None: the output has one position per row).
    Returns (rows, starts, wanted, every_position)."""
    every = every or [False] * len(sessions)
    rows = [s.history + t if s.replay else list(t) for s, t in zip(sessions, tokens, strict=True)]
    width = max(len(r) for r in rows)
    wide = any(every) or any(len(r) != width for r in rows)
    starts, wanted = [], []
    for s, row, t, all_positions in zip(sessions, rows, tokens, every, strict=True):
        starts.append(0 if s.replay else len(s.history))
        first = len(row) - len(t)  # a replayed row's own tokens come after its history
        wanted.append(slice(first, len(row)) if all_positions else (len(row) - 1 if wide else None))
        row += [row[-1]] * (width - len(row))
    return rows, starts, wanted, wide


def _fits(batch: list[StepRequest]) -> bool:
    """Whether every row can be padded to the widest one without passing the end of its context."""
    width = max(len(e.tokens) for e in batch)
    return all(width - len(e.tokens) <= e.room for e in batch)


class StepBatcher:
    """Owns the step runner task; `run_batch` runs one batch and delivers every request's outcome.

    `alone(entry)` says a step must run by itself even though it is a decode step (an offloaded
    request whose attention nodes are gone will be rebuilt first).
    """

    def __init__(self, run_batch: Callable[[list[StepRequest]], Awaitable[None]], max_batch: int,
                 alone: Callable[[StepRequest], bool] = lambda _: False, follow_window: float = FOLLOW_WINDOW_S):
        self._run_batch, self.max_batch, self._alone = run_batch, max_batch, alone
        self.follow_window = follow_window
        self.pending: list[StepRequest] = []
        self._work = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="step-runner")

    def submit(self, session: Stepper, tokens: list[int], score_k: int | None = None, every: bool = False,
               room: int = 1 << 30) -> asyncio.Future:
        """Queue a step; the future gets its outcome."""
        entry = StepRequest(session, tokens, asyncio.get_running_loop().create_future(), score_k, every, room)
        self.pending.append(entry)
        self._work.set()
        return entry.result

    def wake(self) -> None:
        """A request ended: the runner may be waiting for its next step."""
        self._work.set()

    async def _run(self) -> None:
        ran: list[Stepper] = []
        while True:
            await self._work.wait()
            self._work.clear()
            while True:
                await self._await_followers(ran)
                batch = self.take_batch()
                if not batch:
                    break
                ran = [e.session for e in batch]
                await self._run_one(batch)

    async def _run_one(self, batch: list[StepRequest]) -> None:
        try:
            await self._run_batch(batch)
        except BaseException as e:  # never leave a waiter hanging, even when cancelled
            if isinstance(e, Exception):
                log.exception("step runner: a step failed unexpectedly")
            for entry in batch:
                deliver(entry.result, error=EngineUnavailable(f"the step failed: {e!r}"))
            if not isinstance(e, Exception):
                raise

    async def _await_followers(self, ran: list[Stepper]) -> None:
        """Give the requests of the step just run the follow window to ask for their next step."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.follow_window
        waiting = {id(e.session) for e in self.pending}
        while any(not (s.closed or s.failed) and id(s) not in waiting for s in ran):
            self._work.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._work.wait()
            except TimeoutError:
                return
            waiting = {id(e.session) for e in self.pending}

    def take_batch(self) -> list[StepRequest]:
        """The next step: a prefill (or replay, or scoring) alone, else up to max_batch decode and
        verification steps in arrival order, while every row's padding stays inside its context."""
        self.pending = [e for e in self.pending if not e.result.done() and not e.session.closed]
        batch: list[StepRequest] = []
        for entry in list(self.pending):
            solo = not entry.decode or self._alone(entry)
            if solo and batch:
                break
            if batch and not _fits([*batch, entry]):
                continue
            batch.append(entry)
            self.pending.remove(entry)
            if solo or len(batch) >= self.max_batch:
                break
        return batch

    async def aclose(self) -> None:
        """Stop the runner; a batch it was running gets an error, queued steps are cancelled."""
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        for entry in self.pending:
            entry.result.cancel()
        self.pending.clear()
