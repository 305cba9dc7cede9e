"""The generation loop, shared by the single-device model and the edge cluster.

An `Engine` (models.engine) runs forward steps (in its compute thread or across ranks); `generate` turns steps
into a stream of `TokenEvent`s with sampling, logprobs, eos, stop strings and length limits, and
speculative decoding when asked (models.decoding, models.speculative).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import psutil
import torch

from models.config import LlamaConfig
from models.decoding import Output, PlainStep, SpeculativeStep, TokenEvent
from models.drafting import Speculation
from models.engine import ClusterCounters, Engine, EngineStatus, PromptScores
from models.errors import GenerationError
from models.model import LocalModel
from models.quant_kernels import warm_kernels
from models.sampling import SamplingParams, choose_token, make_generator
from models.scoring import combine_scores, slice_scores

T = TypeVar("T")
__all__ = ["TokenEvent", "generate", "LocalEngine", "check_prompt"]


class LocalSession:
    """A request on a LocalModel: its KV cache, stepped on the engine's one compute thread."""

    def __init__(self, engine: LocalEngine, capacity: int):
        self._engine = engine
        self._kv = engine.model.new_cache(capacity)

    def step(self, tokens: list[int]) -> Awaitable[torch.Tensor]:
        """Started on the compute thread at the call, not when awaited (models.decoding.PlainStep)."""
        model, kv = self._engine.model, self._kv
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._engine.compute, lambda: model.forward(tokens, kv))  # [V]

    async def verify(self, tokens: list[int]) -> torch.Tensor:
        return await self._engine.run_local(lambda: self._engine.model.forward(tokens, self._kv, True))  # [S, V]

    def rewind(self, length: int) -> None:
        self._kv.rewind(length)

    async def close(self) -> None:
        self._kv = None  # type: ignore[assignment]


class LocalEngine:
    """One device, whole model: the reference engine and the `--workers 1` path."""

    def __init__(self, model: LocalModel):
        self.model = model
        self.config = model.config
        self.tokenizer = model.tokenizer
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        warm_kernels()  # the first verification step must not pay for compiling them

    async def open_session(self, capacity: int = 64) -> LocalSession:
        return LocalSession(self, capacity)

    async def run_local(self, fn: Callable[[], T]) -> T:
        """Torch work on this device's one compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn)

    async def score(self, prompt_ids: list[int], k: int) -> PromptScores:
        """Log-probability of every prompt token after the first, and the top k at each position."""
        if len(prompt_ids) < 2:
            return []

        def run() -> torch.Tensor:
            logits = self.model.forward(prompt_ids, self.model.new_cache(len(prompt_ids)), all_logits=True)
            return slice_scores(logits[:-1], torch.tensor(prompt_ids[1:]), 0, k)

        part = await self.run_local(run)
        return combine_scores([part], k)

    def status(self) -> EngineStatus:
        """Always up; a request's KV may take what memory is free."""
        return EngineStatus(free_kv_bytes=psutil.virtual_memory().available)

    def counters(self) -> ClusterCounters | None:
        return None

    def offloaded(self) -> Engine | None:
        return None

    def close(self) -> None:
        self.compute.shutdown(wait=True)


def check_prompt(prompt_ids: list[int], config: LlamaConfig, vocab_limit: int,
                 params: SamplingParams = SamplingParams()) -> None:
    """Raise GenerationError (a client error) for an empty, out-of-vocabulary or too long prompt, or
    a logit_bias on a token outside the vocabulary."""
    if not prompt_ids:
        raise GenerationError("the prompt is empty")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_limit]
    if bad:
        raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab_limit - 1})")
    if bad := [t for t, _ in params.logit_bias if not 0 <= t < vocab_limit]:
        raise GenerationError(f"logit_bias token id {bad[0]} is outside the vocabulary (0..{vocab_limit - 1})")
    if len(prompt_ids) >= config.max_position_embeddings:
        raise GenerationError(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                              f"{config.max_position_embeddings} tokens, so at most "
                              f"{config.max_position_embeddings - 1} prompt tokens fit")


async def generate(engine: Engine, prompt_ids: list[int], params: SamplingParams,
                   speculation: Speculation | None = None) -> AsyncIterator[TokenEvent]:
    """Stream tokens for one request; raises GenerationError for prompts it cannot serve.

    With `speculation` on, each step may verify drafted tokens and emit several: the same tokens
    (greedy) or the same distribution (sampling) as without it. Unless the last event ends the
    request, the next step starts before its events are yielded; a consumer that leaves cancels it.
    """
    config = engine.config
    check_prompt(prompt_ids, config, config.vocab_size, params)
    budget = min(params.max_tokens, config.max_position_embeddings - len(prompt_ids))
    out, gen = Output(engine.tokenizer, prompt_ids, params, budget), make_generator(params.seed)
    speculating = speculation is not None and speculation.enabled
    room = speculation.num_draft_tokens if speculating else 0  # positions a last verification may fill
    session = await engine.open_session(len(prompt_ids) + budget + room)
    drafter = speculation.drafter(engine.run_local) if speculating else None
    ahead: asyncio.Future[list[TokenEvent]] | None = None
    step: PlainStep | SpeculativeStep | None = None
    try:
        logits = await session.step(prompt_ids)  # [V]
        events = [out.emit(logits, choose_token(out.penalized(logits), params, gen))]
        if drafter is not None:
            step = SpeculativeStep(session, out, drafter, speculation.policy(), speculation.stats, gen,
                                   len(prompt_ids))
        else:
            step = PlainStep(session, out, gen)
        while True:
            # The next step computes while the consumer takes these events: the consumer's work (the
            # HTTP write) overlaps the step instead of adding to every token's time.
            ahead = None if events[-1].finish_reason else asyncio.ensure_future(step(events[-1].token_id))
            for event in events:
                yield event
            if ahead is None:
                return
            events, ahead = await ahead, None
    finally:
        if ahead is not None:  # the consumer left mid-stream: the step in flight is not wanted
            ahead.cancel()
            await asyncio.gather(ahead, return_exceptions=True)
        if isinstance(step, PlainStep):  # a step queued for a token that ended the request
            await step.close()
        if drafter is not None:
            drafter.close()
        await session.close()
