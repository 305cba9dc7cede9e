"""The web page (`GET /`) and its live feed (`GET /v1/events`, server-sent events).

The page is one static file shipped in the package (scheduler/static/index.html: no build step,
no CDN). The feed sends a JSON snapshot of the cluster every FEED_INTERVAL_S: each device (rank,
host, state, heads and MLP columns held, resident weight bytes, window counters, heartbeat age,
bytes on its link), the attention nodes, the cloud tier, tokens so far, time per output token,
the route mix and re-plans. It is a /v1 route, so `--api-key` guards it like the API.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp import web

from models.engine import ClusterCounters, EngineStatus
from scheduler.router import ROUTES
from scheduler.state import CLOUD, ENGINE, MEASURED, METRICS, SETTINGS

FEED_INTERVAL_S = 0.5
PAGE = Path(__file__).with_name("static") / "index.html"


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE, headers={"Cache-Control": "no-cache"})


async def events(request: web.Request) -> web.StreamResponse:
    """Snapshots as server-sent events until the client goes away."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    while True:
        await response.write(f"data: {json.dumps(snapshot(request.app))}\n\n".encode())
        await asyncio.sleep(FEED_INTERVAL_S)


def snapshot(app: web.Application) -> dict:
    engine, metrics, measured, cloud = app[ENGINE], app[METRICS], app[MEASURED], app.get(CLOUD)
    status, counters = engine.status(), engine.counters()
    registry = metrics.registry
    return {
        "model": app[SETTINGS].served_name,
        "devices": devices(status, counters),
        "attention": counters.attention if counters else None,
        "cloud": {"configured": cloud is not None, "up": bool(cloud is not None and cloud.up)},
        "tokens": registry.get_sample_value("edge_generated_tokens_total") or 0.0,
        "running": registry.get_sample_value("edge_requests_running") or 0.0,
        "tpot_s": measured.tpot("edge"), "ttft_s": measured.ttft("edge"),
        "routes": {r: registry.get_sample_value("edge_routes_total", {"route": r}) or 0.0 for r in ROUTES},
        "replans": counters.replans if counters else 0, "replan_refused": status.replan_refused,
    }


def devices(status: EngineStatus, counters: ClusterCounters | None) -> list[dict]:
    """Every device the cluster has or had: serving (in the plan), lost (planned around), missing."""
    if counters is None:
        return [{"rank": 0, "state": "serving", "host": "this machine"}]
    plan = {p["rank"]: p for p in status.plan}
    ranks = sorted({0, *plan, *status.lost_ranks, *status.missing_ranks, *counters.devices})
    out = []
    for rank in ranks:
        state = ("missing" if rank in status.missing_ranks else "lost" if rank in status.lost_ranks
                 else "serving" if rank in plan else "joining")
        device = counters.devices.get(rank, {"host": "this machine (master)", "up": True, "heartbeat_age_s": 0.0,
                                             "budget_bytes": counters.budget_bytes})
        out.append(plan.get(rank, {}) | device | {
            "rank": rank, "state": state, "weight_bytes": counters.weight_bytes.get(rank),
            "link": counters.links.get(rank), "window": counters.window.get(rank)})
    return out
