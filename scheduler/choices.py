"""A request's choices on the edge: one generation each (prompt p's j-th of `n` is choice p x n + j),
their events merged as they come, and each choice's answer in the OpenAI shape.

Why a module of its own: the whole and the streamed answers (scheduler.completions) read the same
choices; a batch of prompts on /v1/completions is just more choices, each with its own prompt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from aiohttp import web

from models.engine import Engine, EngineUnavailable
from models.generation import TokenEvent, generate
from scheduler import logprobs
from scheduler import openai_api as api
from scheduler.state import ENGINE, MEASURED, METRICS, ROUTE_KEY, SPECULATION

Indexed = tuple[int, TokenEvent]


async def _observed(request: web.Request, stream: AsyncIterator[TokenEvent],
                    prompt_len: int) -> AsyncIterator[TokenEvent]:
    """Pass events through while recording time to first token and time per output token
    (in /metrics, and in the route's moving averages the router reads)."""
    metrics = request.app[METRICS]
    decision = request.get(ROUTE_KEY)
    latency = request.app[MEASURED].tier(decision.route if decision is not None else "edge")
    last, first = time.perf_counter(), True
    metrics.running.inc()
    try:
        async for event in stream:
            now = time.perf_counter()
            if first:
                metrics.ttft.observe(now - last)
                latency.ttft.add(now - last)
                metrics.prompt_tokens.inc(prompt_len)
            else:
                metrics.tpot.observe(now - last)
                latency.tpot.add(now - last)
            first, last = False, now
            metrics.tokens.inc()
            yield event
    finally:
        metrics.running.dec()
        await stream.aclose()


def engine_for(request: web.Request) -> Engine:
    """The engine of the route taken: the cluster, or the cluster with its KV on the attention nodes."""
    engine, decision = request.app[ENGINE], request.get(ROUTE_KEY)
    if decision is None or decision.route != "offload":
        return engine
    offloaded = engine.offloaded()
    if offloaded is None:
        raise EngineUnavailable("this engine has no attention nodes")
    return offloaded


async def merged(request: web.Request, req: api.ParsedRequest) -> AsyncIterator[Indexed]:
    """The events of every choice as (index, event), interleaved as they are produced. With a
    seed, a prompt's choice j samples with seed + j: the same as that prompt sent alone."""
    streams = []
    engine = engine_for(request)
    for prompt_ids, j in req.choice_prompts:
        params = req.params if req.params.seed is None else replace(req.params, seed=req.params.seed + j)
        stream = generate(engine, prompt_ids, params, request.app[SPECULATION])
        streams.append(_observed(request, stream, len(prompt_ids)))
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=pending.__getitem__):
                i = pending.pop(fut)
                event = fut.result()  # a failed choice fails the request
                yield i, event
                if event.finish_reason is None:
                    pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            await s.aclose()


def choice(request: web.Request, req: api.ParsedRequest, index: int, events: list[TokenEvent],
           text: str, finish: str | None, offset: int = 0) -> dict[str, Any]:
    """Choice `index` of an answer (or of a chunk) with `events`' tokens and `text`."""
    tokenizer = request.app[ENGINE].tokenizer
    out: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
    if req.chat:
        out["message"] = {"role": "assistant", "content": text}
        if req.want_logprobs:
            out["logprobs"] = logprobs.chat_logprobs(events, tokenizer)
    else:
        out["text"] = text
        if req.want_logprobs:
            out["logprobs"] = logprobs.completion_logprobs(events, tokenizer, offset)
    if req.return_token_ids:
        out["token_ids"] = [e.token_id for e in events]
    return out


async def echoed_logprobs(request: web.Request, req: api.ParsedRequest) -> list[dict | None]:
    """With `echo` and `logprobs` on /v1/completions: each prompt's own logprobs (one extra prefill
    each), in prompt order; Nones without."""
    if not (req.echo_texts and req.want_logprobs):
        return [None] * len(req.prompts)
    tokenizer, engine = request.app[ENGINE].tokenizer, engine_for(request)
    scored = []
    for ids, text in zip(req.prompts, req.echo_texts, strict=True):
        scores = await engine.score(ids, req.params.logprobs)
        scored.append(logprobs.prompt_logprobs(ids, scores, tokenizer, text))
    return scored
