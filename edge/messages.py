"""The cluster's control plane: every message between the master, its workers and attention nodes.

Each message is a frozen dataclass (edge.wire): the msgpack map of its fields plus the channel
tag `t` (and `op` for the master's commands on the "ctl" tag); decoding checks every field.

    worker -> master   Join, Ready, Heartbeat, RingLinked, AttentionLinked
    rank -> ring successor / attention node   Hello
    master -> worker   Plan | Refused, [Chunk | Piece for each FetchRequest], then commands:
                       OpenRequest, CloseRequest, Step, LinkRing (edge/ring.py), LinkAttention, Replan
    node   -> master   Join(role="attention"), NodeStats (heartbeat);  master -> node  NodePlan
The all-reduces themselves (transport.collectives, transport.fastpath) are the data plane.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge.wire import M, Message
from edge.wire import (
    receive as receive,  # re-exported: the callers' one import for the control plane
)
from edge.wire import send as send
from transport.channel import Channel
from transport.errors import FrameError

# --- joining -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Join(Message):
    """A device asks to take part: a compute worker (by rank) or an attention node (by node)."""

    TAG = "join"
    role: str = "worker"  # "worker" | "attention"
    rank: int | None = None
    node: int | None = None
    fingerprint: str | None = None  # of its checkpoint; None: it has none and fetches its shard
    profile: dict[str, Any] | None = None  # measured speed and memory, for --weights auto
    listen: list[Any] | None = None  # where ring neighbours (or compute ranks) reach it


@dataclass(frozen=True)
class Plan(Message):
    """The master's answer to a worker: the cluster's plan it must load its slice for."""

    TAG = "plan"
    world_size: int
    weights: list[float]
    dtype: str = "float32"
    quantize: str = "none"
    align: list[int] = field(default_factory=lambda: [1, 1])  # o_proj / down_proj slice alignment
    data_port: int | None = None  # the all-reduce data plane (transport.fastpath), when offered
    fetch: dict[str, Any] | None = None  # {files, plan}: the shard files it may fetch from the master
    config: dict[str, Any] | None = None  # config.json, with `fetch`
    position: int | None = None  # this device's place in the plan (None: its rank); differs after a re-plan
    rank: int | None = None  # the rank the master gave a worker that joined without one


@dataclass(frozen=True)
class Refused(Message):
    """The master refuses a device (wrong checkpoint, bad rank or node): fatal for that device."""

    TAG = "plan"
    error: str


@dataclass(frozen=True)
class NodePlan(Message):
    """The master's answer to an attention node: the model's config and how many nodes share it."""

    TAG = "plan"
    config: dict[str, Any]
    nodes: int


async def receive_plan(ch: Channel, kind: type[M], timeout: float) -> M | Refused:
    raw = await ch.recv("plan", timeout)
    return Refused.from_wire(raw) if "error" in raw else kind.from_wire(raw)


@dataclass(frozen=True)
class FetchRequest(Message):
    """A worker without its shard asks for the next chunk of one of its files (edge/fetch.py), or
    for elements start..stop of one `field` of a file along the dimension the plan splits it by
    (a re-plan: edge/reslice.py), or says it is done (`done`)."""

    TAG = "fetch"
    name: str | None = None
    offset: int = 0
    done: bool = False
    field: str | None = None
    start: int = 0
    stop: int = 0


@dataclass(frozen=True)
class Chunk(Message):
    """Up to edge.fetch.CHUNK bytes of a shard file from `offset`; `eof` after the last."""

    TAG = "chunk"
    name: str
    offset: int
    data: bytes
    eof: bool = False


@dataclass(frozen=True)
class Piece(Message):
    """Elements start..stop of one field of a shard file: its stored tensors as safetensors bytes."""

    TAG = "piece"
    name: str
    field: str
    start: int
    data: bytes


@dataclass(frozen=True)
class Ready(Message):
    """A worker loaded its slice for the plan."""

    TAG = "ready"
    rank: int
    weight_bytes: int = 0
    fixed_rss_bytes: int = 0
    fetched_bytes: int = 0
    budget_bytes: int | None = None  # its --memory-budget-mb (None: it holds its slice resident)


HEARTBEAT_S = 0.5  # a worker says it is alive this often ...
HEARTBEAT_TIMEOUT = 10.0  # ... and the master drops its link after this much silence


@dataclass(frozen=True)
class Heartbeat(Message):
    TAG = "hb"


@dataclass(frozen=True)
class NodeStats(Message):
    """An attention node's heartbeat: its KV bytes, memory and link bytes."""

    TAG = "stats"
    kv_bytes: int = 0
    rss: int = 0
    fixed_rss: int = 0
    available: int | None = None
    requests: int = 0
    links: dict[str, dict[str, int]] | None = None  # bytes to / from each compute rank


# --- the master's commands to its workers ("ctl") -------------------------------------------------

@dataclass(frozen=True)
class OpenRequest(Message):
    """Reserve a request's KV (re-opening drops what it held: a rebuild starts over)."""

    TAG, OP = "ctl", "open"
    rid: str
    cap: int = 64
    offload: bool = False  # its KV lives on the attention nodes


@dataclass(frozen=True)
class CloseRequest(Message):
    TAG, OP = "ctl", "close"
    rid: str


@dataclass(frozen=True)
class Step(Message):
    """One forward for a batch of requests: their hidden states after the embedding."""

    TAG, OP = "ctl", "step"
    rids: list[str]
    step: int
    h: dict[str, Any]  # edge.tensors.pack_tensor of [B, S, D]
    fast: bool = False  # the all-reduces run on the data plane
    score: int | None = None  # score the tokens (echo + logprobs), top k ...
    targets: list[int] | None = None  # ... against these next tokens
    # Per row: the positions its KV holds before this step; a store holding more forgets the rest
    # (drafted tokens the model rejected, or a shorter row's padding). None: as held.
    starts: list[int] | None = None
    every: bool = False  # the logits after every position (verifying drafted tokens), not only the last


@dataclass(frozen=True)
class LinkRing(Message):
    """Link to the ring neighbours for a new epoch (addresses by rank, as strings)."""

    TAG, OP = "ctl", "ring"
    epoch: int
    algorithm: str
    addrs: dict[str, list[Any]]


@dataclass(frozen=True)
class LinkAttention(Message):
    """Connect to the attention nodes for a new epoch (addresses by node, as strings)."""

    TAG, OP = "ctl", "attn"
    epoch: int
    nodes: int
    addrs: dict[str, list[Any]]

    def node_addrs(self) -> dict[int, list]:
        try:
            return {int(k): list(v) for k, v in self.addrs.items()}
        except ValueError as e:
            raise FrameError(f"bad attention link message: {e}") from e


@dataclass(frozen=True)
class Replan(Message):
    """Serve a new plan (a device was lost or came back): load this device's slice for it (what it
    already holds is kept), drop every request's KV (the master replays them), answer Replanned."""

    TAG, OP = "ctl", "replan"
    epoch: int
    world_size: int
    position: int
    weights: list[float]
    fetch: dict[str, Any] | None = None  # as in Plan, for a worker without a checkpoint
    config: dict[str, Any] | None = None


COMMANDS: dict[str, type[Message]] = {c.OP: c for c in (OpenRequest, CloseRequest, Step, LinkRing, LinkAttention,
                                                         Replan)}


async def receive_command(ch: Channel, timeout: float) -> Message:
    raw = await ch.recv("ctl", timeout)
    kind = COMMANDS.get(raw.get("op"))
    if kind is None:
        raise FrameError(f"unknown command {raw.get('op')!r}")
    return kind.from_wire(raw)


@dataclass(frozen=True)
class Hello(Message):
    """The first message on a link a rank dials: to its ring successor or to an attention node."""

    TAG = "iam"
    rank: int
    epoch: int = -1


@dataclass(frozen=True)
class RingLinked(Message):
    TAG = "ring.ok"
    epoch: int


@dataclass(frozen=True)
class Replanned(Message):
    """A worker's answer to Replan: loaded (its resident weight bytes), or why it could not."""

    TAG = "replan.ok"
    epoch: int
    weight_bytes: int = 0
    error: str | None = None
    fetched_bytes: int | None = None  # shard bytes it fetched for this plan (None: it kept its slice)


@dataclass(frozen=True)
class AttentionLinked(Message):
    TAG = "attn.ok"
    epoch: int
    error: str | None = None  # why this rank could not reach the nodes
