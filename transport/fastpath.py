"""The all-reduce data plane: raw float32 frames on blocking sockets, driven by the compute thread.

Why: on the event-loop path every all-reduce hands the partial from the compute thread to the
loop and the sum back, in each process: four thread wake-ups per all-reduce, two per layer, which
on a 2-core device costs far more than the loopback round trip itself (bench/profile.md). Here the
compute thread writes its partial and reads the sum itself. The step's closing gather of every
rank's logits slice goes the same way: a worker's compute thread sends its slice as its forward
ends, rank 0's reads them after its own, and no worker's event loop, no msgpack and no per-frame
HMAC stand between the last layer and rank 0's sampling (`FastStar.gather`). The control plane
(steps, heartbeats) stays on the event loop; the sums are bit-identical to StarAllReduce's (rank
order, float32), the gathered logits are the same bytes.

Frame: a 16-byte header (kind, payload bytes, collective sequence number) and the payload: the
array's bytes for DATA; for GATHER a worker's float32 slice, its counters (msgpack) and their
length (uint32); for ERROR (a rank cannot finish the step) its FailureCause, a newline and a UTF-8
reason; for ABORT (the hub gave up on the step) the reason. Frames of an abandoned step (lower
sequence numbers) are skipped; a failure report ends its whole step (transport.collectives.stale).
Peers authenticate with the cluster's HMAC handshake before the first frame. Reads go through a
buffer (transport.inbox): one read system call usually takes a frame's header and payload together,
and the frame the compute thread waits for is recognised by its exact header bytes, so the common
case parses nothing in Python; writes try a plain writev first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Mapping

import numpy as np

from transport.auth import client_handshake, server_handshake
from transport.codec import decode, encode
from transport.collectives import stale
from transport.errors import (
    AuthError,
    ChannelClosed,
    CollectiveAborted,
    CollectiveTimeout,
    FailureCause,
    FrameError,
    PeerFailed,
    TransportError,
)
from transport.frames import HANDSHAKE_MAX_FRAME, HEADER
from transport.inbox import Inbox

log = logging.getLogger("edge_llm.transport")
FRAME = struct.Struct("<BxxxIQ")  # kind, payload bytes, sequence number
DATA, ERROR, ABORT, GATHER = 1, 2, 3, 4
MAX_PAYLOAD = 256 << 20
META_LENGTH = struct.Struct("<I")  # the last bytes of a GATHER frame: how long its counters are
MAX_META = 64 << 10
HANDSHAKE_TIMEOUT = 5.0
_POLL = {"seconds": 0.0, "yield": False}  # process-wide, as the thread count is (set_poll_us)


def set_poll_us(microseconds: int, yield_cpu: bool = False) -> None:
    """How long a data-link read polls (non-blocking tries) before it sleeps in recv; 0: never.

    Why: waking a thread that sleeps in recv took tens of microseconds per all-reduce on these
    hosts (the 'exchange' of scripts/profile_decode.py: 2 devices of the `small` preset, 0.71-0.89
    ms per token of it without polling, 0.39-0.46 with 300 us). Polling burns its core meanwhile,
    so it pays only when the process has a core to itself: 3 emulated devices on 2 cores decoded
    2x slower with it. With `yield_cpu` the reader gives its core to any other runnable process
    between tries (sched_yield), for processes that share cores: the rank it waits for runs, and
    its data is read without the wake-up a sleeping reader pays (SmolLM2 on emulated devices
    sharing 2 cores, clusters alternating requests, median ms per token: 3 devices 26.8 -> 24.8
    and 36.7 -> 28.8, 4 devices 33.7 -> 29.0 and 28.5 -> 25.7 with 1000 us; the `large` preset on
    3, 108.8 -> 108.6). `edge-llm cluster` polls when its devices do not outnumber the cores, and
    polls yielding when they do.
    """
    _POLL["seconds"] = microseconds / 1e6
    _POLL["yield"] = yield_cpu and hasattr(os, "sched_yield")


class DataLink:
    """One authenticated blocking socket to a peer; the compute thread sends and receives, the event
    loop may only report failures (`send_nowait`)."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float):
        sock.setblocking(True)
        sock.settimeout(timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.peer, self.timeout = sock, peer, timeout
        self.closed = False
        self.bytes_sent = self.bytes_received = 0  # headers included, as the control channel counts them
        self._lock = threading.Lock()
        self._header = bytearray(FRAME.size)
        self._inbox = Inbox()

    def send(self, kind: int, seq: int, *payload: bytes | memoryview) -> None:
        """One frame whose payload is the parts of `payload` back to back (their bytes, whatever the
        array's shape and dtype); raises ChannelClosed when the peer is gone."""
        size = sum(memoryview(p).nbytes for p in payload)
        with self._lock:
            self._sendall((FRAME.pack(kind, size, seq), *payload), FRAME.size + size)
            self.bytes_sent += FRAME.size + size

    def send_nowait(self, kind: int, seq: int, reason: str, cause: FailureCause = FailureCause.PEER) -> None:
        """A failure report from the event loop: never blocks it; dropped if the link is busy or full.
        The body is the cause, a newline and the reason."""
        if self.closed or not self._lock.acquire(timeout=0.5):
            return
        try:
            data = (cause.value + "\n" + reason).encode()[:4096]
            self.sock.send(FRAME.pack(kind, len(data), seq) + data, socket.MSG_DONTWAIT)
        except OSError:
            pass
        finally:
            self._lock.release()

    def _sendall(self, parts: tuple, total: int) -> None:
        """All `total` bytes of `parts` in order. The first try is a plain writev on the (non-blocking)
        descriptor: the socket's own sendmsg polls before it writes, a system call per frame for
        nothing while the kernel has room; it takes over only for what the first write left."""
        try:
            try:
                sent = os.writev(self.sock.fileno(), parts)
            except BlockingIOError:
                sent = 0
            if sent < total:
                self._send_rest([memoryview(p).cast("B") for p in parts], sent)
        except TimeoutError as e:
            raise CollectiveTimeout(f"{self.peer} did not take data for {self.timeout:.1f} s") from e
        except OSError as e:
            self.closed = True
            raise ChannelClosed(f"data link to {self.peer} closed ({e})") from e

    def _send_rest(self, views: list[memoryview], sent: int) -> None:
        """What is left of `views` past their first `sent` bytes, through the socket's timed sendmsg."""
        while True:
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if not views:
                return
            if sent:
                views[0] = views[0][sent:]
            sent = self.sock.sendmsg(views)

    def _read_exact(self, view: memoryview) -> None:
        got = 0
        try:
            while got < len(view):
                n = self._inbox.read(self.sock, view[got:], _POLL["seconds"], _POLL["yield"])
                if n == 0:
                    self.closed = True
                    raise ChannelClosed(f"data link to {self.peer} closed by the peer")
                got += n
            self.bytes_received += got
        except (TimeoutError, OSError) as e:
            raise self._read_failed(e, cut=got > 0) from e

    def _read_failed(self, e: OSError, cut: bool) -> TransportError:
        """The error a failed read raises. A link cut mid-frame (its stream out of step) or failed
        serves no more steps; a frame that did not come in time leaves it as it was."""
        if isinstance(e, TimeoutError):
            self.closed = self.closed or cut
            return CollectiveTimeout(f"{self.peer} sent nothing for {self.timeout:.1f} s")
        self.closed = True
        return ChannelClosed(f"data link to {self.peer} failed ({e})")

    def recv_into(self, seq: int, out: np.ndarray) -> None:
        """The peer's DATA frame for collective #seq, read straight into `out`; raises PeerFailed,
        CollectiveAborted, CollectiveTimeout, ChannelClosed or FrameError."""
        view = memoryview(out).cast("B")
        try:  # the frame expected, whole in one read: no header parsing in Python
            if self._inbox.take_frame(self.sock, FRAME.pack(DATA, len(view), seq), view, _POLL["seconds"],
                                      _POLL["yield"]):
                self.bytes_received += FRAME.size + len(view)
                return
        except (TimeoutError, OSError) as e:
            raise self._read_failed(e, cut=False) from e
        size = self._current(seq, DATA)
        if size != out.nbytes:
            self.closed = True
            raise FrameError(f"{self.peer}: data #{seq} of {size} bytes, expected {out.nbytes}")
        self._read_exact(view)

    def recv_gather(self, seq: int, rows: int) -> tuple[np.ndarray, dict]:
        """The peer's GATHER frame for collective #seq: its float32 slice [rows, n] and its counters;
        raises as recv_into, and FrameError for a frame that does not parse."""
        size = self._current(seq, GATHER)
        body = bytearray(size)
        self._read_exact(memoryview(body))
        tail = size - META_LENGTH.size
        meta_length = META_LENGTH.unpack_from(body, tail)[0] if tail >= 0 else -1
        data = tail - meta_length
        width = data // (4 * rows) if rows > 0 and data > 0 else 0
        if not 0 <= meta_length <= MAX_META or data != 4 * rows * width:
            self.closed = True
            raise FrameError(f"{self.peer}: gather #{seq} of {size} bytes is not {rows} rows and counters")
        try:
            meta = decode(memoryview(body)[data:data + meta_length]).get("meta")
            if not isinstance(meta, dict):
                raise FrameError("a gather's counters must be a map")
        except FrameError as e:
            self.closed = True
            raise FrameError(f"{self.peer}: gather #{seq}: {e}") from e
        return np.frombuffer(body, np.float32, count=rows * width).reshape(rows, width), meta

    def _current(self, seq: int, wanted: int) -> int:
        """Reads frames up to the header of collective #seq's frame, which must be of kind `wanted`;
        returns its payload's size. Skips frames left by an earlier step; raises PeerFailed or
        CollectiveAborted for a failure report of this step, FrameError for a frame out of step."""
        while True:
            self._read_exact(memoryview(self._header))
            kind, size, got = FRAME.unpack(self._header)
            if size > MAX_PAYLOAD:
                self.closed = True
                raise FrameError(f"{self.peer} announced a {size}-byte frame")
            if kind in (ERROR, ABORT) or got < seq:
                body = bytearray(size)
                self._read_exact(memoryview(body))
                if stale(got, seq, kind in (ERROR, ABORT)):
                    continue  # left over from a step that failed
                cause, _, reason = body.decode(errors="replace").partition("\n")
                raise (PeerFailed(reason, FailureCause.parse(cause)) if kind == ERROR else
                       CollectiveAborted(f"the hub aborted all-reduce #{seq}: {reason}"))
            if kind != wanted or got != seq:
                self.closed = True  # the peer is out of step: no more steps on this link
                raise FrameError(f"{self.peer}: frame kind {kind} #{got}, expected kind {wanted} #{seq}")
            return size

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


class FastStar:
    """StarAllReduce's sums over DataLinks, on the calling thread (same sequence numbers, same order).

    `next_seq` is the StarAllReduce's own counter, so gathers on the event loop stay in step.
    """

    def __init__(self, rank: int, world_size: int, links: Mapping[int, DataLink], next_seq: Callable[[], int]):
        self.rank, self.world_size, self.links, self._next_seq = rank, world_size, links, next_seq

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        """x: float32 partial -> the float32 sum of every rank's partial, in rank order."""
        seq = self._next_seq()
        if self.world_size == 1:
            return x
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.rank != 0:
            hub = self.links[0]
            hub.send(DATA, seq, x.data)
            out = np.empty_like(x)
            hub.recv_into(seq, out)
            if self.world_size == 2:  # direct exchange: rank 0's + rank 1's (IEEE + commutes: same bits)
                out += x
            return out
        if self.world_size == 2:
            peer = self.links[1]
            peer.send(DATA, seq, x.data)
            summed = np.empty_like(x)
            peer.recv_into(seq, summed)
            summed += x  # rank 1's + rank 0's: the bits of rank 0's + rank 1's (IEEE + commutes)
            return summed
        acc = x.copy()
        part = np.empty_like(x)
        for r in range(1, self.world_size):
            self.links[r].recv_into(seq, part)
            acc += part
        for r in range(1, self.world_size):
            self.links[r].send(DATA, seq, acc.data)
        return acc

    def gather(self, x: np.ndarray, meta: dict) -> tuple[np.ndarray | None, dict[int, dict]]:
        """x [..., n_r] float32, this rank's slice -> at the hub every rank's slice concatenated along
        the last axis in rank order [..., sum n_r], and each worker's `meta` (small counters) by rank;
        (None, {}) elsewhere. StarAllReduce.gather on the data plane (one collective number)."""
        seq = self._next_seq()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.rank != 0:
            counters = encode({"t": "ga", "meta": meta})
            self.links[0].send(GATHER, seq, x.data, counters, META_LENGTH.pack(len(counters)))
            return None, {}
        rows = int(np.prod(x.shape[:-1]))  # each worker's slice: these rows, its own width
        parts, metas = [x], {}
        for r in range(1, self.world_size):
            part, metas[r] = self.links[r].recv_gather(seq, rows)
            parts.append(part.reshape(*x.shape[:-1], part.shape[-1]))
        return np.concatenate(parts, axis=-1), metas

    def report(self, kind: int, seq: int, reason: str, cause: FailureCause = FailureCause.PEER) -> None:
        """From the event loop: ERROR to the hub (a worker's failure) or ABORT to every worker (the hub's)."""
        for link in list(self.links.values()):
            link.send_nowait(kind, seq, reason, cause)


class _FramedSocket:
    """Length-prefixed msgpack frames over a non-blocking socket, for the handshake only."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        self.sock, self.loop, self._pending = sock, loop, []

    def send(self, msg: dict) -> None:
        body = encode(msg)
        self._pending.append(HEADER.pack(len(body)) + body)

    async def flush(self) -> None:
        for data in self._pending:
            await self.loop.sock_sendall(self.sock, data)
        self._pending.clear()

    async def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await self.loop.sock_recv(self.sock, n - len(buf))
            if not chunk:
                raise AuthError("the data link closed during the handshake")
            buf += chunk
        return buf

    async def receive(self) -> dict:
        await self.flush()
        (size,) = HEADER.unpack(await self._exact(HEADER.size))
        if size > HANDSHAKE_MAX_FRAME:
            raise AuthError(f"handshake frame of {size} bytes")
        return decode(await self._exact(size))


async def open_data_link(host: str, port: int, secret: bytes, rank: int, timeout: float) -> DataLink:
    """Worker side: connect, authenticate, name our rank; raises OSError, TimeoutError or AuthError."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            await loop.sock_connect(sock, (host, port))
            framed = _FramedSocket(sock, loop)
            await client_handshake(framed.send, framed.receive, secret)
            framed.send({"t": "data", "rank": rank})
            if (await framed.receive()).get("t") != "data.ok":
                raise AuthError("the master refused the data link")
    except BaseException:
        sock.close()
        raise
    return DataLink(sock, f"{host}:{port}", timeout)


class DataServer:
    """Master side: accepts data links and hands each authenticated one, with its rank, to `on_link`."""

    def __init__(self, secret: bytes, timeout: float, on_link: Callable[[int, DataLink], Awaitable[None] | None]):
        self._secret, self._timeout, self._on_link = secret, timeout, on_link
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, host: str) -> int:
        """Listen on an ephemeral port of `host`; returns it. The accept loop starts with `serve`."""
        self._sock = socket.create_server((host, 0), reuse_port=False)
        self._sock.setblocking(False)
        return self._sock.getsockname()[1]

    async def serve(self) -> None:
        """Accept until cancelled (the owner runs this as its task)."""
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, addr = await loop.sock_accept(self._sock)
            task = loop.create_task(self._admit(conn, f"{addr[0]}:{addr[1]}"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _admit(self, conn: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                framed = _FramedSocket(conn, loop)
                await server_handshake(framed.send, framed.receive, self._secret)
                hello = await framed.receive()
                rank = hello.get("rank")
                if hello.get("t") != "data" or not isinstance(rank, int):
                    raise AuthError(f"expected a data-link hello, got {hello.get('t')!r}")
                link = DataLink(conn, peer, self._timeout)
                link.sock.setblocking(False)  # until the welcome is out
                result = self._on_link(rank, link)
                if result is not None:
                    await result
                framed.send({"t": "data.ok"})
                await framed.flush()
                link.sock.settimeout(self._timeout)  # blocking with a timeout from here on
        except (TimeoutError, TransportError, OSError) as e:  # a bad or slow peer: drop it, keep serving
            log.warning("data link from %s refused: %s", peer, e)
            conn.close()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._sock is not None:
            self._sock.close()
