"""OpenAI's `logprobs` shapes: completions' (tokens, token_logprobs, top_logprobs, text_offset; an
echoed prompt's first) and chat's (`content` entries with their bytes)."""

from __future__ import annotations

from models.generation import TokenEvent
from models.tokenizer import Tokenizer


def _top_dict(top: list[tuple[int, float]], tokenizer: Tokenizer) -> dict[str, float]:
    """Completions' top_logprobs map, best first; tokens whose texts coincide keep the best value."""
    out: dict[str, float] = {}
    for token_id, logprob in top:
        out.setdefault(tokenizer.token_text(token_id), logprob)
    return out


def completion_logprobs(events: list[TokenEvent], tokenizer: Tokenizer, offset: int = 0) -> dict:
    """OpenAI completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [tokenizer.token_text(e.token_id) for e in events]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [_top_dict(e.top_logprobs, tokenizer) for e in events],
            "text_offset": offsets}


def prompt_logprobs(prompt_ids: list[int], scores: list[tuple[float, list[tuple[int, float]]]],
                    tokenizer: Tokenizer, echo_text: str) -> dict:
    """The echoed prompt's part of completions `logprobs`: its first token has no logprob (None),
    every later one the model's log-probability given those before it, and the top alternatives.
    Offsets point into the echoed text; a token it does not show (a BOS) takes no width."""
    tokens = [tokenizer.token_text(t) for t in prompt_ids]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        if echo_text.startswith(t, pos):
            pos += len(t)
    return {"tokens": tokens, "token_logprobs": [None] + [lp for lp, _ in scores],
            "top_logprobs": [None] + [_top_dict(top, tokenizer) for _, top in scores],
            "text_offset": offsets}


def joined_logprobs(first: dict | None, second: dict | None) -> dict | None:
    """Two completions `logprobs` blocks one after the other (the echoed prompt, then the output)."""
    if first is None or second is None:
        return first or second
    return {key: first[key] + second[key] for key in first}


def chat_logprobs(events: list[TokenEvent], tokenizer: Tokenizer) -> dict:
    """OpenAI chat `logprobs.content` entries."""
    def entry(token_id: int, logprob: float) -> dict:
        return {"token": tokenizer.token_text(token_id), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes(token_id))}

    return {"content": [entry(e.token_id, e.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in e.top_logprobs]}
                        for e in events]}
