"""The aiohttp application factory: routes, middlewares, and the small read-only endpoints."""

from __future__ import annotations

import asyncio

from aiohttp import web

from models.drafting import Speculation
from models.engine import Engine
from scheduler import dashboard
from scheduler.admission import Admission
from scheduler.cloud import CloudTier
from scheduler.completions import complete, ensure_api_key
from scheduler.errors import error_middleware
from scheduler.measure import Measured
from scheduler.metrics import Metrics
from scheduler.openai_api import check_model
from scheduler.routing import route_headers
from scheduler.state import (
    ADMISSION,
    CLOUD,
    ENGINE,
    MEASURED,
    METRICS,
    ROUTE_KEY,
    SETTINGS,
    SPECULATION,
    ServerSettings,
)
from scheduler.tokenizing import detokenize, tokenize

__all__ = ["ServerSettings", "create_app"]


@web.middleware
async def metrics_middleware(request: web.Request, handler):
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        response = await handler(request)
    except asyncio.CancelledError:  # the client left (the server cancels its handler): 499, not a 500
        request.app[METRICS].requests.labels(route, "499").inc()
        raise
    request.app[METRICS].requests.labels(route, str(response.status)).inc()
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler):
    ensure_api_key(request, request.app[SETTINGS].api_key)
    return await handler(request)


async def completions(request: web.Request) -> web.StreamResponse:
    return await complete(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await complete(request, chat=True)


def _model_card(request: web.Request) -> dict:
    return {"id": request.app[SETTINGS].served_name, "object": "model", "created": 0, "owned_by": "edge-llm",
            "max_model_len": request.app[ENGINE].config.max_position_embeddings}


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request)]})


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{id} (the SDK's models.retrieve): the served model, else 404 in the error shape."""
    card = _model_card(request)
    check_model({"model": request.match_info["model_id"]}, card["id"])
    return web.json_response(card)


async def health(request: web.Request) -> web.Response:
    """200 while every device of the plan served is connected, else 503 naming the missing ranks;
    also the plan (devices, heads and MLP columns each), devices the cluster re-planned without
    (lost_ranks), and attention nodes (offload is an extra route: the edge serves without them)."""
    status = request.app[ENGINE].status()
    missing = status.missing_ranks
    body: dict = {"status": "ok", "lost_ranks": status.lost_ranks, "plan": status.plan}
    if status.replan_refused:
        body["replan_refused"] = status.replan_refused
    if status.offload is not None:
        body["attention_nodes"] = {"ready": status.offload.ready, "missing": status.offload.missing}
    if missing:
        body |= {"status": "unavailable", "missing_ranks": missing,
                 "message": f"worker rank(s) {missing} are not connected"}
        return web.json_response(body, status=503)
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    admission = request.app[ADMISSION]
    request.app[METRICS].queue.set(admission.waiting)
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _route_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every routed answer says which tier served it (x-edge-route) and why."""
    decision = request.get(ROUTE_KEY)
    if decision is not None and "x-edge-route" not in response.headers:
        response.headers.update(route_headers(decision))


async def _cloud_ctx(app: web.Application):
    settings = app[SETTINGS]
    if settings.cloud is not None:
        app[CLOUD] = CloudTier(settings.cloud, app[MEASURED].tier("cloud"))
        await app[CLOUD].probe()
    yield
    if CLOUD in app:
        await app[CLOUD].aclose()


def create_app(engine: Engine, settings: ServerSettings, speculation: Speculation | None = None) -> web.Application:
    """The HTTP front end over an engine (one device or a cluster master), speculating as asked."""
    app = web.Application(middlewares=[metrics_middleware, error_middleware, auth_middleware],
                          client_max_size=8 * 1024 * 1024)
    app[ENGINE] = engine
    app[SETTINGS] = settings
    app[SPECULATION] = speculation or Speculation()
    app[METRICS] = Metrics(engine.counters, app[SPECULATION].stats)
    app[ADMISSION] = Admission(settings.max_running, settings.max_queue)
    app[MEASURED] = Measured()
    app.cleanup_ctx.append(_cloud_ctx)
    app.on_response_prepare.append(_route_headers)
    app.router.add_routes([
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat_completions),
        web.get("/v1/models", models),
        web.get("/v1/models/{model_id:.+}", model),
        web.post("/tokenize", tokenize),
        web.post("/detokenize", detokenize),
        web.get("/health", health),
        web.get("/", dashboard.page),
        web.get("/v1/events", dashboard.events),
        web.get("/metrics", metrics),
    ])
    return app
