"""OpenAI request parsing and validation, and the response shapes (as vLLM and llama.cpp serve them)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from models.generation import TokenEvent
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer
from scheduler.errors import ApiError

MAX_STOP = 4


MAX_N = 8
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class ParsedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    return_token_ids: bool
    include_usage: bool
    chat: bool
    n: int = 1
    want_logprobs: bool = False
    echo_text: str = ""


async def read_json(request: Any, timeout: float) -> Any:
    """The request body as UTF-8 JSON; raises ApiError(400) that quotes the parser, also for another
    declared charset, nesting too deep or numbers too long to parse (never a 500), and ApiError(408)
    for a body that has not arrived within `timeout` seconds (a client that stalls holds nothing)."""
    charset = (request.charset or "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise ApiError(400, f"charset {request.charset!r} is not supported; send the JSON body as UTF-8")
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError as e:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from e
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from e
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ApiError(400, f"request body is not valid JSON: {e}") from e


def check_model(body: Any, served_name: str) -> None:
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string, got {type(model).__name__}", param="model")
    if model is not None and model != served_name:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {served_name!r}",
                       "not_found_error", param="model", code="model_not_found")


def _typed(body: dict, key: str, types: type | tuple, default: Any) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(400, f"'{key}' must be {getattr(types, '__name__', types)}, got a boolean", param=key)
    if not isinstance(value, types):
        raise ApiError(400, f"'{key}' has the wrong type ({type(value).__name__})", param=key)
    return value


def _in_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ApiError(400, f"'{key}' must be between {low} and {high}, got {value}", param=key)


def _text(value: str, key: str) -> str:
    """A string the tokenizer can take: valid Unicode (no lone surrogates such as "\\ud800")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"'{key}' is not valid Unicode text ({e.reason} at position {e.start})",
                       param=key) from e
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP} strings", param="stop")
    return tuple(_text(s, "stop") for s in stops)


def _prompt_ids(body: dict, tokenizer: Tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenizer.encode(_text(prompt, "prompt"))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids", param="prompt")


def _messages(body: dict) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "each message needs a string 'role'", param="messages")
        if m["role"] not in ROLES:
            raise ApiError(400, f"message role {m['role'][:40]!r} is not one of {sorted(ROLES)}", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            m["content"] = "".join(_text_part(p) for p in content)
        elif not isinstance(content, str):
            raise ApiError(400, "each message needs string 'content'", param="messages")
        _text(m["content"], "messages")
    return messages


def _text_part(part: Any) -> str:
    """One content part of a chat message; only {"type": "text", "text": str} is served here."""
    if not isinstance(part, dict) or part.get("type", "text") != "text":
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise ApiError(400, f"content parts of type {kind!r} are not supported; send text parts",
                       param="messages")
    if not isinstance(part.get("text"), str):
        raise ApiError(400, "a text content part needs a string 'text'", param="messages")
    return part["text"]


# OpenAI fields this server does not implement, with the values that ask for nothing (accepted).
UNSUPPORTED = {"tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
               "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
               "logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None, "")}


def _refuse_unsupported(body: dict) -> None:
    """A field we would otherwise ignore silently is a 400 that names it (as the client relies on it)."""
    for key, harmless in UNSUPPORTED.items():
        if key in body and not any(body[key] == h and type(body[key]) is type(h) for h in harmless):
            raise ApiError(400, f"'{key}' is not supported by this server; remove it from the request",
                           param=key, code="unsupported_parameter")


def parse_request(body: Any, tokenizer: Tokenizer, context: int, chat: bool) -> ParsedRequest:
    """Validate a completions or chat body; raises ApiError(400/413) that says what to change."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _refuse_unsupported(body)
    prompt_ids = tokenizer.encode_chat(_messages(body)) if chat else _prompt_ids(body, tokenizer)
    if len(prompt_ids) >= context:
        raise ApiError(413, f"the prompt has {len(prompt_ids)} tokens; the context window is {context}",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    max_tokens = _typed(body, "max_completion_tokens", int, None) if chat else None
    if max_tokens is None:
        max_tokens = _typed(body, "max_tokens", int, 16 if not chat else context - len(prompt_ids))
    _in_range("max_tokens", max_tokens, 1, context)
    if len(prompt_ids) + max_tokens > context:  # as vLLM: say so rather than stop short silently
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens}: "
                            f"{len(prompt_ids) + max_tokens} in all, more than the context window of {context}; "
                            f"ask for at most {context - len(prompt_ids)} tokens", param="max_tokens",
                       code="context_length_exceeded")
    temperature = float(_typed(body, "temperature", (int, float), 1.0))
    _in_range("temperature", temperature, 0.0, 2.0)
    top_p = float(_typed(body, "top_p", (int, float), 1.0))
    _in_range("top_p", top_p, 1e-9, 1.0)
    n = _typed(body, "n", int, 1)
    _in_range("n", n, 1, MAX_N)
    if chat:
        want_logprobs = _typed(body, "logprobs", bool, False)
        top = _typed(body, "top_logprobs", int, 0)
        _in_range("top_logprobs", top, 0, 20)
    else:
        want_logprobs = body.get("logprobs") is not None
        top = _typed(body, "logprobs", int, 0)
        _in_range("logprobs", top, 0, 5)
    top_k = _typed(body, "top_k", int, 0)
    _in_range("top_k", top_k, -1, 1 << 20)
    penalties = {key: float(_typed(body, key, (int, float), 0.0))
                 for key in ("presence_penalty", "frequency_penalty")}
    for key, value in penalties.items():
        _in_range(key, value, -2.0, 2.0)
    seed = _typed(body, "seed", int, None)
    if seed is not None:  # choice i samples with seed + i: every one must fit a 64-bit generator seed
        _in_range("seed", seed, -(1 << 63), (1 << 63) - n)
    stream_options = _typed(body, "stream_options", dict, {})
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=max(top_k, 0), seed=seed, stop=_stop(body),
                            ignore_eos=_typed(body, "ignore_eos", bool, False), logprobs=top,
                            keep_logprob=want_logprobs, **penalties)
    echo = not chat and _typed(body, "echo", bool, False)
    echo_text = (body["prompt"] if isinstance(body["prompt"], str) else tokenizer.decode(prompt_ids)) \
        if echo else ""
    return ParsedRequest(prompt_ids, params, _typed(body, "stream", bool, False),
                         _typed(body, "return_token_ids", bool, False),
                         bool(stream_options.get("include_usage", False)), chat, n, want_logprobs, echo_text)


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


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


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
