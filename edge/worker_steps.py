"""A worker's steps: run from the control channel (the event loop hands each to the compute thread) or,
when the master has a data link to it, read from that link by the compute thread itself.

Why the data link: a decode step's command went rank 0's event loop -> the worker's event loop -> its
compute thread; the loop's part (receiving, decoding and checking the command, the hop to the compute
thread and the result's hop back) cost a worker 190 + 180 us of each SmolLM2 token on 2 devices and
about 0.3 ms of CPU per token on cores the ranks compute on (bench/profile.md). Now rank 0's compute
thread sends the command on the data link as its forward begins, and the worker's compute thread,
which waits on that link between steps (`DataSteps`), runs it at once; its event loop keeps the
control channel (requests opened and closed, re-plans, heartbeats).

Order with the control channel (`CommandCount`): a STEP frame carries how many commands the master
had sent on the control channel before it. The step waits until the worker has handled that many (a
request's OpenRequest comes before its first step), and is dropped when the worker has already
handled a command that changes the plan or its links sent after it: the master sends those only with
no step in flight, so that step was abandoned. While a step runs the commands sent after it may be
handled (opening or closing other requests: a store the step holds stays valid).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import torch

from edge.messages import LinkAttention, LinkRing, Message, Replan, Step
from edge.offload import AttentionNodeFailed
from edge.rank_reduce import RankReduce
from edge.split import SplitError
from edge.tensors import unpack_tensor
from transport.codec import decode
from transport.collectives import STEP_SHIFT
from transport.errors import CollectiveTimeout, FailureCause, FrameError, PeerFailed, TransportError
from transport.fastpath import ERROR, DataLink, FastStar

log = logging.getLogger("edge_llm.worker")
PLAN_CHANGES = (Replan, LinkRing, LinkAttention)  # commands the master sends with no step in flight
FOREVER = 1 << 62  # an ERROR frame numbered this ends whichever step the hub is in


class CommandCount:
    """The control channel's commands this worker has handled (counted on the event loop), for the
    steps on the data link to wait for (on the compute thread)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.handled = 0
        self.last_change = -1  # the index of the last handled command in PLAN_CHANGES

    def handled_one(self, msg: Message | None) -> None:
        """A command's handler returned (None: one that did not parse, which the master counted too)."""
        with self._changed:
            if isinstance(msg, PLAN_CHANGES):
                self.last_change = self.handled
            self.handled += 1
            self._changed.notify_all()

    def ready(self, sent: int, timeout: float) -> bool:
        """Wait until the `sent` commands sent before a step are handled; False when one sent after
        it that changes the plan was handled already (the step is stale). CollectiveTimeout when the
        commands do not come."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.handled >= sent, timeout):
                raise CollectiveTimeout(f"the step waited {timeout:.1f} s for control command {sent}")
            return self.last_change < sent


class StepFailed(Exception):
    """What a failed step reports to the hub: its reason and cause (None: report nothing, the peers
    are gone), and the requests whose stores it drops."""

    def __init__(self, rids: list[str], reason: str, cause: FailureCause | None):
        super().__init__(reason)
        self.rids, self.reason, self.cause = rids, reason, cause


def failure(error: Exception, msg: Step, rank: int) -> StepFailed:
    """How a step's error is reported (the same on both paths)."""
    rids = msg.rids
    if isinstance(error, AttentionNodeFailed):  # the hub rebuilds the KV elsewhere at once
        log.warning("step %s of %s lost its attention node: %s", msg.step, rids, error)
        return StepFailed(rids, f"rank {rank}: {error}", FailureCause.ATTENTION)
    if isinstance(error, PeerFailed):  # a ring predecessor could not finish: pass it on around the ring
        log.warning("step %s of %s failed: %s", msg.step, rids, error)
        return StepFailed(rids, str(error), error.cause)
    if isinstance(error, TransportError | TimeoutError):  # a peer or ring neighbour is gone
        log.warning("step %s of %s failed: %s", msg.step, rids, error)
        return StepFailed(rids, str(error), None)
    if isinstance(error, SplitError):  # our own weights failed: the hub fails the request
        log.error("rank %d: %s", rank, error)
        return StepFailed(rids, f"rank {rank}: {error}", FailureCause.WEIGHTS)
    log.error("rank %d: step %s failed unexpectedly", rank, msg.step, exc_info=error)  # a bug fails the step
    return StepFailed(rids, f"rank {rank}: internal error {error!r}", FailureCause.INTERNAL)


def step_inputs(msg: Step) -> tuple[torch.Tensor, tuple[torch.Tensor, int] | None]:
    """A step command's hidden states [B, S, D] and scoring targets."""
    h = unpack_tensor(msg.h)
    score = (torch.tensor(msg.targets or [], dtype=torch.long), msg.score) if msg.score is not None else None
    return h, score


class DataSteps:
    """Owns the loop on the compute thread that reads STEP frames from `link` and runs each with
    `run_step` once the commands before it are handled (`commands`); `stop` ends it between steps.

    A frame that does not parse fails the hub's step (an ERROR report) and the loop goes on; the
    link closing ends the loop (the master then steps over the control channel, or re-plans)."""

    def __init__(self, link: DataLink, commands: CommandCount, run_step: Callable[[Step], None],
                 compute: Executor, timeout: float):
        self.link, self.commands, self._run_step, self.timeout = link, commands, run_step, timeout
        self._wake_read, self._wake_write = os.pipe()
        self._done = asyncio.get_running_loop().run_in_executor(compute, self._serve)

    def _serve(self) -> None:
        while True:
            try:
                got = self.link.next_step(self._wake_read)
            except TransportError as e:
                log.warning("the data link to the master ended (%s); steps come on the control channel", e)
                return
            if got is None:
                return
            self._one(*got)

    def _one(self, sent: int, body: bytearray) -> None:
        try:
            msg = Step.from_wire(decode(body))
        except FrameError as e:  # the hub waits in the step it just sent, whatever its number
            log.error("a step on the data link does not parse: %s", e)
            self.link.send_nowait(ERROR, FOREVER, f"a step command did not parse: {e}", FailureCause.INTERNAL)
            return
        try:
            if self.commands.ready(sent, self.timeout):
                self._run_step(msg)
        except CollectiveTimeout as e:  # numbered as the step: stale if the hub has moved on
            log.error("%s", e)
            self.link.send_nowait(ERROR, (msg.step << STEP_SHIFT) + 1, str(e), FailureCause.INTERNAL)
        except Exception:  # never let a bug end the loop: the steps after it would time out
            log.exception("the data link's step loop")

    async def stop(self) -> None:
        """End the loop (after the step it runs, if any) and release the wake-up pipe."""
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")
        try:
            await asyncio.wait_for(asyncio.shield(self._done), self.timeout + 1.0)
        except TimeoutError:  # its pipe stays open: the loop still waits on it
            log.error("the data link's step loop did not stop within %.1f s", self.timeout + 1.0)
            return
        for fd in (self._wake_read, self._wake_write):
            os.close(fd)


class WorkerSteps:
    """A worker's steps (`worker` is the edge.worker.Worker whose shard, stores and collectives they use):
    `from_channel` runs one the event loop received, and between steps the compute thread takes those
    of the data link (`start_data_steps`; `pause_data_steps` frees the thread for anything else)."""

    def __init__(self, worker: Any):
        self.worker = worker
        self._loop: DataSteps | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._reports: set[Any] = set()  # failure reports handed to the event loop, until they end

    async def from_channel(self, msg: Step) -> None:
        """One step for a batch of requests (rows of h) from the control channel. A row whose request
        this rank no longer holds (closed meanwhile) runs on a scratch cache, so every rank stays in step."""
        w = self.worker
        fast = w.fast if msg.fast else None
        if msg.fast and fast is None:
            w.shard.mark("step_received")
            w.collective.begin(msg.step)
            await self.fail(StepFailed(msg.rids, f"rank {w.settings.rank}: no data link to the master",
                                       FailureCause.PEER), w.kv.held(msg.rids))
            return
        await self.pause_data_steps()  # the compute thread runs this step, not the data link's loop
        held = w.kv.held(msg.rids)
        try:
            h, score, kvs = self._begin(msg)
            await w.shard.forward(h, kvs, w.collective, w.settings.step_timeout, score, fast, msg.every)
        except StepFailed as failed:
            await self.fail(failed, held, fast)
        except Exception as e:
            await self.fail(failure(e, msg, w.settings.rank), held, fast)
        finally:
            self.start_data_steps()

    def _begin(self, msg: Step) -> tuple[torch.Tensor, tuple[torch.Tensor, int] | None, list]:
        """A step's inputs and its rows' stores; StepFailed for a request whose attention nodes are
        not linked."""
        w = self.worker
        w.shard.mark("step_received")
        w.collective.begin(msg.step)
        if w.kv.unlinked.intersection(msg.rids):
            raise StepFailed(msg.rids, f"rank {w.settings.rank} is not linked to the attention nodes",
                             FailureCause.ATTENTION)
        h, score = step_inputs(msg)
        return h, score, w.kv.for_step(w.shard, msg.rids, h.shape[1], msg.starts)

    def _from_data_link(self, msg: Step) -> None:
        """A step read from the data link, on the compute thread: its stores, the forward and the gather
        (transport.fastpath). A failure is reported on the data link at once, the rest of its report
        (the stores dropped, the control channel) from the event loop."""
        w = self.worker
        fast, collective, held = w.fast, w.collective, w.kv.held(msg.rids)
        try:
            try:
                h, score, kvs = self._begin(msg)
                reduce = RankReduce(collective, fast, self._event_loop, w.settings.step_timeout, w.shard.timing,
                                    w.shard.trace)
                w.shard.forward_here(h, kvs, reduce, score, fast, msg.every)
            except StepFailed:
                raise
            except Exception as e:
                raise failure(e, msg, w.settings.rank) from e
        except StepFailed as failed:
            if failed.cause is not None:  # the hub's compute thread waits on the data link
                fast.report(ERROR, collective.star.seq + 1, failed.reason, failed.cause)
            report = asyncio.run_coroutine_threadsafe(self.fail(failed, held), self._event_loop)
            self._reports.add(report)
            report.add_done_callback(self._reports.discard)

    async def fail(self, failed: StepFailed, held: list, fast: FastStar | None = None) -> None:
        """Drop the stores the step's requests `held` as it began (KVStores.drop) and report why (to
        the hub, on the data plane when the step used it, and to the ring successor) so the cluster
        fails the step at once, not at its timeout."""
        w = self.worker
        await w.kv.drop(failed.rids, held)
        if failed.cause is None:  # the peers are gone: the master sees that by itself
            return
        if fast is not None:  # the hub's compute thread waits on the data link, not on the channel
            fast.report(ERROR, w.collective.star.seq + 1, failed.reason, failed.cause)
        try:
            await w.collective.fail(failed.reason, failed.cause)
        except TransportError as e:  # the peers are gone too: the master sees that by itself
            log.info("could not report the failure: %s", e)

    def start_data_steps(self) -> None:
        """Let the compute thread take the data link's steps (when there is a live one)."""
        w = self.worker
        if self._loop is None and w.data is not None and not w.data.closed and w.shard is not None:
            self._event_loop = asyncio.get_running_loop()
            self._loop = DataSteps(w.data, w.commands, self._from_data_link, w.shard.compute,
                                   w.settings.step_timeout)

    async def pause_data_steps(self) -> None:
        """Stop taking the data link's steps (after the one running, if any)."""
        loop, self._loop = self._loop, None
        if loop is not None:
            await loop.stop()
