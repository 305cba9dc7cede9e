"""Sampling parameters and the choice of the next token from logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation; validated by the API layer before it gets here."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # how many alternatives per step (0-20)
    # The chosen token's logprob. The API asks for it only when the request wants logprobs: it
    # costs a log-softmax over the vocabulary on the event loop per token (SmolLM2: 49152 exps).
    keep_logprob: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's and transformers': over the prompt and the output
    min_p: float = 0.0  # vLLM's and llama.cpp's: drop tokens below min_p x the likeliest one's probability
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, added to its logit)
    extra_stop_ids: tuple[int, ...] = field(default=())  # vLLM's stop_token_ids: end after any of them


def apply_penalties(logits: torch.Tensor, counts: dict[int, int], params: SamplingParams,
                    seen: set[int] | None = None) -> torch.Tensor:
    """OpenAI presence/frequency penalties over the tokens generated so far (`counts`), then the
    repetition penalty over every token `seen` (prompt and output): a positive logit divided by it,
    a negative one multiplied, as transformers' RepetitionPenaltyLogitsProcessor and vLLM do; then
    OpenAI's logit_bias, added."""
    openai = counts and (params.presence_penalty != 0 or params.frequency_penalty != 0)
    repetition = seen and params.repetition_penalty != 1.0
    if not (openai or repetition or params.logit_bias):
        return logits
    logits = logits.clone()
    if openai:
        ids = torch.tensor(list(counts.keys()))
        freq = torch.tensor(list(counts.values()), dtype=logits.dtype)
        logits[ids] -= params.frequency_penalty * freq + params.presence_penalty
    if repetition:
        ids = torch.tensor(list(seen))  # a set: no repeats, and the order does not matter
        picked = logits[ids]
        logits[ids] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    for token, bias in params.logit_bias:
        logits[token] += bias
    return logits


def token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [V] float32 (penalties applied) -> the distribution sampling draws from at temperature > 0:
    temperature, then top-k, then min-p, then top-p (nucleus) truncation."""
    scaled = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, 0) - sorted_probs > params.top_p  # keep the first over p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def choose_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """logits: [V] float32 -> token id: argmax at temperature 0, else top-k/top-p sampling."""
    if params.temperature <= 0:  # numpy: no torch op (and OpenMP team) on the event loop's thread
        return int(np.argmax(logits.detach().numpy()))
    return int(torch.multinomial(token_probs(logits, params), 1, generator=gen))


def make_generator(seed: int | None) -> torch.Generator | None:
    """A per-request generator so a seed reproduces a request whatever else the server runs."""
    if seed is None:
        return None
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
