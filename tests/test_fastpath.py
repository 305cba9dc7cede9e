"""The all-reduce data plane (transport.fastpath): sums, stale frames, failures and the handshake."""

import asyncio
import os
import socket
import threading
import time

import numpy as np
import pytest

from transport.codec import encode
from transport.collectives import STEP_SHIFT
from transport.errors import (
    AuthError,
    ChannelClosed,
    CollectiveAborted,
    CollectiveTimeout,
    FailureCause,
    FrameError,
    PeerFailed,
)
from transport.fastpath import (
    ABORT,
    DATA,
    ERROR,
    FRAME,
    GATHER,
    META_LENGTH,
    DataLink,
    DataServer,
    FastStar,
    open_data_link,
    set_poll_us,
)

SECRET = b"s" * 32


OPEN: list[DataLink] = []


@pytest.fixture(autouse=True)
def close_links():
    yield
    while OPEN:
        OPEN.pop().close()


def star_links(world: int, timeout: float = 2.0) -> list[dict[int, DataLink]]:
    """Hub-and-spoke DataLinks over socket pairs: links[rank] maps peer rank -> link (closed after the test)."""
    links: list[dict[int, DataLink]] = [{} for _ in range(world)]
    for r in range(1, world):
        a, b = socket.socketpair()
        links[0][r], links[r][0] = DataLink(a, f"rank {r}", timeout), DataLink(b, "rank 0", timeout)
        OPEN.extend((links[0][r], links[r][0]))
    return links


def on_rank_threads(world: int, call) -> list:
    """call(rank, its FastStar) on every rank at once (a thread each, as the compute threads) -> results."""
    links = star_links(world)
    counters = [iter(range(1, 100)) for _ in range(world)]
    outs: list = [None] * world

    def rank(r: int) -> None:
        outs[r] = call(r, FastStar(r, world, links[r], counters[r].__next__))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return outs


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sums_in_rank_order_identical_on_every_rank(world):
    rng = np.random.default_rng(world)
    partials = [rng.standard_normal((1, 1, 96)).astype(np.float32) * 10 ** r for r in range(world)]
    expected = partials[0].copy()
    for p in partials[1:]:
        expected += p  # the hub's order: rank 0, then 1, 2, ...
    outs = on_rank_threads(world, lambda r, star: star.allreduce(partials[r]))
    for out in outs:
        assert out.tobytes() == expected.tobytes()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gather_puts_every_ranks_slice_side_by_side_at_the_hub(world):
    rng = np.random.default_rng(world)
    widths = [7, 5, 6, 3][:world]  # vocabulary slices of an uneven plan
    slices = [rng.standard_normal((2, 3, n)).astype(np.float32) for n in widths]  # [B, S, V_r]
    metas = [{"forward_s": 0.5 * r, "mem_available": 1000 + r} for r in range(world)]
    outs = on_rank_threads(world, lambda r, star: star.gather(slices[r], metas[r]))
    full, got = outs[0]
    assert full.shape == (2, 3, sum(widths))
    assert full.tobytes() == np.concatenate(slices, axis=-1).tobytes()
    assert got == {r: metas[r] for r in range(1, world)}  # the workers' counters, by rank
    assert all(out == (None, {}) for out in outs[1:])


def test_a_workers_failure_report_ends_the_hubs_gather():
    hub, worker = star_links(2)
    left_over = [np.ones(4, np.float32).data, b"", META_LENGTH.pack(0)]  # a gather of a step that failed
    worker[0].send(GATHER, seq(7, 9), *left_over)
    worker[0].send(ERROR, seq(8, 4), f"{FailureCause.INTERNAL.value}\nrank 1: internal error".encode())
    with pytest.raises(PeerFailed, match="internal error") as failed:
        FastStar(0, 2, {1: hub[1]}, lambda: seq(8, 3)).gather(np.ones((1, 4), np.float32), {})
    assert failed.value.cause == FailureCause.INTERNAL


NOT_A_MAP = encode({"t": "ga", "meta": [1, 2]})


@pytest.mark.parametrize("payload", [
    [np.ones(5, np.float32).data, b"", META_LENGTH.pack(0)],  # 5 floats are not 2 rows
    [np.ones(4, np.float32).data, b"xx", META_LENGTH.pack(9)],  # counters longer than the frame
    [np.ones(4, np.float32).data, NOT_A_MAP, META_LENGTH.pack(len(NOT_A_MAP))],  # counters not a map
    [b"\x01"],  # shorter than its own length field
], ids=["rows", "length", "map", "short"])
def test_a_gather_frame_that_does_not_parse_is_refused(payload):
    hub, worker = star_links(2)
    worker[0].send(GATHER, 1, *payload)
    with pytest.raises(FrameError):
        hub[1].recv_gather(1, rows=2)
    assert hub[1].closed


def seq(step: int, count: int) -> int:
    """Collective #count of `step`, as StarAllReduce.begin numbers them."""
    return (step << STEP_SHIFT) + count


def test_stale_frames_of_a_failed_step_are_skipped():
    hub, worker = star_links(2)
    worker[0].send(DATA, seq(7, 5), np.ones(4, np.float32).data)  # left over from step 7, which failed
    worker[0].send(ERROR, seq(7, 6), b"old failure")
    worker[0].send(DATA, seq(8, 1), np.zeros(4, np.float32).data)  # an earlier collective of this step
    worker[0].send(DATA, seq(8, 2), np.full(4, 2, np.float32).data)
    out = np.empty(4, np.float32)
    hub[1].recv_into(seq(8, 2), out)
    assert out.tolist() == [2, 2, 2, 2]


def test_an_abort_ends_the_step_even_for_a_worker_a_collective_ahead():
    """The hub failed before its all-reduce #3 of step 8 (an attention node stopped answering) and
    aborts at #2, the last one it reached; the worker already waits in #3. The abort must release it:
    taken as left over, the worker would read the retried step's first frame as out of step."""
    hub, worker = star_links(2)
    FastStar(0, 2, {1: hub[1]}, lambda: seq(8, 2)).report(ABORT, seq(8, 2), "step 8 failed")
    with pytest.raises(CollectiveAborted, match="step 8 failed"):
        worker[0].recv_into(seq(8, 3), np.empty(4, np.float32))


@pytest.mark.parametrize(("kind", "error"), [(ERROR, PeerFailed), (ABORT, CollectiveAborted)])
def test_reports_fail_the_waiting_rank(kind, error):
    hub, worker = star_links(2)
    FastStar(0, 2, {1: hub[1]}, lambda: 3).report(kind, 3, "rank 1: shard file damaged")
    with pytest.raises(error, match="shard file damaged"):
        worker[0].recv_into(3, np.empty(4, np.float32))


def test_a_report_to_a_peer_already_gone_is_dropped_quietly():
    """The event loop reports failures with send_nowait; a peer that is gone must not raise there."""
    links = star_links(3)
    links[1][0].close()
    FastStar(0, 3, links[0], lambda: 3).report(ABORT, 3, "step 0 failed")
    with pytest.raises(CollectiveAborted, match="step 0 failed"):  # the live worker still hears it
        links[2][0].recv_into(3, np.empty(4, np.float32))


def test_silence_times_out_and_a_gone_peer_is_closed():
    hub, worker = star_links(2, timeout=0.2)
    with pytest.raises(CollectiveTimeout):
        hub[1].recv_into(1, np.empty(4, np.float32))
    worker[0].close()
    with pytest.raises(ChannelClosed):
        hub[1].recv_into(1, np.empty(4, np.float32))


def test_frames_that_arrive_together_are_each_read_whole_and_in_order():
    """One read may take several frames (the receive side is buffered): each call gets its own."""
    hub, worker = star_links(2)
    parts = [np.arange(n, dtype=np.float32) * (i + 1) for i, n in enumerate((4, 8, 4, 20_000))]
    for i, part in enumerate(parts, start=1):
        worker[0].send(DATA, i, part.data)
    for i, part in enumerate(parts, start=1):
        out = np.empty_like(part)
        hub[1].recv_into(i, out)
        assert out.tobytes() == part.tobytes()
    assert hub[1].bytes_received == worker[0].bytes_sent == sum(FRAME.size + p.nbytes for p in parts)


def test_a_frame_cut_short_times_out_and_closes_the_link_but_silence_does_not():
    hub, worker = star_links(2, timeout=0.2)
    with pytest.raises(CollectiveTimeout):
        hub[1].recv_into(1, np.empty(4, np.float32))
    assert not hub[1].closed  # nothing of the frame came: the stream is still in step
    worker[0].sock.sendall(FRAME.pack(DATA, 16, 1) + bytes(8))  # half the payload, then silence
    with pytest.raises(CollectiveTimeout):
        hub[1].recv_into(1, np.empty(4, np.float32))
    assert hub[1].closed


def test_a_frame_of_the_wrong_size_is_refused():
    hub, worker = star_links(2)
    worker[0].send(DATA, 1, np.ones(3, np.float32).data)
    with pytest.raises(FrameError):
        hub[1].recv_into(1, np.empty(4, np.float32))
    assert hub[1].closed  # out of step: the master stops using this link until the worker rejoins


async def test_handshake_admits_the_secret_only():
    accepted: dict[int, DataLink] = {}
    server = DataServer(SECRET, 2.0, lambda rank, link: accepted.__setitem__(rank, link))
    port = server.start("127.0.0.1")
    task = asyncio.create_task(server.serve())
    try:
        with pytest.raises((AuthError, ConnectionError)):
            await open_data_link("127.0.0.1", port, b"w" * 32, 1, 2.0)
        link = await open_data_link("127.0.0.1", port, SECRET, 1, 2.0)
        assert set(accepted) == {1}
        out = np.empty(8, np.float32)
        await asyncio.to_thread(link.send, DATA, 7, np.arange(8, dtype=np.float32).data)
        await asyncio.to_thread(accepted[1].recv_into, 7, out)
        assert out.tolist() == list(range(8))
        link.close()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()
        for link in accepted.values():
            link.close()


class CountingSocket:
    """A socket that counts the blocking reads made on it (polling reads go to its fd directly)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.blocking_reads = sock, 0

    def recv_into(self, *args):
        self.blocking_reads += 1
        return self.sock.recv_into(*args)

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.fixture(params=[False, True], ids=["spinning", "yielding"])
def polling(request, monkeypatch):
    """Reads poll 50 ms, spinning or giving the core away between tries; -> the yields counted."""
    yields = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(1))
    set_poll_us(50_000, yield_cpu=request.param)
    yield request.param, yields
    set_poll_us(0)


@pytest.mark.parametrize(("pause", "polled"), [(0.0, True), (0.15, False)])
def test_polling_reads_a_frame_that_comes_within_it_without_sleeping_in_recv(polling, pause, polled):
    yield_cpu, yields = polling
    hub, worker = star_links(2)
    counting = hub[1].sock = CountingSocket(hub[1].sock)
    payload = np.arange(4096, dtype=np.float32)
    raw = FRAME.pack(DATA, payload.nbytes, 4) + payload.tobytes()

    def feed():  # the frame cut in pieces, `pause` before each
        for i in range(0, len(raw), 5000):
            time.sleep(pause)
            worker[0].sock.sendall(raw[i:i + 5000])

    feeder = threading.Thread(target=feed)
    feeder.start()
    out = np.empty(4096, np.float32)
    hub[1].recv_into(4, out)
    feeder.join()
    assert out.tobytes() == payload.tobytes() and hub[1].bytes_received == len(raw)
    assert (counting.blocking_reads == 0) == polled  # past the poll: the thread sleeps in recv
    if not polled:  # the whole poll passed with nothing to read: yielding, it gave the core away
        assert bool(yields) == yield_cpu


def test_a_peer_gone_while_polling_closes_the_link(polling):
    hub, worker = star_links(2)
    worker[0].sock.sendall(FRAME.pack(DATA, 16, 1) + bytes(8))  # half a frame, then gone
    worker[0].close()
    with pytest.raises(ChannelClosed):
        hub[1].recv_into(1, np.empty(4, np.float32))
    assert hub[1].closed
