"""An opt-in trace of every forward's and all-reduce's entry and exit on this rank, for the decode profile.

Why: a rank's time in an all-reduce is partly waiting for the slower rank to arrive and partly the
exchange itself (the link, the wake-up, the sum); one rank alone cannot tell them apart. With
EDGE_LLM_STEP_TRACE naming a folder, each rank appends (kind, entry, exit) of each all-reduce
and forward, in CLOCK_MONOTONIC nanoseconds, to `rank<R>.<pid>.i64` there, once per forward (one
write). The ranks of an emulated cluster share that clock, so scripts/profile_decode.py pairs the
k-th all-reduce of every rank and splits it (`split_allreduces`), and times forwards
(`forward_seconds`), over the decode steps alone (the window after the first token). Between two
forwards rank 0 and the workers also mark the moments of a step outside the forward (`STAGES`:
back on the event loop, logits gathered, the next step begun, its rows embedded, the command
received), so `between_forwards` says where the time between forwards goes. Off (the default) it
costs nothing.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

TRACE_ENV = "EDGE_LLM_STEP_TRACE"
ALLREDUCE, FORWARD, MARK = 0, 1, 2  # record kinds; a MARK is (MARK, stage index, ns)
# A step's moments outside the forward, in order: rank 0's compute thread handed the forward's
# output back to the event loop; every rank's logits gathered; the next step begun (by the step
# runner, once the token was chosen: models.decoding.PlainStep makes the token's event after);
# its rows embedded (the command to the workers is framed and sent next); a worker received the
# command. Then each rank's next FORWARD entry.
STAGES = ("on_loop", "gathered", "step_begun", "rows_embedded", "step_received")


class StepTrace:
    """Collects (kind, entry, exit) ns records on the compute thread, and marks from the event loop's
    thread too; `flush` appends them to the file."""

    def __init__(self, folder: str | os.PathLike, rank: int):
        self.path = Path(folder) / f"rank{rank}.{os.getpid()}.i64"
        self._records: list[int] = []
        self._lock = threading.Lock()  # marks come from the event loop while the compute thread flushes

    @classmethod
    def from_env(cls, rank: int) -> StepTrace | None:
        folder = os.environ.get(TRACE_ENV)
        return cls(folder, rank) if folder else None

    @staticmethod
    def now() -> int:
        return time.monotonic_ns()

    def add(self, kind: int, entered: int, left: int) -> None:
        with self._lock:
            self._records += (kind, entered, left)

    def mark(self, stage: str) -> None:
        """This moment as one of `STAGES`."""
        with self._lock:
            self._records += (MARK, STAGES.index(stage), self.now())

    def flush(self) -> None:
        """Append the records so far (int64 little-endian triples) and forget them. Called at the end
        of every forward: the marks of a step after its forward are written with the next one."""
        with self._lock:
            records, self._records = self._records, []
        if records:
            with open(self.path, "ab") as f:
                f.write(np.asarray(records, dtype="<i8").tobytes())


def read_trace(folder: str | os.PathLike) -> dict[int, np.ndarray]:
    """rank -> its records as [n, 3] int64 (kind, entry ns, exit ns), in order (one process per rank)."""
    out: dict[int, np.ndarray] = {}
    for path in sorted(Path(folder).glob("rank*.i64")):
        rank = int(path.name[4:].split(".")[0])
        if rank in out:
            raise ValueError(f"two trace files for rank {rank} in {folder}: one cluster per folder")
        out[rank] = np.fromfile(path, dtype="<i8").reshape(-1, 3)
    return out


def split_allreduces(trace: dict[int, np.ndarray], since: int, until: int) -> dict[int, dict[str, float]]:
    """Per rank, over the all-reduces rank 0 entered and left within [since, until] ns: mean seconds
    per all-reduce spent waiting for the last rank to enter ("wait_s", 0 for the last one) and from
    then until this rank left ("exchange_s": the link, the wake-up, the sum), and their count.

    The k-th all-reduce of every rank is the same collective (all ranks run every step's
    all-reduces in order); ranks whose counts differ are an error, not a guess.
    """
    reduces = {r: t[t[:, 0] == ALLREDUCE, 1:] for r, t in trace.items()}
    counts = {r: len(t) for r, t in reduces.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"ranks traced different numbers of all-reduces: {counts}")
    ranks = sorted(reduces)
    if not ranks or ranks[0] != 0:
        raise ValueError("no trace of rank 0")
    keep = (reduces[0][:, 0] >= since) & (reduces[0][:, 1] <= until)
    entered = np.stack([reduces[r][keep, 0] for r in ranks])  # [ranks, n]
    left = np.stack([reduces[r][keep, 1] for r in ranks])
    last = entered.max(axis=0)  # [n]: when the last rank entered
    n = int(keep.sum())
    return {r: {"wait_s": float((last - entered[i]).mean()) / 1e9 if n else 0.0,
                "exchange_s": float((left[i] - last).mean()) / 1e9 if n else 0.0,
                "count": n} for i, r in enumerate(ranks)}


def forward_seconds(trace: np.ndarray, since: int, until: int) -> tuple[float, int]:
    """One rank's mean forward seconds over its forwards within [since, until] ns, and their count."""
    forwards = trace[(trace[:, 0] == FORWARD) & (trace[:, 1] >= since) & (trace[:, 2] <= until)]
    return (float((forwards[:, 2] - forwards[:, 1]).mean()) / 1e9 if len(forwards) else 0.0), len(forwards)


def between_forwards(trace: dict[int, np.ndarray], since: int, until: int) -> dict[str, float]:
    """Mean seconds per decode step from rank 0's forward exit to its next forward's entry, split at
    rank 0's marks in the order they happened, each part named by the moment that ends it:
    "to_loop" (until back on the event loop), "gather" (until every rank's logits are in: on the
    event loop after the hop back, or on the data plane before it), "next_step" (sampling,
    detokenizing, the generate loop and the step runner, until the next step begins), "embed" (the
    step's rows and their embedding), "to_compute" (framing and sending the step's command to the
    workers, until rank 0's compute thread enters the forward); and for the workers (mean over
    them), "worker_receive" (rows embedded to the command received: framing, sending, receiving)
    and "worker_to_compute" (received to their forward's entry). Over the steps within [since,
    until] ns whose every moment was marked; "steps" counts them.
    """
    exits, entries, stages = _forwards_and_marks(trace[0])
    workers = [_forwards_and_marks(t) for r, t in sorted(trace.items()) if r != 0]
    received_at = STAGES.index("step_received")
    parts: dict[str, list[float]] = {}
    for left, entered in zip(exits, entries[1:]):
        if left < since or entered > until:
            continue
        moments = {_ENDS[i]: _first_after(stages.get(i, _NONE), left) for i in range(len(_ENDS))}
        received = [_first_after(w[2].get(received_at, _NONE), left) for w in workers]
        started = [_first_after(w[1], left) for w in workers]
        if None in (*moments.values(), *received, *started) or max(moments.values()) > entered:
            continue
        previous = left
        for name, t in sorted(moments.items(), key=lambda item: item[1]):
            parts.setdefault(name, []).append((t - previous) / 1e9)
            previous = t
        parts.setdefault("to_compute", []).append((entered - previous) / 1e9)
        for r, s in zip(received, started):
            parts.setdefault("worker_receive", []).append((r - moments["embed"]) / 1e9)
            parts.setdefault("worker_to_compute", []).append((s - r) / 1e9)
    steps = len(parts.get("to_loop", []))
    return {name: float(np.mean(v)) for name, v in parts.items()} | {"steps": steps}


_ENDS = ("to_loop", "gather", "next_step", "embed")  # the part of the gap that rank 0's STAGES[i] ends
_NONE = np.empty(0, np.int64)


def _forwards_and_marks(records: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """One rank's forward exits and entries (in order) and its marks' times per stage index."""
    forwards = records[records[:, 0] == FORWARD]
    marks = records[records[:, 0] == MARK]
    stages = {int(i): np.sort(marks[marks[:, 1] == i, 2]) for i in np.unique(marks[:, 1])}
    return forwards[:, 2], forwards[:, 1], stages


def _first_after(times: np.ndarray, moment: int) -> int | None:
    """The first of the sorted `times` at or after `moment`."""
    i = int(np.searchsorted(times, moment))
    return int(times[i]) if i < len(times) else None
