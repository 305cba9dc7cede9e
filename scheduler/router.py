"""The routing policy: a pure function from what the front end measures to a route and a reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Route = Literal["edge", "cloud", "offload"]
ROUTES: tuple[Route, ...] = ("edge", "cloud", "offload")


class RouteRefused(Exception):
    """A forced route that cannot be served (its tier is absent or down); the API answers 400/503."""


@dataclass(frozen=True)
class Policy:
    """Thresholds of the policy: `[policy]` in the cluster TOML, `--edge-kv-fraction` etc. in emulation."""

    edge_kv_fraction: float = 0.5  # share of a compute device's free memory KV caches may take
    offload_kv_fraction: float = 0.8  # the same on attention nodes, which exist to hold KV
    offload_above_tokens: int | None = None  # longer contexts (prompt + max tokens) go to attention nodes
    cloud_above_tokens: int | None = None  # longer contexts go to the cloud (its larger model)


@dataclass(frozen=True)
class RouteInputs:
    """One request and the state of the tiers at the moment it arrives (measured, not configured)."""

    prompt_tokens: int  # the request's longest prompt
    max_tokens: int
    kv_bytes_per_token: int  # the whole model's KV per token (2 x layers x kv_heads x head_dim x 4)
    edge_free_kv_bytes: int  # free memory of the compute devices, as KV of one request could use it
    edge_queue_full: bool
    edge_up: bool
    cloud_configured: bool
    cloud_up: bool
    offload_nodes: int = 0  # attention nodes linked and ready
    offload_free_kv_bytes: int = 0  # the same as edge_free_kv_bytes, for the attention nodes
    edge_ttft_s: float | None = None  # measured (moving averages); None until measured
    edge_tpot_s: float | None = None
    cloud_ttft_s: float | None = None  # includes the cloud round trip
    cloud_tpot_s: float | None = None
    latency_target_s: float | None = None  # the request's x-edge-latency-target-ms
    forced: Route | None = None
    policy: Policy = field(default_factory=Policy)
    sequences: int = 1  # its choices (prompts x n): each holds a KV cache of its own

    @property
    def context_tokens(self) -> int:
        """One sequence's context: what the token thresholds compare."""
        return self.prompt_tokens + self.max_tokens

    @property
    def kv_needed(self) -> int:
        """The KV cache of all the request's sequences (each as long as the longest may get)."""
        return self.context_tokens * self.kv_bytes_per_token * self.sequences

    @property
    def cloud(self) -> bool:
        return self.cloud_configured and self.cloud_up

    @property
    def offload_fits(self) -> bool:
        return self.offload_nodes > 0 and self.kv_needed <= self.offload_free_kv_bytes * self.policy.offload_kv_fraction


@dataclass(frozen=True)
class Decision:
    route: Route
    reason: str


def _forced(inputs: RouteInputs) -> Decision:
    route = inputs.forced
    available = {"edge": inputs.edge_up, "cloud": inputs.cloud, "offload": inputs.offload_nodes > 0 and inputs.edge_up}
    if not available[route]:
        raise RouteRefused(f"route {route!r} was asked for with x-edge-route but is not available now")
    return Decision(route, "forced by the x-edge-route header")


def _estimate(ttft: float | None, tpot: float | None, tokens: int) -> float | None:
    return None if ttft is None or tpot is None else ttft + tokens * tpot


def _too_long(inputs: RouteInputs) -> Decision | None:
    """Offload or cloud for a context the compute devices should not hold; None when it fits."""
    p, mb = inputs.policy, inputs.kv_needed / (1 << 20)
    seqs = f" ({inputs.sequences} sequences)" if inputs.sequences > 1 else ""
    if p.cloud_above_tokens is not None and inputs.context_tokens > p.cloud_above_tokens and inputs.cloud:
        return Decision("cloud", f"context of {inputs.context_tokens} tokens is above cloud_above_tokens "
                                 f"({p.cloud_above_tokens})")
    over_memory = inputs.kv_needed > inputs.edge_free_kv_bytes * p.edge_kv_fraction
    over_tokens = p.offload_above_tokens is not None and inputs.context_tokens > p.offload_above_tokens
    if not (over_memory or over_tokens):
        return None
    why = (f"KV cache of {mb:.1f} MB{seqs} exceeds {p.edge_kv_fraction:.0%} of the compute devices' free memory"
           if over_memory else f"context of {inputs.context_tokens} tokens is above offload_above_tokens "
                               f"({p.offload_above_tokens})")
    if inputs.offload_fits:
        return Decision("offload", why)
    if inputs.cloud:
        return Decision("cloud", f"{why} and no attention node can take it")
    return Decision("edge", f"{why}, but neither attention nodes nor a cloud tier can take it; "
                            "serving on the edge")


def _latency(inputs: RouteInputs) -> Decision | None:
    """Cloud when the edge's measured speed misses the request's latency target and the cloud's may not."""
    target = inputs.latency_target_s
    edge = _estimate(inputs.edge_ttft_s, inputs.edge_tpot_s, inputs.max_tokens)
    if target is None or edge is None or edge <= target or not inputs.cloud:
        return None
    cloud = _estimate(inputs.cloud_ttft_s, inputs.cloud_tpot_s, inputs.max_tokens)
    if cloud is not None and cloud >= edge:
        return None
    cloud_text = "not measured yet" if cloud is None else f"{cloud * 1000:.0f} ms"
    return Decision("cloud", f"latency target {target * 1000:.0f} ms: the edge would take about "
                             f"{edge * 1000:.0f} ms, the cloud {cloud_text}")


def decide(inputs: RouteInputs) -> Decision:
    """Edge first; offload (or cloud) when the context outgrows the edge; cloud when the edge is
    down, full, or too slow for the request's latency target. Raises RouteRefused for an
    impossible forced route."""
    if inputs.forced is not None:
        return _forced(inputs)
    if not inputs.edge_up:
        if inputs.cloud:
            return Decision("cloud", "the edge cluster is down")
        raise RouteRefused("the edge cluster is down and no cloud tier is available")
    decision = _too_long(inputs)
    if decision is not None:
        return decision
    if inputs.edge_queue_full and inputs.cloud:
        return Decision("cloud", "the edge queue is full")
    decision = _latency(inputs)
    if decision is not None:
        return decision
    if inputs.cloud_configured and not inputs.cloud_up:
        return Decision("edge", "the cloud tier is down")
    return Decision("edge", "the edge cluster has room")
