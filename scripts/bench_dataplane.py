"""The decode's all-reduce data plane (transport.fastpath.FastStar) on N real processes over loopback
TCP, beside bare sockets in the same run: the same bytes (a 16-byte header and the float32 payload per
frame, the star's pattern of writes and reads) moved by bare os.write / recv_into calls with no
framing, checks or summing. Phases alternate (ours, bare, ours, ...) and each row reports the
median over rounds of rank 0's wall time per all-reduce. Writes bench/dataplane.json and .md.

    python scripts/bench_dataplane.py [--workers 2 3 4] [--elements 576 2048] [--poll-us 0 300]
        [--iters 5000] [--rounds 3] [--out bench]

--poll-us is transport.fastpath.set_poll_us (0: reads sleep in recv at once; >0: non-blocking tries
first, as `edge-llm cluster` sets when its devices do not outnumber the cores, and so here: polling rows
are run only for rank counts up to the cores); the bare reads spin the same way (pure spinning
when polling, a plain blocking recv otherwise).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import time
from pathlib import Path

import numpy as np

from transport.fastpath import FRAME, DataLink, FastStar, set_poll_us


def _pairs(workers: int) -> list[tuple[socket.socket, socket.socket]]:
    """(hub side, worker side) TCP loopback sockets, one pair per worker rank."""
    listener = socket.create_server(("127.0.0.1", 0))
    pairs = []
    for _ in range(1, workers):
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        pairs.append((server, client))
    listener.close()
    return pairs


def _read_exact(sock: socket.socket, view: memoryview, spin: bool) -> None:
    got = 0
    while got < len(view):
        try:
            n = os.readv(sock.fileno(), [view[got:]]) if spin else sock.recv_into(view[got:])
        except BlockingIOError:
            continue
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def _raw_round(rank: int, socks: dict[int, socket.socket], frame: bytes, iters: int, spin: bool) -> None:
    """Bare sockets: the star's frames as bare writes and reads (2 ranks: a direct exchange)."""
    buf = memoryview(bytearray(len(frame)))
    for _ in range(iters):
        if rank != 0 or len(socks) == 1:
            for s in socks.values():
                os.write(s.fileno(), frame)
            for s in socks.values():
                _read_exact(s, buf, spin)
            continue
        for s in socks.values():
            _read_exact(s, buf, spin)
        for s in socks.values():
            os.write(s.fileno(), frame)


def _rank(rank: int, world: int, socks: dict[int, socket.socket], elements: int, poll_us: int, iters: int,
          rounds: int, barrier, results: mp.Queue) -> None:
    set_poll_us(poll_us)
    counter = iter(range(1, 1 << 62))
    links = {r: DataLink(s, f"rank {r}", 30.0) for r, s in socks.items()}
    star = FastStar(rank, world, links, counter.__next__)
    x = np.random.default_rng(rank).standard_normal(elements).astype(np.float32)
    frame = FRAME.pack(1, x.nbytes, 0) + x.tobytes()
    raw = {r: socket.socket(fileno=os.dup(s.fileno())) for r, s in socks.items()}  # blocking or spinning reads
    for s in raw.values():
        s.setblocking(not poll_us)
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    for _ in range(rounds):
        for name in ("ours", "bare"):
            barrier.wait()
            began = time.perf_counter()
            if name == "ours":
                for _ in range(iters):
                    star.allreduce(x)
            else:
                _raw_round(rank, raw, frame, iters, bool(poll_us))
            times[name].append((time.perf_counter() - began) / iters)
    if rank == 0:
        results.put({k: statistics.median(v) * 1e6 for k, v in times.items()})


def run(workers: int, elements: int, poll_us: int, iters: int, rounds: int) -> dict:
    pairs = _pairs(workers)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    socks = [{r + 1: hub for r, (hub, _) in enumerate(pairs)}] + [{0: w} for _, w in pairs]
    procs = [ctx.Process(target=_rank, args=(r, workers, socks[r], elements, poll_us, iters, rounds, barrier, results))
             for r in range(workers)]
    for p in procs:
        p.start()
    try:
        got = results.get(timeout=600)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return {"workers": workers, "elements": elements, "poll_us": poll_us, "iterations": iters, "rounds": rounds,
            "ours_us": round(got["ours"], 1), "bare_us": round(got["bare"], 1),
            "ratio": round(got["ours"] / got["bare"], 2)}


def write_results(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataplane.json").write_text(json.dumps(rows, indent=2))
    lines = ["Rank 0's wall time per all-reduce, back to back (us; median of the rounds' means). 'data plane' "
             "is FastStar over DataLinks (what a decode step's layers use); 'bare sockets' moves the same bytes "
             "in the same pattern with bare writes and reads, in the same run. Host: "
             f"{os.cpu_count()} cores.", "",
             "| ranks | elements | poll us | data plane us | bare sockets us | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['elements']} | {r['poll_us']} | {r['ours_us']} | {r['bare_us']} | {r['ratio']} |"
              for r in rows]
    (out / "dataplane.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 3, 4], help="ranks, the hub included")
    p.add_argument("--elements", type=int, nargs="+", default=[576, 2048], help="float32 values per all-reduce")
    p.add_argument("--poll-us", type=int, nargs="+", default=[0, 300])
    p.add_argument("--iters", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench"))
    args = p.parse_args(argv)
    rows = [run(w, e, poll, args.iters, args.rounds)
            for w in args.workers for e in args.elements for poll in args.poll_us
            if w >= 2 and (poll == 0 or w <= (os.cpu_count() or 1))]  # spinning ranks beyond the cores starve each other
    write_results(rows, args.out)
    print((args.out / "dataplane.md").read_text())


if __name__ == "__main__":
    main()
