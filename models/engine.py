"""The contract between the HTTP front end (scheduler/) and whatever runs the model.

One device (models.generation.LocalEngine) and the edge cluster (edge.master.ClusterEngine)
both implement `Engine`; the scheduler sees nothing else of them. The types here are shared
by both sides, so they live below both: the front end imports this module, never edge/.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from models.config import LlamaConfig
from models.tokenizer import Tokenizer

T = TypeVar("T")
# Per prompt position after the first: its natural-log probability and the top k (id, logprob).
PromptScores = list[tuple[float, list[tuple[int, float]]]]


class EngineUnavailable(Exception):
    """The engine cannot serve now (a rank is missing or failed mid-step); the front end answers
    503 with this message, or fails over to another route when nothing was sent yet."""


@dataclass(frozen=True)
class OffloadStatus:
    """The attention-offload route (Lamina): nodes configured, whether every one is linked."""

    nodes: int
    ready: bool
    missing: list[int]
    reason: str  # why the route is closed ("" when ready)
    free_kv_bytes: int  # what one request's KV could take on the nodes


@dataclass(frozen=True)
class EngineStatus:
    """What /health and the router read, taken at one moment."""

    missing_ranks: list[int] = field(default_factory=list)  # devices of the plan that cannot take part now
    free_kv_bytes: int = 0  # what one request's KV could take on the compute devices
    offload: OffloadStatus | None = None  # None: no attention nodes configured
    lost_ranks: list[int] = field(default_factory=list)  # devices the cluster serves without (re-planned)
    plan: list[dict] = field(default_factory=list)  # per device serving: rank, heads, kv_heads, mlp_columns
    replan_refused: str = ""  # why the cluster could not re-plan on the devices left ("" if it could)

    @property
    def up(self) -> bool:
        return not self.missing_ranks


@dataclass(frozen=True)
class ClusterCounters:
    """Live counters of a cluster for /metrics; per-rank maps are keyed by rank."""

    links: dict[int, dict[str, int]]  # bytes rank 0 sent to / received from each rank
    weight_bytes: dict[int, int]  # resident weight bytes
    timing: dict[int, dict]  # forward / all-reduce seconds and counts
    window: dict[int, dict]  # weight-window counters (ranks with a memory budget)
    fixed_rss: dict[int, int]  # each worker's RSS before its weights
    fetched: dict[int, int]  # shard bytes each worker fetched when it last joined
    attention: dict | None  # attention-node stats, when configured
    kv_rebuilds: int  # offloaded requests rebuilt on the compute ranks
    steps: int  # cluster-wide forwards
    step_rows: int  # request-steps they carried
    plan: list[dict] = field(default_factory=list)  # as EngineStatus.plan
    replans: int = 0  # plans adopted after a device was lost or came back
    replan_seconds: float = 0.0  # the time they took, in all
    last_replan_seconds: float = 0.0
    last_replan_started_at: float = 0.0  # unix time
    last_replan_load_seconds: float = 0.0  # loading the new slices, of last_replan_seconds
    replayed: int = 0  # requests rebuilt from their tokens on a new plan
    devices: dict[int, dict] = field(default_factory=dict)  # per worker: host, up, heartbeat age, budget
    budget_bytes: int | None = None  # rank 0's memory budget (None: resident)


class Session(Protocol):
    """Per-request state on the engine (its KV caches); released with `close`."""

    def step(self, tokens: list[int]) -> Awaitable[torch.Tensor]:
        """Feed new tokens, get the next-token logits [V] (float32). An engine may start the step at
        the call (models.decoding.PlainStep calls it before it awaits it)."""
        ...

    async def verify(self, tokens: list[int]) -> torch.Tensor:
        """Feed new tokens (drafted ones among them), get the logits after each of them [S, V]."""
        ...

    def rewind(self, length: int) -> None:
        """Keep the first `length` positions fed so far, forget the rest (drafts the model rejected);
        raises ValueError beyond what was fed."""
        ...

    async def close(self) -> None: ...


class Engine(Protocol):
    """Everything the front end uses of an engine."""

    config: LlamaConfig
    tokenizer: Tokenizer

    async def open_session(self, capacity: int) -> Session:
        """A request's session, its KV cache reserved for `capacity` positions (prompt + max tokens);
        raises EngineUnavailable."""
        ...

    async def score(self, prompt_ids: list[int], k: int) -> PromptScores:
        """`echo` with `logprobs`: each prompt token's logprob given those before it, and the top k."""
        ...

    def status(self) -> EngineStatus: ...

    def counters(self) -> ClusterCounters | None:
        """Cluster counters for /metrics (None: a single device has none)."""
        ...

    def offloaded(self) -> Engine | None:
        """The same engine with every session's KV on the attention nodes (None: no such route)."""
        ...

    async def run_local(self, fn: Callable[[], T]) -> T:
        """Torch work on the master device's compute thread (a draft model runs there: one OpenMP
        pool per process, not two competing for the cores)."""
        ...
