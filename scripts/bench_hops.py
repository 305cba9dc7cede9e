"""What one hand-off between a process's event loop and its compute thread costs on this host: the
floor under the hop columns of bench/profile.md. Writes bench/hops.json and bench/hops.md.

    .venv/bin/python scripts/bench_hops.py [--hops 500] [--work-ms 1.0]

A decode step crosses threads twice on every rank (edge.engine.ShardModel.run: the event loop
hands the forward to the compute thread with run_in_executor, and the result comes back through
the loop's self-pipe). Here the same mechanism, on the same loop (transport.loop.run_loop: uvloop
when installed), carries a job that spins `--work-ms` as a forward would, so the waiting thread
has gone to sleep when it is woken; "to the thread" runs from the submit to the job's first line,
"back" from its last line to the awaiting coroutine. Beside it, two threads handing a
threading.Event back and forth (the OS's wake-up and the GIL's hand-over, no event loop).

Each is measured with the other core idle and with it busy (a second process spinning, as the
other rank of a 2-device cluster, or the numba/OpenMP helper thread of a 2-thread device, keeps
it): on a virtual machine a woken thread whose core had halted waits for the core to come back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from transport.loop import run_loop  # noqa: E402

SPIN = "import time\nwhile True: pass"


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def executor_hops(hops: int, work_s: float) -> dict[str, list[float]]:
    """Microseconds to the compute thread and back, per hand-off (run_in_executor, as the engine)."""
    loop, pool = asyncio.get_running_loop(), ThreadPoolExecutor(max_workers=1)

    def job(submitted: int) -> tuple[int, int]:
        began = time.perf_counter_ns()
        spin(work_s)
        return began - submitted, time.perf_counter_ns()

    there, back = [], []
    try:
        for _ in range(hops):
            to_thread, ended = await loop.run_in_executor(pool, job, time.perf_counter_ns())
            back.append((time.perf_counter_ns() - ended) / 1e3)
            there.append(to_thread / 1e3)
            spin(work_s / 10)  # the loop's own work between steps (sampling, the next step's rows)
    finally:
        pool.shutdown()
    return {"to_thread_us": there, "back_us": back}


def event_round_trips(hops: int, work_s: float) -> list[float]:
    """Microseconds per round trip of two threads waking each other with threading.Event."""
    ping, pong, times = threading.Event(), threading.Event(), []

    def other() -> None:
        for _ in range(hops):
            ping.wait()
            ping.clear()
            spin(work_s)
            pong.set()

    thread = threading.Thread(target=other)
    thread.start()
    for _ in range(hops):
        began = time.perf_counter_ns()
        ping.set()
        pong.wait()
        pong.clear()
        times.append((time.perf_counter_ns() - began) / 1e3 - work_s * 1e6)
    thread.join()
    return times


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values[len(values) // 10:])  # the first tenth warms up
    return {"median": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))]}


def measure(hops: int, work_s: float, busy: bool) -> dict:
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        time.sleep(0.2 if busy else 0)
        hops_us = run_loop(executor_hops(hops, work_s))
        events = event_round_trips(hops, work_s)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return {"to_thread": summary(hops_us["to_thread_us"]), "back": summary(hops_us["back_us"]),
            "event_round_trip": summary(events)}


def write(results: dict, out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "hops.json").write_text(json.dumps(results, indent=2))
    lines = [f"{results['cores']} cores ({results['cpu']}), loop: {results['loop']}, {results['hops']} hand-offs per "
             f"row, each carrying {results['work_ms']} ms of work; microseconds, median (p90).", "",
             "| other core | to the compute thread | back to the event loop | threading.Event round trip |",
             "|---|---|---|---|"]
    for name, r in results["conditions"].items():
        cells = [f"{r[k]['median']:.0f} ({r[k]['p90']:.0f})" for k in ("to_thread", "back", "event_round_trip")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "hops.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hops", type=int, default=500)
    parser.add_argument("--work-ms", type=float, default=1.0)
    parser.add_argument("--out", default="bench")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    conditions = {name: measure(args.hops, args.work_ms / 1000, busy) for name, busy in (("idle", False),
                                                                                         ("busy", True))}
    results = {"cores": os.cpu_count(), "cpu": cpu, "loop": loop, "hops": args.hops, "work_ms": args.work_ms,
               "conditions": conditions}
    write(results, Path(args.out))
    print((Path(args.out) / "hops.md").read_text())


if __name__ == "__main__":
    main()
