"""Rank 0's embedding (edge.rank0): an in-memory table's rows by numpy indexing, exactly
F.embedding's, and a decode step's few rows taken on the calling thread (no hop to the compute
thread) while a prefill's and the split's mapped rows go through the compute thread."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
import torch.nn.functional as F

from edge.rank0 import Rank0, TableRows
from models.threads import SMALL_STEP_TOKENS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (2, 4), (1, 40)])
def test_table_rows_are_f_embedding(dtype, shape):
    table = torch.randn(50, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
    tokens = torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(2))
    got = TableRows(table)(tokens)
    want = F.embedding(tokens, table)
    assert got.dtype == dtype and got.shape == (*shape, 12)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad", [50, -1])
@pytest.mark.parametrize("before", [0, 1, SMALL_STEP_TOKENS + 3])  # a decode step's few ids; a prefill's
def test_a_token_outside_the_table_is_an_index_error(bad, before):
    with pytest.raises(IndexError, match="50 rows"):
        TableRows(torch.zeros(50, 4))(torch.tensor([[3] * before + [bad]]))


class RecordingShard:
    """Stands in for ShardModel: `run` counts its calls and runs them on another thread."""

    def __init__(self):
        self.runs = 0

    async def run(self, fn):
        self.runs += 1
        return await asyncio.to_thread(fn)


def rank0_with(embed) -> tuple[Rank0, RecordingShard]:
    rank0 = Rank0.__new__(Rank0)
    rank0.shard, rank0.embed = RecordingShard(), embed
    return rank0, rank0.shard


async def test_a_decode_step_embeds_on_the_calling_thread():
    table = torch.randn(30, 8)
    rank0, shard = rank0_with(TableRows(table))
    tokens = torch.tensor([[5]] * SMALL_STEP_TOKENS)
    assert torch.equal(await rank0.embedded(tokens), F.embedding(tokens, table))
    assert shard.runs == 0
    prefill = torch.arange(SMALL_STEP_TOKENS + 1).view(1, -1)
    assert torch.equal(await rank0.embedded(prefill), F.embedding(prefill, table))
    assert shard.runs == 1


async def test_rows_read_from_files_go_to_the_compute_thread():
    seen = []

    def mapped(tokens):  # as edge.weights.EmbeddingRows: may read the disk
        seen.append(threading.current_thread() is threading.main_thread())
        return torch.zeros(*tokens.shape, 4)

    rank0, shard = rank0_with(mapped)
    await rank0.embedded(torch.tensor([[1]]))
    assert shard.runs == 1 and seen == [False]
