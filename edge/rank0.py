"""Rank 0's own part of the model: its slice of every layer (and of the LM head), and the whole
embedding table, which only rank 0 needs (it embeds every token)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edge.engine import ShardModel, load_shard
from edge.weights import EmbeddingRows
from models.checkpoint import Checkpoint
from models.sharding import LocalDims
from models.threads import SMALL_STEP_TOKENS


class TableRows:
    """The whole embedding table in memory; rows taken by numpy indexing (no torch op, so none
    that could start an OpenMP team on the event loop's thread, models.threads)."""

    def __init__(self, table: torch.Tensor):  # [V, D]
        self.table = table
        wide = table.dtype.itemsize == 2  # bf16 / fp16 rows move as their 16-bit patterns
        self._rows = (table.view(torch.int16) if wide else table).numpy()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, S] int64 -> [B, S, D] in the table's dtype; IndexError outside 0..V-1."""
        ids = tokens.numpy()
        if not _in_range(ids, len(self._rows)):
            raise IndexError(f"token id outside the embedding table's {len(self._rows)} rows")
        return torch.from_numpy(np.ascontiguousarray(self._rows[ids])).view(self.table.dtype)


def _in_range(ids: np.ndarray, n: int) -> bool:
    """Every id in 0..n-1. A decode step's few ids are checked in Python (0.4 us here, against 1.8 for
    numpy's min and max of a one-element array): this is on the path from a chosen token to the
    next forward."""
    if ids.size <= SMALL_STEP_TOKENS:
        return all(0 <= i < n for i in ids.ravel().tolist())
    return bool(ids.min() >= 0 and ids.max() < n)  # an empty array took the branch above


class Rank0:
    """Holds rank 0's shard and embedding for the plan served now; `prepare` loads those of another
    plan beside them, switched to by the callable it returns."""

    def __init__(self, ckpt: Checkpoint, budget_mb: float | None, split_dir: str | None, keep_page_cache: bool):
        self._ckpt, self._budget_mb, self._split_dir = ckpt, budget_mb, split_dir
        self._drop_cache = not keep_page_cache
        self.shard: ShardModel | None = None
        self.embed: Callable[[torch.Tensor], torch.Tensor] | None = None  # token ids [B, S] -> [B, S, D]
        self.embed_bytes = 0  # resident embedding table bytes (none when mapped from the split)
        self.budget_bytes = int(budget_mb * (1 << 20)) if budget_mb else None

    def nbytes(self) -> int:
        """Resident bytes: the slice (what stays of it under a budget) and the embedding table."""
        return self.shard.nbytes() + self.embed_bytes if self.shard is not None else 0

    def load(self, weights: list[float], dims0: LocalDims) -> None:
        """The first plan: rank 0's slice, splitting every rank's files when a budget needs a split."""
        self.prepare(weights, dims0, split_all=True)[0]()

    def prepare(self, weights: list[float], dims0: LocalDims,
                split_all: bool = False) -> tuple[Callable[[], None], Callable[[], None]]:
        """Load rank 0's slice of the plan with `weights` (a re-plan); raises SplitError and
        BudgetTooSmall. Returns (commit: switch to it and release the old slice, discard it)."""
        world = len(weights)
        shard = load_shard(self._ckpt, dims0, world, weights, self._budget_mb, self._split_dir,
                           split_all=split_all, drop_cache=self._drop_cache)
        embed, embed_bytes = self._embedding(shard, world)

        def commit() -> None:
            old, self.shard = self.shard, shard
            self.embed, self.embed_bytes = embed, embed_bytes
            if old is not None:
                old.close()
        return commit, shard.close

    def _embedding(self, shard: ShardModel, world: int) -> tuple[Callable, int]:
        if shard.window is not None:  # rows mapped from the split, outside the budget
            return EmbeddingRows(Path(shard.window.folder), world), 0
        if isinstance(self.embed, TableRows):  # the whole table, the same for every plan
            return self.embed, self.embed_bytes
        table = self._ckpt.read("model.embed_tokens.weight")  # [V, D]
        return TableRows(table), table.nbytes

    async def embedded(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] -> [B, S, D]. A decode step's few rows of an in-memory table are copied right
        here, on the event loop: the hop to the compute thread and back took 280-370 us per token
        (median, 2-device `large` int4 decode; F.embedding itself 70 us of it there), the woken
        thread waiting for the GIL while the loop ran other work. Rows read from the split's files,
        or a prefill's many, go to the compute thread."""
        assert self.shard is not None and self.embed is not None
        if isinstance(self.embed, TableRows) and tokens.numel() <= SMALL_STEP_TOKENS:
            return self.embed(tokens)
        embed = self.embed
        return await self.shard.run(lambda: embed(tokens))

    def close(self) -> None:
        if self.shard is not None:
            self.shard.close()
