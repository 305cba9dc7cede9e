"""OpenAI request parsing and validation, and the answers' ids and usage (the logprobs shapes: scheduler.logprobs)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from models.sampling import SamplingParams
from models.tokenizer import TEMPLATE_VARIABLES, Tokenizer
from scheduler.errors import ApiError
from scheduler.fields import in_range, typed, valid_text
from scheduler.sampling_fields import sampling_params

MAX_N = 8
MAX_CHOICES = 32  # prompts x n in one request: each choice is a sequence with a KV cache of its own
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True)
class ParsedRequest:
    prompts: list[list[int]]  # one; several for a completions batch (`prompt` a list of prompts)
    params: SamplingParams
    stream: bool
    return_token_ids: bool
    include_usage: bool
    chat: bool
    n: int = 1
    want_logprobs: bool = False
    echo_texts: tuple[str, ...] = ()  # with `echo`: each prompt's text, put before its choices' text

    @property
    def prompt_ids(self) -> list[int]:
        """The longest prompt: what a route is sized by (every choice holds its own context)."""
        return max(self.prompts, key=len)

    @property
    def sequences(self) -> int:
        """Sequences generated: every choice of every prompt."""
        return len(self.prompts) * self.n

    @property
    def choice_prompts(self) -> list[tuple[list[int], int]]:
        """Each choice's prompt and its sample number j < n, in choice order: prompt p's j-th choice
        has index p x n + j, as OpenAI and vLLM number a batch's choices."""
        return [(ids, j) for ids in self.prompts for j in range(self.n)]

    def echo_text(self, choice: int) -> str:
        """What choice `choice`'s text starts with: its prompt's text with `echo`, else nothing."""
        return self.echo_texts[choice // self.n] if self.echo_texts else ""

    @property
    def prompt_tokens(self) -> int:
        """`usage.prompt_tokens`: each prompt counted once, however many choices it has."""
        return sum(len(ids) for ids in self.prompts)


async def read_json_object(request: Any, timeout: float) -> dict:
    """The request body as a UTF-8 JSON object; raises ApiError(400) for another JSON value, and one
    that quotes the parser for a body that does not parse, also for another declared charset, nesting
    too deep or numbers too long to parse (never a 500), and ApiError(408) for a body that has not
    arrived within `timeout` seconds (a client that stalls holds nothing)."""
    charset = (request.charset or "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise ApiError(400, f"charset {request.charset!r} is not supported; send the JSON body as UTF-8")
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError as e:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from e
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from e
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ApiError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def check_model(body: Any, served_name: str) -> None:
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string, got {type(model).__name__}", param="model")
    if model is not None and model != served_name:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {served_name!r}",
                       "not_found_error", param="model", code="model_not_found")


def _prompts(body: dict, tokenizer: Tokenizer) -> list[tuple[list[int], str | None]]:
    """`prompt` as OpenAI takes it: a string, token ids, or a batch (a list) of either -> each
    prompt's ids and, when given as text, that text."""
    prompt = body.get("prompt")
    batch = isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt)
    prompts = prompt if batch else [prompt]
    if len(prompts) > MAX_CHOICES:
        raise ApiError(400, f"'prompt' holds {len(prompts)} prompts; at most {MAX_CHOICES} in one request",
                       param="prompt")
    return [(_one_prompt(p, tokenizer), p if isinstance(p, str) else None) for p in prompts]


def _one_prompt(prompt: Any, tokenizer: Tokenizer) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(valid_text(prompt, "prompt"))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise ApiError(400, "'prompt' must be a string or a non-empty list of token ids, or a list of those (a batch)",
                   param="prompt")


def parse_messages(body: dict) -> list[dict[str, Any]]:
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
        valid_text(m["content"], "messages")
    return messages


def template_kwargs(body: dict) -> dict[str, Any]:
    """vLLM's `chat_template_kwargs`: more variables for the chat template (Qwen3's enable_thinking)."""
    kwargs = typed(body, "chat_template_kwargs", dict, {})
    taken = sorted(k for k in kwargs if k in TEMPLATE_VARIABLES or not isinstance(k, str) or not k.isidentifier())
    if taken:
        raise ApiError(400, f"'chat_template_kwargs' may not set {taken}: the server sets {list(TEMPLATE_VARIABLES)} "
                            "and names must be identifiers", param="chat_template_kwargs")
    return kwargs


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
               "best_of": (None, 1), "suffix": (None, "")}


def _refuse_unsupported(body: dict) -> None:
    """A field we would otherwise ignore silently is a 400 that names it (as the client relies on it)."""
    for key, harmless in UNSUPPORTED.items():
        if key in body and not any(body[key] == h and type(body[key]) is type(h) for h in harmless):
            raise ApiError(400, f"'{key}' is not supported by this server; remove it from the request",
                           param=key, code="unsupported_parameter")


def parse_request(body: dict, tokenizer: Tokenizer, context: int, chat: bool) -> ParsedRequest:
    """Validate a completions or chat body (a JSON object, `read_json_object`); raises ApiError(400/413)
    that says what to change."""
    _refuse_unsupported(body)
    given = [(tokenizer.encode_chat(parse_messages(body), template_kwargs(body)), None)] if chat \
        else _prompts(body, tokenizer)
    max_tokens = _max_tokens(body, max(len(ids) for ids, _ in given), context, chat, len(given) > 1)
    n = typed(body, "n", int, 1)
    in_range("n", n, 1, MAX_N)
    if n * len(given) > MAX_CHOICES:
        raise ApiError(400, f"{len(given)} prompts x n = {n} is {n * len(given)} choices; at most {MAX_CHOICES} "
                            "in one request", param="n")
    params, want_logprobs = sampling_params(body, chat, max_tokens, n)
    stream_options = typed(body, "stream_options", dict, {})
    echo = not chat and typed(body, "echo", bool, False)
    echo_texts = tuple(tokenizer.decode(ids) if text is None else text for ids, text in given) if echo else ()
    return ParsedRequest([ids for ids, _ in given], params, typed(body, "stream", bool, False),
                         typed(body, "return_token_ids", bool, False),
                         bool(stream_options.get("include_usage", False)), chat, n, want_logprobs, echo_texts)


def _max_tokens(body: dict, longest: int, context: int, chat: bool, batch: bool) -> int:
    """`max_tokens` (chat: `max_completion_tokens` first), checked so that the longest prompt and its
    output fit the context window; raises ApiError(413/400) that says what to ask for."""
    what, prompt = "messages" if chat else "prompt", "the longest prompt" if batch else "the prompt"
    if longest >= context:
        raise ApiError(413, f"{prompt} has {longest} tokens; the context window is {context}",
                       param=what, code="context_length_exceeded")
    max_tokens = typed(body, "max_completion_tokens", int, None) if chat else None
    if max_tokens is None:
        max_tokens = typed(body, "max_tokens", int, 16 if not chat else context - longest)
    in_range("max_tokens", max_tokens, 1, context)
    if longest + max_tokens > context:  # as vLLM: say so rather than stop short silently
        raise ApiError(400, f"{prompt} has {longest} tokens and max_tokens is {max_tokens}: "
                            f"{longest + max_tokens} in all, more than the context window of {context}; "
                            f"ask for at most {context - longest} tokens", param="max_tokens",
                       code="context_length_exceeded")
    return max_tokens


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
