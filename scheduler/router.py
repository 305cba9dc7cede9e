"""The routing policy: a pure function from what the front end measures to a route and a reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Route = Literal["edge", "cloud", "offload"]
ROUTES: tuple[Route, ...] = ("edge", "cloud", "offload")


class RouteRefused(Exception):
    """A forced route that cannot be served (its tier is absent or down); the API answers 400/503."""


@dataclass(frozen=True)
class RouteInputs:
    """One request and the state of the tiers at the moment it arrives."""

    prompt_tokens: int
    max_tokens: int
    kv_bytes_per_token: int  # on the edge devices, summed over ranks
    edge_free_kv_bytes: int  # what the edge devices can still give to KV caches
    edge_queue_full: bool
    edge_up: bool
    cloud_configured: bool
    cloud_up: bool
    offload_nodes: int = 0
    forced: Route | None = None


@dataclass(frozen=True)
class Decision:
    route: Route
    reason: str


def _forced(inputs: RouteInputs) -> Decision:
    route = inputs.forced
    available = {"edge": inputs.edge_up, "cloud": inputs.cloud_configured and inputs.cloud_up,
                 "offload": inputs.offload_nodes > 0 and inputs.edge_up}
    if not available[route]:
        raise RouteRefused(f"route {route!r} was asked for with x-edge-route but is not available now")
    return Decision(route, "forced by the x-edge-route header")


def decide(inputs: RouteInputs) -> Decision:
    """Edge first; offload when the KV cache outgrows the edge devices; cloud when the edge cannot.

    Raises RouteRefused for a forced route that is impossible.
    """
    if inputs.forced is not None:
        return _forced(inputs)
    cloud = inputs.cloud_configured and inputs.cloud_up
    kv_needed = (inputs.prompt_tokens + inputs.max_tokens) * inputs.kv_bytes_per_token
    if not inputs.edge_up:
        if cloud:
            return Decision("cloud", "the edge cluster is down")
        raise RouteRefused("the edge cluster is down and no cloud tier is available")
    if kv_needed > inputs.edge_free_kv_bytes:
        if inputs.offload_nodes > 0:
            return Decision("offload", f"KV cache of {kv_needed >> 20} MB exceeds the edge devices' free memory")
        if cloud:
            return Decision("cloud", f"KV cache of {kv_needed >> 20} MB exceeds the edge devices' free memory "
                                     "and no attention node is available")
    if inputs.edge_queue_full and cloud:
        return Decision("cloud", "the edge queue is full")
    if not cloud and inputs.cloud_configured:
        return Decision("edge", "the cloud tier is down")
    return Decision("edge", "the edge cluster has room")
