"""Which tier answers a request: the edge cluster, its attention-offload route or the cloud.

The policy itself is pure (scheduler.router.decide); this module measures what it needs from the
engine's status, the admission queue, the cloud tier and the request's headers, and records the
decision on the request (x-edge-route / x-edge-route-reason on the answer).
"""

from __future__ import annotations

from aiohttp import web

from models.engine import EngineStatus
from models.sharding import full_dims, kv_bytes_per_token
from scheduler import openai_api as api
from scheduler.errors import ApiError
from scheduler.router import ROUTES, Decision, RouteInputs, RouteRefused, decide
from scheduler.state import ADMISSION, CLOUD, ENGINE, MEASURED, METRICS, ROUTE_KEY, SETTINGS


def choose_route(request: web.Request, req: api.ParsedRequest) -> Decision:
    """Measure the tiers and ask the pure policy; raises ApiError for an impossible forced route."""
    engine = request.app[ENGINE]
    forced = req_forced(request)
    if forced is not None and forced not in ROUTES:
        raise ApiError(400, f"x-edge-route must be one of {list(ROUTES)}, got {forced!r}", param="x-edge-route")
    status = engine.status()
    inputs = _route_inputs(request, req, forced, status)
    try:
        return decide(inputs)
    except RouteRefused as e:
        missing = status.missing_ranks
        detail = f" (worker rank(s) {missing} not connected)" if missing else ""
        if forced == "offload" and not missing:
            detail = f" ({status.offload.reason if status.offload else 'no attention nodes are configured'})"
        raise ApiError(400 if forced else 503, f"{e}{detail}",
                       "invalid_request_error" if forced else "service_unavailable",
                       param="x-edge-route" if forced else None, code=None if forced else "worker_unavailable") from e


def _latency_target(request: web.Request) -> float | None:
    raw = request.headers.get("x-edge-latency-target-ms")
    if raw is None:
        return None
    try:
        target = float(raw)
    except ValueError:
        target = -1.0
    if not target > 0:
        raise ApiError(400, f"x-edge-latency-target-ms must be a positive number of milliseconds, got {raw!r}",
                       param="x-edge-latency-target-ms")
    return target / 1000


def _route_inputs(request: web.Request, req: api.ParsedRequest, forced: str | None,
                  status: EngineStatus) -> RouteInputs:
    """What the policy needs, measured now: memory, queue, tiers up, moving latencies."""
    admission, cloud = request.app[ADMISSION], request.app.get(CLOUD)
    measured, config = request.app[MEASURED], request.app[ENGINE].config
    offload = status.offload if status.offload is not None and status.offload.ready else None
    return RouteInputs(
        prompt_tokens=len(req.prompt_ids), max_tokens=req.params.max_tokens,
        kv_bytes_per_token=kv_bytes_per_token(config, full_dims(config)),
        edge_free_kv_bytes=status.free_kv_bytes,
        edge_queue_full=admission.queue_full(req.sequences),
        edge_up=status.up,
        cloud_configured=cloud is not None, cloud_up=cloud is not None and cloud.up,
        offload_nodes=offload.nodes if offload else 0,
        offload_free_kv_bytes=offload.free_kv_bytes if offload else 0,
        edge_ttft_s=measured.ttft("edge"), edge_tpot_s=measured.tpot("edge"),
        cloud_ttft_s=measured.ttft("cloud"), cloud_tpot_s=measured.tpot("cloud"),
        latency_target_s=_latency_target(request), forced=forced,  # type: ignore[arg-type]
        policy=request.app[SETTINGS].policy, sequences=req.sequences)


def set_route(request: web.Request, decision: Decision) -> None:
    request[ROUTE_KEY] = decision
    request.app[METRICS].routes.labels(decision.route).inc()


def route_headers(decision: Decision) -> dict[str, str]:
    return {"x-edge-route": decision.route, "x-edge-route-reason": decision.reason}


def req_forced(request: web.Request) -> str | None:
    return request.headers.get("x-edge-route")
