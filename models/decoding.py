"""One request's decoding after its prefill: the tokens it emits (`Output`), and the engine steps
that produce them: one token per step (`plain_step`, `PlainStep`), or a drafted run verified in one step
(`SpeculativeStep`, models.speculative).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from models.detokenize import IncrementalText
from models.engine import Session
from models.sampling import SamplingParams, apply_penalties, choose_token
from models.speculative import Draft, Drafter, DraftPolicy, SpeculationStats, choose_verified
from models.tokenizer import Tokenizer


@dataclass
class TokenEvent:
    """One generated token, its natural-log probability, alternatives and the text it finalised."""

    token_id: int
    logprob: float | None  # None: not asked for (SamplingParams.keep_logprob)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" on the last event


def token_event(logits: torch.Tensor, token: int, n_top: int, keep_logprob: bool = True) -> TokenEvent:
    """The event of `token` chosen from logits [V]: its logprob and the top n_top, from the raw logits
    (neither computed when neither is asked for: `keep_logprob` False and n_top 0).

    In numpy, on the caller's thread (the event loop): log_softmax as torch computes it, (x - max) -
    log(sum exp(x - max)) in float32, for the tokens asked for only. torch's ops there took 2-3x as
    long (SmolLM2's 49152 logits: 56 against 35 us with the vocabulary's exp) and may start an
    OpenMP team beside the compute thread's (models.threads)."""
    if not keep_logprob and n_top <= 0:
        return TokenEvent(token_id=token, logprob=None)
    x = logits.detach().float().numpy()  # [V]
    peak = x.max()
    log_total = np.log(np.exp(x - peak).sum(dtype=np.float32))  # natural log

    def logprob(i: int) -> float:
        return float((x[i] - peak) - log_total)

    top: list[tuple[int, float]] = []
    if n_top > 0:
        n = min(n_top, x.size)
        best = np.argpartition(-x, n - 1)[:n]
        top = [(int(i), logprob(int(i))) for i in sorted(best.tolist(), key=lambda i: (-x[i], i))]
    return TokenEvent(token_id=token, logprob=logprob(token), top_logprobs=top)


class Output:
    """What a request has emitted: the counts penalties read, its text (stop strings), its budget."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, budget: int):
        self.params, self.budget = params, budget
        self.stop_ids = set() if params.ignore_eos else set(tokenizer.eos_ids)
        self.stop_ids |= set(params.extra_stop_ids)
        self.text = IncrementalText(tokenizer, prompt_ids, params.stop)
        self.counts = Counter[int]()
        self.context = list(prompt_ids)  # prompt + tokens emitted (what drafters read)
        self.seen = set(prompt_ids) if params.repetition_penalty != 1.0 else None  # what it penalizes
        self.produced = 0

    @property
    def remaining(self) -> int:
        return self.budget - self.produced

    def penalized(self, logits: torch.Tensor) -> torch.Tensor:
        return apply_penalties(logits, self.counts, self.params, self.seen)

    def emit(self, logits: torch.Tensor, token: int) -> TokenEvent:
        """Record `token`, chosen from logits [V]; its event ends the request (`finish_reason`) at an
        end-of-sequence token, a stop string or the budget."""
        event = token_event(logits, token, self.params.logprobs, self.params.keep_logprob)
        self.counts[token] += 1
        if self.seen is not None:
            self.seen.add(token)
        self.produced += 1
        self.context.append(token)
        event.text = self.text.add(token)
        if token in self.stop_ids or self.text.stopped:
            event.finish_reason = "stop"
        elif self.produced >= self.budget:
            event.finish_reason = "length"
        if event.finish_reason:
            event.text += self.text.flush()
        return event


async def plain_step(session: Session, out: Output, token: int, gen: torch.Generator | None) -> list[TokenEvent]:
    """Feed the last emitted token, emit the next."""
    logits = await session.step([token])  # [V]
    return [out.emit(logits, choose_token(out.penalized(logits), out.params, gen))]


class PlainStep:
    """`plain_step`, with the step that feeds each chosen token started the moment it is chosen: the
    token's event (its logprobs, text and stop strings), the generate loop and the consumer's write
    of the event then run while the engine computes, instead of before it starts.

    Why: an engine's sessions start a step when `step` is called, not when it is awaited (the
    cluster's step runner queues it; one device hands it to the compute thread), and the event loop
    then takes the runner's turn before this event's work (one yield). On the cluster that work and
    the loop's turns around it were about a third of rank 0's time between two forwards (the
    profile's "sampling, detokenizing, generate loop, step runner"). No step is started after an
    end-of-sequence token or the budget's last; a stop string, found only in the event's text,
    leaves one step started for nothing (`close` cancels it; the session is closed next).
    """

    def __init__(self, session: Session, out: Output, gen: torch.Generator | None):
        self.session, self.out, self.gen = session, out, gen
        self._started: tuple[int, asyncio.Future] | None = None  # (token, its step) started early

    async def __call__(self, token: int) -> list[TokenEvent]:
        started, self._started = self._started, None
        if started is not None and started[0] != token:  # not the token it was started for
            await _cancelled(started[1])
            started = None
        logits = await (started[1] if started is not None else self.session.step([token]))  # [V]
        chosen = choose_token(self.out.penalized(logits), self.out.params, self.gen)
        if chosen not in self.out.stop_ids and self.out.produced + 1 < self.out.budget:
            self._started = (chosen, asyncio.ensure_future(self.session.step([chosen])))
            await asyncio.sleep(0)  # the step runner's turn comes first
        return [self.out.emit(logits, chosen)]

    async def close(self) -> None:
        """Cancel a step started for a token that ended the request."""
        if self._started is not None:
            await _cancelled(self._started[1])
            self._started = None


async def _cancelled(step: asyncio.Future) -> None:
    step.cancel()
    await asyncio.gather(step, return_exceptions=True)


class SpeculativeStep:
    """A request's steps with drafts: draft k tokens (DraftPolicy), feed the last emitted token and
    the drafts in one step, emit the verified run (choose_verified at each position up to the first
    rejected draft, then the model's own token there; one more when every draft holds), and make
    the engine forget the positions of rejected drafts."""

    def __init__(self, session: Session, out: Output, drafter: Drafter, policy: DraftPolicy,
                 stats: SpeculationStats, gen: torch.Generator | None, fed: int):
        self.session, self.out, self.drafter, self.policy = session, out, drafter, policy
        self.stats, self.gen = stats, gen
        self.fed = fed  # positions the engine holds: every emitted token but the last

    async def __call__(self, token: int) -> list[TokenEvent]:
        k = self.policy.next_k(self.out.remaining)
        began = time.perf_counter()
        draft = await self.drafter.propose(self.out.context, k, self.out.params, self.gen) if k else Draft([])
        drafting = time.perf_counter() - began
        if not draft.tokens:
            began = time.perf_counter()
            events = await plain_step(self.session, self.out, token, self.gen)
            self.policy.observed_step(time.perf_counter() - began)
            self.fed += 1
            self._count(1, 0, 0)
            return events
        drafts = draft.tokens[:k]
        began = time.perf_counter()
        logits = await self.session.verify([token, *drafts])  # [1 + k, V]
        verifying = time.perf_counter() - began
        events = self._verified(logits, drafts, draft.probs)
        accepted = sum(1 for e, d in zip(events, drafts, strict=False) if e.token_id == d)
        self.session.rewind(self.fed + 1 + accepted)  # the fed token and the drafts kept
        self.fed += 1 + accepted
        self.policy.observed_verify(len(drafts), accepted, verifying, drafting)
        self._count(len(events), len(drafts), accepted)
        return events

    def _verified(self, logits: torch.Tensor, drafts: list[int], probs: list[torch.Tensor] | None) -> list[TokenEvent]:
        """The tokens emitted from a verification step's logits [1 + k, V], in order."""
        events: list[TokenEvent] = []
        for i in range(len(drafts) + 1):
            draft = drafts[i] if i < len(drafts) else None
            q = probs[i] if probs is not None and draft is not None else None
            chosen = choose_verified(self.out.penalized(logits[i]), self.out.params, self.gen, draft, q)
            events.append(self.out.emit(logits[i], chosen))
            if events[-1].finish_reason or chosen != draft:
                break
        return events

    def _count(self, emitted: int, drafted: int, accepted: int) -> None:
        self.stats.steps += 1
        self.stats.tokens += emitted
        self.stats.drafted += drafted
        self.stats.accepted += accepted
