"""Speculative decoding: draft a few tokens cheaply, verify them in one engine step, keep the
longest run the model agrees with.

On a tensor-parallel cluster a decode step costs two all-reduces per layer whatever its width, so
verifying k drafted tokens costs about one step: every accepted draft is a step saved. The rule
that accepts a draft (`choose_verified`) keeps the output exactly what decoding without drafts
gives: under greedy decoding the same tokens; when sampling, the same distribution (the standard
speculative-sampling rule: accept draft d with probability min(1, p(d) / q(d)), else draw from
the normalised residual max(0, p - q)). Drafts come from a `Drafter` (models.drafting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from models.sampling import SamplingParams, token_probs

# The adaptive policy's prior: the acceptance rate it assumes before a request has any, and the
# cost of one more verified row as a share of a step before one was measured.
PRIOR_ACCEPTANCE = 0.6
PRIOR_ROW_COST = 0.05
EWMA = 0.3  # weight of the newest observation in the moving averages
PROBE_EVERY = 16  # with the policy at k = 0, draft one token every this many steps to re-measure


@dataclass(frozen=True)
class Draft:
    """Drafted tokens, and the distribution each was drawn from ([V] each; None: chosen outright,
    a point mass, as n-gram lookup and greedy drafting do)."""

    tokens: list[int]
    probs: list[torch.Tensor] | None = None


class Drafter(Protocol):
    """A request's source of drafts (models.drafting)."""

    async def propose(self, context: list[int], k: int, params: SamplingParams,
                      gen: torch.Generator | None) -> Draft:
        """Up to k tokens likely to follow `context` (prompt + output so far); may return none."""
        ...

    def close(self) -> None: ...


def choose_verified(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None,
                    draft: int | None = None, q: torch.Tensor | None = None) -> int:
    """The token to emit at a verified position, from the verifying model's logits [V] there
    (penalties applied): argmax when greedy, whatever the draft was. When sampling: `draft`
    accepted with probability min(1, p(draft) / q(draft)) (q None: the draft was a point mass,
    q(draft) = 1), else a draw from max(0, p - q) normalised; no draft: a draw from p."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    p = token_probs(logits, params)
    if draft is None:
        return int(torch.multinomial(p, 1, generator=gen))
    q_draft = 1.0 if q is None else float(q[draft])
    if q_draft > 0 and float(torch.rand(1, generator=gen)) * q_draft < float(p[draft]):
        return draft
    if q is None:
        residual = p.clone()
        residual[draft] = 0.0
    else:
        residual = (p - q).clamp_min(0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: nothing left to correct
        residual = p
    return int(torch.multinomial(residual, 1, generator=gen))


@dataclass
class StepCosts:
    """What steps cost on this server (one machine, one cluster): moving averages over every request."""

    step_s: float | None = None  # a plain one-token step
    row_s: float | None = None  # each verified row beyond the first
    draft_s: float = 0.0  # drafting one token


class DraftPolicy:
    """How many tokens one request drafts next (`k_max` at most; fewer near the end of its budget).

    Adaptive (the default): choose k maximising expected tokens per unit of time. With acceptance
    rate a (this request's moving average), a step verifying k drafts emits (1 - a^(k+1)) / (1 - a)
    tokens and costs step + k x (row + draft): the measured time of a plain step, the measured extra
    time of each verified row, and the measured time to draft one token (`StepCosts`, shared by the
    server's requests). Until a plain step was measured it takes plain steps. When drafting does not
    pay (a low acceptance rate) k is 0, with a one-token probe every PROBE_EVERY steps so a request
    whose text turns repetitive starts drafting again. Fixed (`adaptive=False`): always k_max.
    """

    def __init__(self, k_max: int, adaptive: bool = True, costs: StepCosts | None = None):
        self.k_max, self.adaptive = k_max, adaptive
        self.costs = costs or StepCosts()
        self.acceptance = PRIOR_ACCEPTANCE
        self._idle = 0

    def next_k(self, remaining: int) -> int:
        """Drafts for the next step, when `remaining` tokens may still be emitted (a step emits at
        most k + 1)."""
        limit = min(self.k_max, remaining - 1)
        if limit <= 0:
            return 0
        if not self.adaptive:
            return limit
        if self.costs.step_s is None:
            return 0  # measure a plain step first
        k = max(range(limit + 1), key=self._rate)
        if k == 0:
            self._idle += 1
            if self._idle >= PROBE_EVERY:
                self._idle, k = 0, 1
        return k

    def _rate(self, k: int) -> float:
        """Expected tokens per second of a step verifying k drafts (k = 0: a plain step)."""
        a, costs = min(self.acceptance, 0.999), self.costs
        tokens = (1 - a ** (k + 1)) / (1 - a)
        step = costs.step_s or 1.0
        row = costs.row_s if costs.row_s is not None else PRIOR_ROW_COST * step
        return tokens / (step + k * (row + costs.draft_s)) - (1e-9 * k)  # ties: fewer drafts

    def observed_step(self, seconds: float) -> None:
        self.costs.step_s = _ewma(self.costs.step_s, seconds)

    def observed_verify(self, drafted: int, accepted: int, seconds: float, draft_seconds: float) -> None:
        """A verification step of `drafted` drafts (`accepted` of them kept), its time and the time
        drafting took."""
        costs = self.costs
        self.acceptance = _ewma(self.acceptance, accepted / drafted)
        costs.draft_s = _ewma(costs.draft_s, draft_seconds / drafted)
        if costs.step_s is not None:  # a row costs at most a step: one outlier (a stall) must not stop drafting
            costs.row_s = _ewma(costs.row_s, min(max(0.0, seconds - costs.step_s) / drafted, costs.step_s))


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


@dataclass
class SpeculationStats:
    """Counters over every request (for /metrics)."""

    drafted: int = 0  # tokens drafted and verified
    accepted: int = 0  # of them, kept
    steps: int = 0  # engine steps of decoding (plain or verifying)
    tokens: int = 0  # tokens those steps emitted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0
