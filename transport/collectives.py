"""All-reduce over channels: star (hub sums in rank order), ring, and `auto` from measured links.

Per all-reduce of M bytes on N ranks with link latency alpha and bandwidth B:
  star ~ 2 alpha + 2 (N-1) M / B        (two hops; the hub's link carries every partial)
  ring ~ 2 (N-1) alpha + 2 (N-1) M / (N B)
On edge links alpha dominates for decode-sized messages, so star is the default.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from transport.channel import Channel
from transport.codec import pack_array, unpack_array
from transport.errors import CollectiveAborted, FailureCause, FrameError, PeerFailed, TransportError

Algorithm = Literal["star", "ring", "auto"]
DEFAULT_TIMEOUT = 10.0


class Collective(Protocol):
    """What a rank needs from its peers during a forward pass."""

    rank: int
    world_size: int

    async def allreduce(self, x: np.ndarray) -> np.ndarray: ...


STEP_SHIFT = 16  # a collective's number: its step << STEP_SHIFT, plus its count within the step (begin)


def stale(got: int, wanted: int, failure: bool) -> bool:
    """Whether a message numbered `got` is left over from an earlier collective, while #wanted is
    awaited. A failure report (a rank's error, the hub's abort) ends the whole step it was sent in,
    whatever its count: the hub aborts at the all-reduce it reached, while a faster worker may wait
    in a later one of that step (it skipped the abort as old and read the retried step's data as
    out of step, closing its data link: the hung-attention-node test, now and then)."""
    if failure:
        return got >> STEP_SHIFT < wanted >> STEP_SHIFT
    return got < wanted


def _check_seq(msg: dict, seq: int, peer: str) -> None:
    if msg.get("s") != seq:
        raise FrameError(f"collective out of step with {peer}: expected #{seq}, got #{msg.get('s')}")


async def _recv_current(channel: Channel, tag: str, seq: int, timeout: float) -> dict:
    """The message for collective #seq, skipping stale ones left by a step that failed mid-way.

    Raises PeerFailed when the peer reports that it cannot go on (e.g. a damaged weight file).
    """
    while True:
        msg = await channel.recv(tag, timeout)
        s = msg.get("s")
        if isinstance(s, int) and stale(s, seq, "error" in msg or "abort" in msg):
            continue
        if "error" in msg:
            raise PeerFailed(str(msg["error"]), FailureCause.parse(msg.get("cause")))
        if "abort" in msg:
            return msg  # the caller raises CollectiveAborted
        _check_seq(msg, seq, channel.peer)
        return msg


class StarAllReduce:
    """Ranks send partials to rank 0, which sums in rank order in float32 and sends the sum back.

    Rank-order float32 summation makes the result identical on every rank and every run. With
    two ranks the star degenerates to a direct exchange (both sum the same way): one hop, not two.
    """

    def __init__(self, rank: int, world_size: int, channels: Mapping[int, Channel],
                 timeout: float = DEFAULT_TIMEOUT):
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self._channels = channels
        self._seq = 0
        self.peer_meta: dict[int, dict] = {}

    def begin(self, step: int) -> None:
        """Align sequence numbers at a step boundary so ranks recover after a failed step."""
        self._seq = step << STEP_SHIFT

    def next_seq(self) -> int:
        """The number of the next collective (the data plane, transport.fastpath, shares the count)."""
        self._seq += 1
        return self._seq

    @property
    def seq(self) -> int:
        return self._seq

    async def allreduce(self, x: np.ndarray) -> np.ndarray:
        """Raises CollectiveTimeout / ChannelClosed when a peer fails; the caller fails the request."""
        self._seq += 1
        if self.world_size == 1:
            return x
        if self.world_size == 2:
            return await self._exchange(x)
        if self.rank != 0:
            hub = self._channels[0]
            await hub.send({"t": "ar", "s": self._seq, "x": pack_array(x)})
            msg = await _recv_current(hub, "ar.sum", self._seq, self.timeout)
            if msg.get("abort"):
                raise CollectiveAborted(f"the hub aborted all-reduce #{self._seq}: {msg['abort']}")
            return unpack_array(msg["x"]).copy()
        acc = x.astype(np.float32, copy=True)
        for r in range(1, self.world_size):
            msg = await _recv_current(self._channels[r], "ar", self._seq, self.timeout)
            part = unpack_array(msg["x"])
            if part.shape != x.shape:
                raise FrameError(f"rank {r} sent shape {part.shape}, expected {x.shape}")
            acc += part
        out = acc if x.dtype == np.float32 else acc.astype(x.dtype)
        reply = {"t": "ar.sum", "s": self._seq, "x": pack_array(out)}
        for r in range(1, self.world_size):
            await self._channels[r].send(reply)
        return out


    async def _exchange(self, x: np.ndarray) -> np.ndarray:
        """Two ranks: each sends its partial to the other and both sum in rank order (float32), so
        the result is the hub's sum, bit for bit, after one link latency instead of two."""
        peer = self._channels[1 - self.rank]
        if self.rank != 0:
            await peer.send({"t": "ar", "s": self._seq, "x": pack_array(x)})
            msg = await _recv_current(peer, "ar.sum", self._seq, self.timeout)
            if msg.get("abort"):
                raise CollectiveAborted(f"the hub aborted all-reduce #{self._seq}: {msg['abort']}")
            mine, theirs = x, unpack_array(msg["x"])
            if theirs.shape != x.shape:
                raise FrameError(f"rank 0 sent shape {theirs.shape}, expected {x.shape}")
            first, second = theirs, mine
        else:
            await peer.send({"t": "ar.sum", "s": self._seq, "x": pack_array(x)})
            msg = await _recv_current(peer, "ar", self._seq, self.timeout)
            theirs = unpack_array(msg["x"])
            if theirs.shape != x.shape:
                raise FrameError(f"rank 1 sent shape {theirs.shape}, expected {x.shape}")
            first, second = x, theirs
        acc = first.astype(np.float32, copy=True)
        acc += second
        return acc if x.dtype == np.float32 else acc.astype(x.dtype)

    async def gather(self, x: np.ndarray, meta: dict | None = None) -> np.ndarray | None:
        """Concatenate every rank's slice along the last axis in rank order at the hub (None elsewhere).

        `meta` (small counters) rides along; the hub keeps the latest per rank in `peer_meta`.
        """
        self._seq += 1
        if self.rank != 0:
            await self._channels[0].send({"t": "ga", "s": self._seq, "x": pack_array(x), "meta": meta})
            return None
        parts = [x]
        for r in range(1, self.world_size):
            msg = await _recv_current(self._channels[r], "ga", self._seq, self.timeout)
            part = unpack_array(msg["x"])
            if part.shape[:-1] != x.shape[:-1]:
                raise FrameError(f"rank {r} sent a slice of shape {part.shape}, expected {x.shape[:-1]} + (n,)")
            parts.append(part)
            if isinstance(msg.get("meta"), dict):
                self.peer_meta[r] = msg["meta"]
        return np.concatenate(parts, axis=-1)

    async def fail(self, reason: str, cause: FailureCause = FailureCause.PEER) -> None:
        """Non-hub: tell the hub this rank cannot finish the current step (it fails the request)."""
        for tag in ("ar", "ga"):
            await self._channels[0].send({"t": tag, "s": self._seq + 1, "error": reason, "cause": cause.value})

    async def abort(self, reason: str) -> None:
        """Hub only: release ranks waiting in the current all-reduce after a peer failed."""
        for ch in list(self._channels.values()):
            try:
                await ch.send({"t": "ar.sum", "s": self._seq, "abort": reason})
            except TransportError:
                pass


class RingAllReduce:
    """Reduce-scatter then all-gather around the ring r -> r+1; float32 accumulation."""

    def __init__(self, rank: int, world_size: int, channels: Mapping[int, Channel],
                 timeout: float = DEFAULT_TIMEOUT):
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self._channels = channels  # looked up per call: a cluster relinks its ring after a rejoin
        self._seq = 0

    def begin(self, step: int) -> None:
        """Align sequence numbers at a step boundary (as StarAllReduce.begin)."""
        self._seq = step << STEP_SHIFT

    async def _pass(self, tag: str, chunk: np.ndarray) -> np.ndarray:
        nxt = self._channels[(self.rank + 1) % self.world_size]
        prev = self._channels[(self.rank - 1) % self.world_size]
        await nxt.send({"t": tag, "s": self._seq, "x": pack_array(chunk)})
        return unpack_array((await _recv_current(prev, tag, self._seq, self.timeout))["x"])

    async def fail(self, reason: str, cause: FailureCause = FailureCause.PEER) -> None:
        """Tell the successor this rank cannot finish the current all-reduce; it raises PeerFailed
        and passes the news on, so the whole ring (rank 0 last) fails at once, not at a timeout."""
        nxt = self._channels[(self.rank + 1) % self.world_size]
        for tag in ("rs", "ag"):
            await nxt.send({"t": tag, "s": self._seq + 1, "error": reason, "cause": cause.value})

    async def allreduce(self, x: np.ndarray) -> np.ndarray:
        self._seq += 1
        n, r = self.world_size, self.rank
        if n == 1:
            return x
        flat = x.astype(np.float32, copy=True).reshape(-1)
        bounds = np.linspace(0, flat.size, n + 1).astype(int)
        chunk = [flat[bounds[i]:bounds[i + 1]] for i in range(n)]  # views into flat
        for step in range(n - 1):  # reduce-scatter: rank r ends owning chunk (r+1) % n
            incoming = await self._pass("rs", chunk[(r - step) % n])
            chunk[(r - step - 1) % n] += incoming
        for step in range(n - 1):  # all-gather the owned chunks
            incoming = await self._pass("ag", chunk[(r + 1 - step) % n])
            chunk[(r - step) % n][:] = incoming
        out = flat.reshape(x.shape)
        return out if x.dtype == np.float32 else out.astype(x.dtype)


@dataclass(frozen=True)
class LinkModel:
    """Measured per-hop latency (s) and bandwidth (bytes/s), the same on every rank."""

    alpha: float
    bandwidth: float

    def star_cost(self, nbytes: int, n: int) -> float:
        if n == 2:  # the direct exchange: one hop, both directions at once
            return self.alpha + nbytes / self.bandwidth
        return 2 * self.alpha + 2 * (n - 1) * nbytes / self.bandwidth

    def ring_cost(self, nbytes: int, n: int) -> float:
        return 2 * (n - 1) * self.alpha + 2 * (n - 1) * nbytes / (n * self.bandwidth)

    def choose(self, nbytes: int, n: int) -> Literal["star", "ring"]:
        return "ring" if self.ring_cost(nbytes, n) < self.star_cost(nbytes, n) else "star"


class AutoAllReduce:
    """Star or ring per message size from the alpha-beta model; every rank decides identically."""

    def __init__(self, star: StarAllReduce, ring: RingAllReduce, model: LinkModel):
        self.rank, self.world_size, self.model = star.rank, star.world_size, model
        self._star, self._ring = star, ring

    @property
    def ring(self) -> RingAllReduce:
        return self._ring

    def begin(self, step: int) -> None:
        self._star.begin(step)
        self._ring.begin(step)

    def choice(self, nbytes: int) -> Literal["star", "ring"]:
        return self.model.choose(nbytes, self.world_size)

    async def allreduce(self, x: np.ndarray) -> np.ndarray:
        algo = self._ring if self.choice(x.nbytes) == "ring" else self._star
        return await algo.allreduce(x)


async def measure_links(rank: int, world_size: int, channels: Mapping[int, Channel],
                        timeout: float = DEFAULT_TIMEOUT, rounds: int = 5) -> LinkModel:
    """Rank 0 ping-pongs a small and a 256 KiB message with every rank and shares the result.

    Ranks probed last wait for the others' probes, so they wait long enough for slow links.
    """
    small, big = np.zeros(16, np.float32), np.zeros(1 << 16, np.float32)
    if rank != 0:
        hub = channels[0]
        patience = max(timeout, 300.0)
        for _ in range(2 * rounds):
            msg = await hub.recv("probe", patience)
            await hub.send({"t": "probe.r", "x": msg["x"]})
        result = await hub.recv("probe.model", patience)
        return LinkModel(alpha=float(result["alpha"]), bandwidth=float(result["bandwidth"]))
    small_rtts, big_rtts = [], []
    for r in range(1, world_size):
        for arr, sink in ((small, small_rtts), (big, big_rtts)):
            for _ in range(rounds):
                start = time.perf_counter()
                await channels[r].send({"t": "probe", "x": pack_array(arr)})
                await channels[r].recv("probe.r", timeout)
                sink.append(time.perf_counter() - start)
    alpha = float(np.median(small_rtts)) / 2
    transfer = max(float(np.median(big_rtts)) / 2 - alpha, 1e-9)
    model = LinkModel(alpha=alpha, bandwidth=big.nbytes / transfer)
    for r in range(1, world_size):
        await channels[r].send({"t": "probe.model", "alpha": model.alpha, "bandwidth": model.bandwidth})
    return model


async def make_allreduce(algorithm: Algorithm, rank: int, world_size: int,
                         channels: Mapping[int, Channel], timeout: float = DEFAULT_TIMEOUT) -> Collective:
    """The configured all-reduce; `auto` measures the links first (all ranks must call together)."""
    if algorithm == "star":
        return StarAllReduce(rank, world_size, channels, timeout)
    if algorithm == "ring":
        return RingAllReduce(rank, world_size, channels, timeout)
    model = await measure_links(rank, world_size, channels, timeout)
    return AutoAllReduce(StarAllReduce(rank, world_size, channels, timeout),
                         RingAllReduce(rank, world_size, channels, timeout), model)


class StepCollective:
    """What a forward step needs: the configured all-reduce, and gather/fail/abort via the star hub.

    Ring and auto send their partials around the ring; logits and failures still meet at rank 0.
    """

    def __init__(self, star: StarAllReduce, allreduce: RingAllReduce | AutoAllReduce | None = None):
        self.star, self._allreduce = star, allreduce or star
        self.peer_meta = star.peer_meta

    def begin(self, step: int) -> None:
        self.star.begin(step)
        if self._allreduce is not self.star:
            self._allreduce.begin(step)

    async def allreduce(self, x: np.ndarray) -> np.ndarray:
        return await self._allreduce.allreduce(x)

    async def gather(self, x: np.ndarray, meta: dict | None = None) -> np.ndarray | None:
        return await self.star.gather(x, meta)

    def _ring(self) -> RingAllReduce | None:
        ring = getattr(self._allreduce, "ring", self._allreduce)
        return ring if isinstance(ring, RingAllReduce) else None

    async def fail(self, reason: str, cause: FailureCause = FailureCause.PEER) -> None:
        """Report to the hub, and to the ring successor when partial sums travel around a ring."""
        await self.star.fail(reason, cause)
        if (ring := self._ring()) is not None:
            await ring.fail(reason, cause)

    async def abort(self, reason: str) -> None:
        """Hub only: release every rank still waiting in the step's all-reduces, in the star (the
        sum it waits for) and around a ring (the failure passed on from the hub's successor), so a
        lost device costs a re-plan, not a step timeout."""
        await self.star.abort(reason)
        if (ring := self._ring()) is not None:
            with contextlib.suppress(TransportError):  # the successor may be the device that was lost
                await ring.fail(reason)
