"""The generation loop, shared by the single-device model and the edge cluster.

An `Engine` (models.engine) runs forward steps (in its compute thread or across ranks); `generate` turns steps
into a stream of `TokenEvent`s with sampling, logprobs, eos, stop strings and length limits.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil
import torch

from models.config import LlamaConfig
from models.detokenize import IncrementalText
from models.engine import ClusterCounters, Engine, EngineStatus, PromptScores
from models.errors import GenerationError
from models.model import LocalModel
from models.sampling import SamplingParams, apply_penalties, choose_token, make_generator
from models.scoring import combine_scores, slice_scores


@dataclass
class TokenEvent:
    """One generated token, its natural-log probability, alternatives and the text it finalised."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" on the last event


class LocalSession:
    """A request on a LocalModel: its KV cache, stepped on the engine's one compute thread."""

    def __init__(self, engine: LocalEngine, capacity: int):
        self._engine = engine
        self._kv = engine.model.new_cache(capacity)

    async def step(self, tokens: list[int]) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._engine.compute, self._engine.model.forward,
                                          tokens, self._kv)

    async def close(self) -> None:
        self._kv = None  # type: ignore[assignment]


class LocalEngine:
    """One device, whole model: the reference engine and the `--workers 1` path."""

    def __init__(self, model: LocalModel):
        self.model = model
        self.config = model.config
        self.tokenizer = model.tokenizer
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    async def open_session(self, capacity: int = 64) -> LocalSession:
        return LocalSession(self, capacity)

    async def score(self, prompt_ids: list[int], k: int) -> PromptScores:
        """Log-probability of every prompt token after the first, and the top k at each position."""
        if len(prompt_ids) < 2:
            return []

        def run() -> torch.Tensor:
            logits = self.model.forward(prompt_ids, self.model.new_cache(len(prompt_ids)), all_logits=True)
            return slice_scores(logits[:-1], torch.tensor(prompt_ids[1:]), 0, k)

        part = await asyncio.get_running_loop().run_in_executor(self.compute, run)
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


def check_prompt(prompt_ids: list[int], config: LlamaConfig, vocab_limit: int) -> None:
    """Raise GenerationError (a client error) for an empty, out-of-vocabulary or too long prompt."""
    if not prompt_ids:
        raise GenerationError("the prompt is empty")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_limit]
    if bad:
        raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab_limit - 1})")
    if len(prompt_ids) >= config.max_position_embeddings:
        raise GenerationError(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                              f"{config.max_position_embeddings} tokens, so at most "
                              f"{config.max_position_embeddings - 1} prompt tokens fit")


def _event(logits: torch.Tensor, token: int, n_top: int) -> TokenEvent:
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # natural log, from the raw logits
    top: list[tuple[int, float]] = []
    if n_top > 0:
        values, ids = torch.topk(logprobs, min(n_top, logprobs.numel()))
        top = [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
    return TokenEvent(token_id=token, logprob=float(logprobs[token]), top_logprobs=top)


async def generate(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
    """Stream tokens for one request; raises GenerationError for prompts it cannot serve."""
    config = engine.config
    check_prompt(prompt_ids, config, config.vocab_size)
    budget = min(params.max_tokens, config.max_position_embeddings - len(prompt_ids))
    stop_ids = set() if params.ignore_eos else set(engine.tokenizer.eos_ids)
    stop_ids |= set(params.extra_stop_ids)
    text = IncrementalText(engine.tokenizer, prompt_ids, params.stop)
    gen, counts = make_generator(params.seed), Counter[int]()
    session = await engine.open_session(len(prompt_ids) + budget)
    try:
        logits, produced = await session.step(prompt_ids), 0
        while True:
            token = choose_token(apply_penalties(logits, counts, params), params, gen)
            event = _event(logits, token, params.logprobs)
            counts[token] += 1
            produced += 1
            event.text = text.add(token)
            if token in stop_ids or text.stopped:
                event.finish_reason = "stop"
            elif produced >= budget:
                event.finish_reason = "length"
            if event.finish_reason:
                event.text += text.flush()
                yield event
                return
            yield event
            logits = await session.step([token])
    finally:
        await session.close()
