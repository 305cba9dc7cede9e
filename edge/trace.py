"""An opt-in trace of every forward's and all-reduce's entry and exit on this rank, for the decode profile.

Why: a rank's time in an all-reduce is partly waiting for the slower rank to arrive and partly the
exchange itself (the link, the wake-up, the sum); one rank alone cannot tell them apart. With
EDGE_LLM_STEP_TRACE naming a folder, each rank appends (kind, entry, exit) of each all-reduce
and forward, in CLOCK_MONOTONIC nanoseconds, to `rank<R>.<pid>.i64` there, once per forward (one
write). The ranks of an emulated cluster share that clock, so scripts/profile_decode.py pairs the
k-th all-reduce of every rank and splits it (`split_allreduces`), and times forwards
(`forward_seconds`), over the decode steps alone (the window after the first token). Off (the
default) it costs nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

TRACE_ENV = "EDGE_LLM_STEP_TRACE"
ALLREDUCE, FORWARD = 0, 1  # record kinds


class StepTrace:
    """Collects (kind, entry, exit) ns records on the compute thread; `flush` appends them to the file."""

    def __init__(self, folder: str | os.PathLike, rank: int):
        self.path = Path(folder) / f"rank{rank}.{os.getpid()}.i64"
        self._records: list[int] = []

    @classmethod
    def from_env(cls, rank: int) -> StepTrace | None:
        folder = os.environ.get(TRACE_ENV)
        return cls(folder, rank) if folder else None

    @staticmethod
    def now() -> int:
        return time.monotonic_ns()

    def add(self, kind: int, entered: int, left: int) -> None:
        self._records += (kind, entered, left)

    def flush(self) -> None:
        """Append this forward's records (int64 little-endian triples) and forget them."""
        if self._records:
            with open(self.path, "ab") as f:
                f.write(np.asarray(self._records, dtype="<i8").tobytes())
            self._records.clear()


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
