"""An opt-in trace of every all-reduce's entry and exit on this rank, for the decode profile.

Why: a rank's time in an all-reduce is partly waiting for the slower rank to arrive and partly the
exchange itself (the link, the wake-up, the sum); one rank alone cannot tell them apart. With
EDGE_LLM_ALLREDUCE_TRACE naming a folder, each rank appends (entry, exit) of each all-reduce, in
CLOCK_MONOTONIC nanoseconds, to `rank<R>.<pid>.i64` there, once per forward (one write). The ranks
of an emulated cluster share that clock, so scripts/profile_decode.py pairs the k-th all-reduce of
every rank and splits it (`split_allreduces`). Off (the default) it costs nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

TRACE_ENV = "EDGE_LLM_ALLREDUCE_TRACE"


class AllReduceTrace:
    """Collects (entry, exit) ns pairs on the compute thread; `flush` appends them to the file."""

    def __init__(self, folder: str | os.PathLike, rank: int):
        self.path = Path(folder) / f"rank{rank}.{os.getpid()}.i64"
        self._records: list[int] = []

    @classmethod
    def from_env(cls, rank: int) -> AllReduceTrace | None:
        folder = os.environ.get(TRACE_ENV)
        return cls(folder, rank) if folder else None

    @staticmethod
    def now() -> int:
        return time.monotonic_ns()

    def add(self, entered: int, left: int) -> None:
        self._records += (entered, left)

    def flush(self) -> None:
        """Append this forward's records (int64 little-endian pairs) and forget them."""
        if self._records:
            with open(self.path, "ab") as f:
                f.write(np.asarray(self._records, dtype="<i8").tobytes())
            self._records.clear()


def read_trace(folder: str | os.PathLike) -> dict[int, np.ndarray]:
    """rank -> its all-reduces as [n, 2] int64 (entry, exit) ns, in order (one process per rank)."""
    out: dict[int, np.ndarray] = {}
    for path in sorted(Path(folder).glob("rank*.i64")):
        rank = int(path.name[4:].split(".")[0])
        if rank in out:
            raise ValueError(f"two trace files for rank {rank} in {folder}: one cluster per folder")
        out[rank] = np.fromfile(path, dtype="<i8").reshape(-1, 2)
    return out


def split_allreduces(trace: dict[int, np.ndarray], since: int, until: int) -> dict[int, dict[str, float]]:
    """Per rank, over the all-reduces rank 0 entered and left within [since, until] ns: mean seconds
    per all-reduce spent waiting for the last rank to enter ("wait_s", 0 for the last one) and from
    then until this rank left ("exchange_s": the link, the wake-up, the sum), and their count.

    The k-th all-reduce of every rank is the same collective (all ranks run every step's
    all-reduces in order); ranks whose counts differ are an error, not a guess.
    """
    counts = {r: len(t) for r, t in trace.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"ranks traced different numbers of all-reduces: {counts}")
    ranks = sorted(trace)
    if not ranks or ranks[0] != 0:
        raise ValueError("no trace of rank 0")
    keep = (trace[0][:, 0] >= since) & (trace[0][:, 1] <= until)
    entered = np.stack([trace[r][keep, 0] for r in ranks])  # [ranks, n]
    left = np.stack([trace[r][keep, 1] for r in ranks])
    last = entered.max(axis=0)  # [n]: when the last rank entered
    n = int(keep.sum())
    return {r: {"wait_s": float((last - entered[i]).mean()) / 1e9 if n else 0.0,
                "exchange_s": float((left[i] - last).mean()) / 1e9 if n else 0.0,
                "count": n} for i, r in enumerate(ranks)}
