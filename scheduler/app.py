"""The aiohttp application: routes, typed state and the handlers of the OpenAI-compatible API."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError

from models.generation import Engine, TokenEvent, generate
from scheduler import openai_api as api
from scheduler.errors import ApiError, as_api_error, error_body, error_middleware
from scheduler.metrics import Metrics


@dataclass(frozen=True)
class ServerSettings:
    served_name: str
    request_timeout: float = 600.0


ENGINE = web.AppKey("engine", Engine)
SETTINGS = web.AppKey("settings", ServerSettings)
METRICS = web.AppKey("metrics", Metrics)


async def _observed(metrics: Metrics, stream: AsyncIterator[TokenEvent], prompt_len: int) -> AsyncIterator[TokenEvent]:
    """Pass events through while recording time to first token and time per output token."""
    last = time.perf_counter()
    first = True
    metrics.running.inc()
    try:
        async for event in stream:
            now = time.perf_counter()
            if first:
                metrics.ttft.observe(now - last)
                metrics.prompt_tokens.inc(prompt_len)
            else:
                metrics.tpot.observe(now - last)
            first, last = False, now
            metrics.tokens.inc()
            yield event
    finally:
        metrics.running.dec()
        await stream.aclose()


def _generate(request: web.Request, req: api.ParsedRequest) -> AsyncIterator[TokenEvent]:
    stream = generate(request.app[ENGINE], req.prompt_ids, req.params)
    return _observed(request.app[METRICS], stream, len(req.prompt_ids))


@web.middleware
async def metrics_middleware(request: web.Request, handler):
    response = await handler(request)
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
    request.app[METRICS].requests.labels(route, str(response.status)).inc()
    return response


def _check_model(body: Any, settings: ServerSettings) -> None:
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and model != settings.served_name:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {settings.served_name!r}",
                       param="model", code="model_not_found")


async def _read_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from e


def _choice(req: api.ParsedRequest, engine: Engine, events: list[TokenEvent], text: str,
            finish: str | None, offset: int = 0) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if req.chat:
        choice["message"] = {"role": "assistant", "content": text}
        if req.params.logprobs:
            choice["logprobs"] = api.chat_logprobs(events, engine.tokenizer)
    else:
        choice["text"] = text
        if req.params.logprobs:
            choice["logprobs"] = api.completion_logprobs(events, engine.tokenizer, offset)
    if req.return_token_ids:
        choice["token_ids"] = [e.token_id for e in events]
    return choice


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    engine, settings = request.app[ENGINE], request.app[SETTINGS]
    body = await _read_body(request)
    _check_model(body, settings)
    req = api.parse_request(body, engine.tokenizer, engine.config.max_position_embeddings, chat)
    rid, created = api.new_id(chat), api.now()
    head = {"id": rid, "created": created, "model": settings.served_name,
            "object": "chat.completion" if chat else "text_completion"}
    if req.stream:
        return await _stream(request, req, head)
    events: list[TokenEvent] = []
    async with asyncio.timeout(settings.request_timeout):
        async for event in _generate(request, req):
            events.append(event)
    text = "".join(e.text for e in events)
    choice = _choice(req, engine, events, text, events[-1].finish_reason)
    return web.json_response(head | {"choices": [choice],
                                     "usage": api.usage(len(req.prompt_ids), len(events))})


async def _stream(request: web.Request, req: api.ParsedRequest, head: dict) -> web.StreamResponse:
    """Server-sent events; an error after the first byte is sent as an error event, then [DONE].

    A client that disconnects stops the generation: the stream is closed, which frees the KV cache.
    """
    engine = request.app[ENGINE]
    stream = _generate(request, req)
    try:
        first = await anext(stream)  # errors before any output still become a proper HTTP status
    except BaseException:
        await stream.aclose()
        raise
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    chunk_head = head | {"object": "chat.completion.chunk" if req.chat else "text_completion"}

    async def send(obj: dict) -> None:
        await response.write(f"data: {json.dumps(obj)}\n\n".encode())

    if req.chat:
        await send(chunk_head | {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
    count, offset = 0, 0
    try:
        event: TokenEvent | None = first
        while event is not None:
            count += 1
            choice = _choice(req, engine, [event], event.text, event.finish_reason, offset)
            offset += len(event.text)
            if req.chat:
                choice["delta"] = {"content": choice.pop("message")["content"]}
            await send(chunk_head | {"choices": [choice]})
            event = await anext(stream, None)
    except (ClientConnectionResetError, ConnectionResetError):
        request.app[METRICS].cancelled.inc()
        await stream.aclose()
        return response
    except Exception as e:  # noqa: BLE001 - headers are gone; report in-band and end the stream
        await send(error_body(as_api_error(e)))
    finally:
        await stream.aclose()
    if req.include_usage:
        await send(chunk_head | {"choices": [], "usage": api.usage(len(req.prompt_ids), count)})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def models(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response({"object": "list", "data": [
        {"id": settings.served_name, "object": "model", "created": 0, "owned_by": "edge-llm",
         "max_model_len": request.app[ENGINE].config.max_position_embeddings}]})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    missing = engine.missing_ranks() if hasattr(engine, "missing_ranks") else []
    if missing:
        return web.json_response({"status": "unavailable", "missing_ranks": missing,
                                  "message": f"worker rank(s) {missing} are not connected"}, status=503)
    return web.json_response({"status": "ok"})


def create_app(engine: Engine, settings: ServerSettings) -> web.Application:
    """The HTTP front end over an engine (one device or a cluster master)."""
    app = web.Application(middlewares=[metrics_middleware, error_middleware],
                          client_max_size=8 * 1024 * 1024)
    app[ENGINE] = engine
    app[SETTINGS] = settings
    app[METRICS] = Metrics(getattr(engine, "snapshot", None))
    app.router.add_routes([
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat_completions),
        web.get("/v1/models", models),
        web.get("/health", health),
        web.get("/metrics", metrics),
    ])
    return app
