"""The cluster's control plane: every message between the master, its workers and attention nodes.

Each message is a frozen dataclass; on the wire it is the msgpack map of its fields plus the
channel tag `t` (and `op` for the master's commands on the "ctl" tag), as before. Decoding checks
every field's type, so a malformed message from a peer is a FrameError, never a KeyError later.

    worker -> master   Join, Ready, Heartbeat, RingLinked, AttentionLinked
    rank -> ring successor / attention node   Hello
    master -> worker   Plan | Refused, [Chunk for each FetchRequest], then commands: OpenRequest, CloseRequest, Step,
                       LinkRing (edge/ring.py), LinkAttention (edge/attention_pool.py)
    node   -> master   Join(role="attention"), NodeStats (heartbeat);  master -> node  NodePlan
The all-reduces themselves (transport.collectives, transport.fastpath) are the data plane.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from typing import Any, ClassVar, Self, TypeVar

from transport.channel import Channel
from transport.errors import FrameError


@dataclass(frozen=True)
class Message:
    """Base of every control message: `TAG` names its channel queue, `OP` the command on "ctl"."""

    TAG: ClassVar[str]
    OP: ClassVar[str | None] = None

    def wire(self) -> dict[str, Any]:
        """The msgpack map: tag (and op) plus every field that is set."""
        head = {"t": self.TAG} | ({"op": self.OP} if self.OP else {})
        return head | {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Self:
        """Check and build; FrameError names the message and the field that is wrong."""
        hints, values = _hints(cls), {}
        for f in fields(cls):
            if f.name not in raw:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise FrameError(f"{cls.__name__} message without {f.name!r}")
                continue
            value = raw[f.name]
            if not _fits(value, hints[f.name]):
                raise FrameError(f"{cls.__name__} message: {f.name}={value!r:.60} is not {hints[f.name]}")
            values[f.name] = value
        return cls(**values)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a decoded msgpack value matches a field's annotation (ints pass as floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_fits(k, args[0]) and _fits(v, args[1])
                                                             for k, v in value.items()))
    return isinstance(value, origin or hint)


M = TypeVar("M", bound=Message)


async def send(ch: Channel, msg: Message) -> None:
    await ch.send(msg.wire())


async def receive(ch: Channel, kind: type[M], timeout: float) -> M:
    """The next message of `kind` on its tag; FrameError when it is malformed."""
    return kind.from_wire(await ch.recv(kind.TAG, timeout))


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
    says it is done (`done`)."""

    TAG = "fetch"
    name: str | None = None
    offset: int = 0
    done: bool = False


@dataclass(frozen=True)
class Chunk(Message):
    """Up to edge.fetch.CHUNK bytes of a shard file from `offset`; `eof` after the last."""

    TAG = "chunk"
    name: str
    offset: int
    data: bytes
    eof: bool = False


@dataclass(frozen=True)
class Ready(Message):
    """A worker loaded its slice for the plan."""

    TAG = "ready"
    rank: int
    weight_bytes: int = 0
    fixed_rss_bytes: int = 0
    fetched_bytes: int = 0


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


COMMANDS: dict[str, type[Message]] = {c.OP: c for c in (OpenRequest, CloseRequest, Step, LinkRing, LinkAttention)}


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
class AttentionLinked(Message):
    TAG = "attn.ok"
    epoch: int
    error: str | None = None  # why this rank could not reach the nodes
