"""`/v1/completions` and `/v1/chat/completions`: one flow, two response shapes, streamed or not."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError

from models.engine import EngineUnavailable
from models.generation import TokenEvent
from scheduler import logprobs
from scheduler import openai_api as api
from scheduler.choices import Indexed, choice, echoed_logprobs, merged
from scheduler.cloud import CloudUnavailable
from scheduler.errors import ApiError, as_api_error, error_body
from scheduler.router import Decision
from scheduler.routing import choose_route, req_forced, route_headers, set_route
from scheduler.state import ADMISSION, CLOUD, ENGINE, METRICS, SETTINGS


async def complete(request: web.Request, chat: bool) -> web.StreamResponse:
    """Parse, route, admit, generate; the error middleware maps whatever is raised to a status."""
    engine, settings = request.app[ENGINE], request.app[SETTINGS]
    body = await api.read_json_object(request, settings.body_timeout)
    api.check_model(body, settings.served_name)
    req = api.parse_request(body, engine.tokenizer, engine.config.max_position_embeddings, chat)
    decision = choose_route(request, req)
    forced_route = req_forced(request)
    path = "/chat/completions" if chat else "/completions"
    if decision.route == "cloud":
        # a forced cloud route must not quietly land on the edge
        return await _via_cloud(request, path, body, req, decision, edge_fallback=forced_route is None)
    set_route(request, decision)
    try:
        return await _on_edge(request, req)
    except EngineUnavailable as e:  # nothing was sent yet: the local ranks or the cloud may still answer
        if decision.route == "offload" and not forced_route and engine.status().up:
            set_route(request, Decision("edge", f"offload failed before any output ({e})"))
            return await _on_edge(request, req)
        cloud = request.app.get(CLOUD)
        if cloud is None or not cloud.up:
            raise
        return await _via_cloud(request, path, body, req, Decision("cloud", f"the edge failed: {e}"),
                                edge_fallback=False)


async def _on_edge(request: web.Request, req: api.ParsedRequest) -> web.StreamResponse:
    """Admit and generate on the edge cluster, streamed or whole."""
    settings = request.app[SETTINGS]
    head = {"id": api.new_id(req.chat), "created": api.now(), "model": settings.served_name,
            "object": "chat.completion" if req.chat else "text_completion"}
    if settings.system_fingerprint is not None:
        head["system_fingerprint"] = settings.system_fingerprint
    deadline = asyncio.get_running_loop().time() + settings.request_timeout  # time queued counts too
    try:
        async with request.app[ADMISSION].slot(deadline, req.sequences):
            if req.stream:
                return await _stream(request, req, head, deadline)
            async with asyncio.timeout_at(deadline):
                return await _whole(request, req, head)
    except asyncio.CancelledError:  # the client disconnected, queued or generating: nothing more runs
        request.app[METRICS].cancelled.inc()
        raise


async def _via_cloud(request: web.Request, path: str, body: dict, req: api.ParsedRequest,
                     decision: Decision, edge_fallback: bool) -> web.StreamResponse:
    """Proxy to the cloud tier; if it fails before answering, fall back to the edge when it can."""
    cloud = request.app[CLOUD]
    set_route(request, decision)
    try:
        return await cloud.forward(request, path, body, route_headers(decision))
    except CloudUnavailable as e:
        if not edge_fallback:
            raise ApiError(503, f"{e}; the edge cannot serve this request either", "service_unavailable") from e
        set_route(request, Decision("edge", f"the cloud tier failed ({e})"))
        return await _on_edge(request, req)


async def _whole(request: web.Request, req: api.ParsedRequest, head: dict) -> web.Response:
    echoed = await echoed_logprobs(request, req)
    events: list[list[TokenEvent]] = [[] for _ in req.choice_prompts]
    async for i, event in merged(request, req):
        events[i].append(event)
    choices = []
    for i, evs in enumerate(events):
        prefix = req.echo_text(i)
        answer = choice(request, req, i, evs, prefix + "".join(e.text for e in evs), evs[-1].finish_reason,
                        len(prefix))
        answer["logprobs"] = logprobs.joined_logprobs(echoed[i // req.n], answer["logprobs"])
        choices.append(answer)
    completion_tokens = sum(len(evs) for evs in events)
    return web.json_response(head | {"choices": choices, "usage": api.usage(req.prompt_tokens, completion_tokens)})


async def _stream(request: web.Request, req: api.ParsedRequest, head: dict, deadline: float) -> web.StreamResponse:
    """Server-sent events ending in `data: [DONE]`; an error after the headers is an error event.

    A client that disconnects stops the generation: the streams close, which frees the KV caches.
    """
    echoed = await echoed_logprobs(request, req)
    events = merged(request, req)
    try:
        first = await anext(events)  # errors before any output still get a proper HTTP status
    except BaseException:
        await events.aclose()
        raise
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    chunk_head = head | {"object": "chat.completion.chunk" if req.chat else "text_completion"}
    if req.include_usage:  # as OpenAI: every chunk has `usage`, null until the last one carries it
        chunk_head["usage"] = None

    async def send(obj: dict) -> None:
        await response.write(f"data: {json.dumps(obj)}\n\n".encode())

    progress = {"text": "", "tokens": 0}
    try:
        async with asyncio.timeout_at(deadline):
            await _send_events(request, req, chunk_head, first, events, send, progress, echoed)
    except (ClientConnectionResetError, ConnectionResetError):
        request.app[METRICS].cancelled.inc()
        return response
    except Exception as e:
        await events.aclose()
        if not (isinstance(e, EngineUnavailable) and await _migrate(request, req, chunk_head, progress, send)):
            await send(error_body(as_api_error(e)))
    finally:
        await events.aclose()
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _migrate(request: web.Request, req: api.ParsedRequest, chunk_head: dict, progress: dict,
                   send) -> bool:
    """The edge failed mid-stream: continue on the cloud from the prompt plus the text so far.

    The client sees one continuous stream. Only for one choice; False when the cloud cannot take it.
    """
    cloud = request.app.get(CLOUD)
    if cloud is None or not cloud.up or len(req.choice_prompts) != 1:
        return False
    tokenizer = request.app[ENGINE].tokenizer
    params = req.params
    body = {"prompt": tokenizer.decode_with_special(req.prompt_ids) + progress["text"],
            "max_tokens": max(1, params.max_tokens - progress["tokens"]), "temperature": params.temperature,
            "top_p": params.top_p, "stop": list(params.stop) or None}
    request.app[METRICS].routes.labels("cloud").inc()
    try:
        async for text, finish in cloud.stream_completion(body):
            choice = {"index": 0, "finish_reason": finish, "logprobs": None}
            choice |= {"delta": {"content": text}} if req.chat else {"text": text}
            await send(chunk_head | {"choices": [choice]})
    except CloudUnavailable as e:
        await send(error_body(ApiError(503, f"the edge failed and so did the cloud mid-stream: {e}",
                                       "service_unavailable")))
    return True


async def _send_events(request: web.Request, req: api.ParsedRequest, chunk_head: dict, first: Indexed,
                       events: AsyncIterator[Indexed], send, progress: dict, echoed: list[dict | None]) -> None:
    offsets = [len(req.echo_text(i)) for i in range(len(req.choice_prompts))]
    for i in range(len(offsets)):
        opening = {"role": "assistant", "content": ""} if req.chat else None
        if opening or req.echo_text(i):
            delta = {"delta": opening} if req.chat else {"text": req.echo_text(i), "logprobs": echoed[i // req.n]}
            await send(chunk_head | {"choices": [{"index": i, "finish_reason": None} | delta]})
    item: Indexed | None = first
    count = 0
    while item is not None:
        i, event = item
        count += 1
        answer = choice(request, req, i, [event], event.text, event.finish_reason, offsets[i])
        offsets[i] += len(event.text)
        progress["text"] += event.text
        progress["tokens"] += 1
        if req.chat:
            answer["delta"] = {"content": answer.pop("message")["content"]}
        await send(chunk_head | {"choices": [answer]})
        item = await anext(events, None)
    if req.include_usage:
        await send(chunk_head | {"choices": [], "usage": api.usage(req.prompt_tokens, count)})


def ensure_api_key(request: web.Request, api_key: str | None) -> None:
    """Bearer-token check on /v1 routes and /tokenize, /detokenize; raises ApiError(401)."""
    if api_key is None or not (request.path.startswith("/v1/") or request.path in ("/tokenize", "/detokenize")):
        return
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):  # constant time: no timing oracle
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       "authentication_error", code="invalid_api_key")
