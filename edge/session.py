"""A request on the cluster: its KV caches (rank 0's here, the others' on the workers under the same
id, or all of them on the attention nodes), the tokens fed so far, and the way its steps are queued.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import torch

from edge.messages import CloseRequest, OpenRequest
from edge.offload import RemoteKV
from models.attention import KVCache
from models.engine import ClusterCounters, EngineStatus, EngineUnavailable, PromptScores

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from edge.batcher import StepBatcher
    from edge.master import ClusterEngine
    from edge.messages import Message


class ClusterSession:
    """One request's state on the cluster (a models.engine.Session).

    Keeps every token fed so far (`history`), so KV lost with an attention node is rebuilt on the
    compute ranks by replaying them (`replay`: the next step feeds the history first).
    """

    def __init__(self, rid: str, kv: KVCache | RemoteKV, capacity: int, batcher: StepBatcher,
                 command: Callable[[Message, bool], Awaitable[None]], registry: set[ClusterSession],
                 context: int = 1 << 30):
        self.rid, self.kv, self.capacity, self.context = rid, kv, capacity, context  # context: the model's
        self.offload = isinstance(kv, RemoteKV)
        self._batcher, self._command, self._registry = batcher, command, registry
        registry.add(self)  # the engine's open sessions: a re-plan rebuilds each of them
        self.history: list[int] = []
        self.replay = False
        self.failed = False  # it lost a worker: no more steps
        self.closed = False

    async def rebuild(self, kv: KVCache) -> None:
        """Its KV is lost (a re-plan, an attention node): release what the attention nodes held and
        start over in `kv`, replaying its history."""
        if isinstance(self.kv, RemoteKV):
            await self.kv.close()
        self.kv, self.offload, self.replay = kv, False, True

    def open_command(self) -> OpenRequest:
        """What the workers need to hold this request's KV (sent again after a rebuild)."""
        return OpenRequest(self.rid, self.capacity, self.offload)

    def step(self, tokens: list[int]) -> Awaitable[torch.Tensor]:
        """New tokens -> next-token logits [V], batched with other requests' decode steps. Queued with
        the step runner at the call, not when awaited (models.decoding.PlainStep relies on it)."""
        return _as_tensor(self._submit(tokens, False))  # [V]

    def verify(self, tokens: list[int]) -> Awaitable[torch.Tensor]:
        """New tokens (the last chosen one and drafts after it) -> the logits after each [S, V]."""
        return _as_tensor(self._submit(tokens, True))  # [S, V]

    def rewind(self, length: int) -> None:
        """Keep the first `length` positions; every rank forgets the rest at the next step."""
        if not 0 <= length <= len(self.history):
            raise ValueError(f"cannot rewind a request of {len(self.history)} positions to {length}")
        del self.history[length:]

    def _submit(self, tokens: list[int], every: bool) -> asyncio.Future:
        if self.failed:  # raised where the step is awaited, as every other step failure
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(EngineUnavailable("this request lost a worker earlier"))
            return failed
        room = self.context - len(self.history) - len(tokens)
        return self._batcher.submit(self, tokens, every=every, room=room)

    async def close(self) -> None:
        self.closed = True
        self._batcher.wake()  # the runner may be waiting for this request's next step
        self._registry.discard(self)
        await self._command(CloseRequest(self.rid), True)
        if isinstance(self.kv, RemoteKV):
            await self.kv.close()


class OffloadedEngine:
    """The cluster seen through the offload route (a models.engine.Engine): every session it opens
    keeps its KV cache on the attention nodes."""

    def __init__(self, engine: ClusterEngine):
        self.engine, self.config, self.tokenizer = engine, engine.config, engine.tokenizer

    async def open_session(self, capacity: int = 64) -> ClusterSession:
        return await self.engine.open_session(capacity, offload=True)

    async def score(self, prompt_ids: list[int], k: int) -> PromptScores:
        return await self.engine.score(prompt_ids, k, offload=True)

    def status(self) -> EngineStatus:
        return self.engine.status()

    def counters(self) -> ClusterCounters | None:
        return self.engine.counters()

    def offloaded(self) -> OffloadedEngine:
        return self

    async def run_local(self, fn):
        return await self.engine.run_local(fn)


async def _as_tensor(result: asyncio.Future) -> torch.Tensor:
    return torch.from_numpy(await result)
