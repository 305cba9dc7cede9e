"""What happens when a cluster step fails: one path for a single request and for a batch.

A step that lost an attention node (here, or as a worker reported it with FailureCause.ATTENTION)
while every compute rank is still up is recoverable: each request of the step gets its KV rebuilt
on the compute ranks (the workers dropped every request of the failed step) and its step retried
once, alone, replaying its history. A step that lost a worker (its link ended, it froze, or it was
missing) is recoverable when the cluster re-plans on the devices that remain (`replan`): every
request is rebuilt from its tokens there and its step retried once, alone. Anything else (a
device's weights broken, a bug) or a recovery that fails fails every request of the step exactly
once with EngineUnavailable, and marks its session failed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import numpy as np

from edge.batcher import StepRequest, deliver
from edge.offload import AttentionNodeFailed
from edge.split import SplitError
from models.engine import EngineUnavailable
from transport.errors import FailureCause, PeerFailed, TransportError

log = logging.getLogger("edge_llm.master")
# What a failed cluster step raises: links and peers (transport), timeouts, rank 0's own weights.
STEP_ERRORS = (TransportError, TimeoutError, SplitError)

# (sessions, tokens, score_k, every) -> one output per session
Forward = Callable[[list, list[list[int]], int | None, list[bool]], Awaitable[list[np.ndarray]]]


async def _no_replan() -> str | None:
    return ""


def lost_attention_node(error: BaseException) -> bool:
    """Whether a failed step lost an attention node: on rank 0, or as a worker reported it."""
    return isinstance(error, AttentionNodeFailed) or (
        isinstance(error, PeerFailed) and error.cause == FailureCause.ATTENTION)


class Failover:
    """Runs a batch through `forward` and gives each request its outcome exactly once.

    forward(sessions, tokens, score_k, every) -> per session its logits (or a scoring pass's stats),
    raises STEP_ERRORS;
    rebuild(session, reason) moves an offloaded request's KV to the compute ranks;
    cluster_up() says every compute rank can take part; offload_ready() that the nodes are linked.
    """

    def __init__(self, forward: Forward, rebuild: Callable[[object, str], Awaitable[None]],
                 cluster_up: Callable[[], bool], offload_ready: Callable[[], bool],
                 replan: Callable[[], Awaitable[str | None]] = _no_replan):
        self._forward, self._rebuild = forward, rebuild
        self._cluster_up, self._offload_ready, self._replan = cluster_up, offload_ready, replan

    async def run(self, batch: list[StepRequest]) -> None:
        for entry in batch:  # nodes already known lost: rebuild before the step, not after it fails
            if entry.session.offload and not self._offload_ready() and self._cluster_up():
                await self._rebuild(entry.session, "the attention nodes are not linked")
        try:
            out = await self._forward([e.session for e in batch], [e.tokens for e in batch], _score_k(batch),
                                      [e.every for e in batch])
        except (EngineUnavailable, *STEP_ERRORS) as error:  # EngineUnavailable: a rank was missing
            await self._recover(batch, error)
            return
        for entry, result in zip(batch, out, strict=True):
            deliver(entry.result, result)

    async def _recover(self, batch: list[StepRequest], error: BaseException) -> None:
        reason = str(error) or type(error).__name__
        offloaded = any(e.session.offload for e in batch)
        if offloaded and (lost_attention_node(error) or not self._offload_ready()) and self._cluster_up():
            for entry in batch:  # the workers dropped every request of the step: all replay
                await self._rebuild(entry.session, reason)
            await self._retry_each(batch, f"the request lost its attention node ({reason}) and rebuilding "
                                          f"its KV on the compute ranks failed too")
            return
        why = await self._replan() if _lost_a_device(error) else ""
        if why is None:  # re-planned: every session now replays its tokens
            await self._retry_each(batch, f"a device failed ({reason}) and the step failed again on the "
                                          f"devices that remain")
            return
        who = "rank 0" if isinstance(error, SplitError) else "a worker"
        failure = error if isinstance(error, EngineUnavailable) else f"{who} failed during the step: {reason}"
        for entry in batch:
            self._fail(entry, EngineUnavailable(f"{failure}" + (f"; the devices left cannot serve: {why}" if why
                                                                else "")))

    async def _retry_each(self, batch: list[StepRequest], failed_again: str) -> None:
        """Run each request's step alone once more; a second failure fails that request."""
        for entry in batch:
            try:
                out = await self._forward([entry.session], [entry.tokens], entry.score_k, [entry.every])
            except (EngineUnavailable, *STEP_ERRORS) as again:
                self._fail(entry, EngineUnavailable(f"{failed_again}: {again}"))
                continue
            deliver(entry.result, out[0])

    @staticmethod
    def _fail(entry: StepRequest, error: EngineUnavailable) -> None:
        entry.session.failed = True
        deliver(entry.result, error=error)


def _lost_a_device(error: BaseException) -> bool:
    """Whether a failure may be a device that went away or froze (not its weights, not a bug)."""
    if isinstance(error, SplitError | AttentionNodeFailed):
        return False
    return not (isinstance(error, PeerFailed) and error.cause in (FailureCause.WEIGHTS, FailureCause.INTERNAL,
                                                                  FailureCause.ATTENTION))


def _score_k(batch: list[StepRequest]) -> int | None:
    """A scoring pass runs alone (the batcher never batches it)."""
    return batch[0].score_k if len(batch) == 1 else None
