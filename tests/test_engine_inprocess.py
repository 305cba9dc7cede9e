"""The master and its workers in one process (one event loop, loopback TCP): the engine's parts
wired together, tested in seconds without spawning processes."""

import asyncio

import pytest
from hf_reference import hf_greedy, make_hf_checkpoint
from inprocess import SECRET, cluster

from edge.worker import Worker, WorkerSettings
from models.generation import generate
from models.sampling import SamplingParams

PROMPT = [0, 17, 250, 33, 99, 5, 120]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=5)
    return folder, hf_greedy(folder, PROMPT, NEW_TOKENS)


async def greedy(engine, prompt=PROMPT, n=NEW_TOKENS) -> tuple[list[int], list[float]]:
    events = [e async for e in generate(engine, prompt, SamplingParams(max_tokens=n, ignore_eos=True))]
    return [e.token_id for e in events], [e.logprob for e in events]


@pytest.mark.parametrize("world_size", [2, 3])
async def test_in_process_cluster_matches_transformers(llama, world_size):
    folder, (ref_tokens, ref_logprobs) = llama
    async with cluster(folder, world_size) as (engine, _, _):
        tokens, logprobs = await greedy(engine)
        assert tokens == ref_tokens
        assert logprobs == pytest.approx(ref_logprobs, abs=1e-4)
        assert engine.status().up and engine.status().missing_ranks == []
        counters = engine.counters()
        assert counters.steps == NEW_TOKENS and counters.step_rows == NEW_TOKENS
        assert set(counters.weight_bytes) == set(range(world_size)) and all(counters.weight_bytes.values())


async def test_concurrent_requests_share_batched_steps(llama):
    folder, (ref_tokens, _) = llama
    async with cluster(folder, 2) as (engine, _, _):
        results = await asyncio.gather(*(greedy(engine) for _ in range(3)))
        assert all(tokens == ref_tokens for tokens, _ in results)
        counters = engine.counters()
        assert counters.step_rows == 3 * NEW_TOKENS
        assert counters.steps < counters.step_rows  # decode steps ran together


async def _lose(workers: list[Worker], tasks: dict[int, asyncio.Task], rank: int) -> None:
    """The device of `rank` goes away as a killed process does: its task ends, its sockets close."""
    tasks[rank].cancel()
    await asyncio.gather(tasks[rank], return_exceptions=True)
    await workers[rank - 1].aclose()


async def test_a_lost_worker_is_planned_around_and_every_stream_completes(llama):
    folder, (ref_tokens, ref_logprobs) = llama
    async with cluster(folder, 3) as (engine, workers, tasks):
        streams = [generate(engine, PROMPT, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)) for _ in range(3)]
        firsts = [[await anext(s) for _ in range(4)] for s in streams]
        await _lose(workers, tasks, 2)
        results = [first + [e async for e in s] for first, s in zip(firsts, streams, strict=True)]
        for events in results:  # every stream goes on: the same tokens as an uninterrupted run
            assert [e.token_id for e in events] == ref_tokens
            assert [e.logprob for e in events] == pytest.approx(ref_logprobs, abs=1e-4)
        status, counters = engine.status(), engine.counters()
        assert status.up and status.lost_ranks == [2] and [p["rank"] for p in status.plan] == [0, 1]
        assert sum(p["heads"] for p in status.plan) == engine.config.num_heads
        assert counters.replans == 1 and counters.replayed == 3
        workers[1] = Worker(WorkerSettings(str(folder), 2, "127.0.0.1", engine.port, SECRET))  # it comes back
        tasks[2] = asyncio.create_task(workers[1].run())
        async with asyncio.timeout(30):
            while engine.status().lost_ranks:
                await asyncio.sleep(0.05)
        assert [p["rank"] for p in engine.status().plan] == [0, 1, 2]
        assert (await greedy(engine))[0] == ref_tokens


async def test_two_devices_that_lose_one_go_on_with_one(llama):
    folder, (ref_tokens, ref_logprobs) = llama
    async with cluster(folder, 2) as (engine, workers, tasks):
        stream = generate(engine, PROMPT, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
        first = [await anext(stream) for _ in range(3)]
        await _lose(workers, tasks, 1)
        events = first + [e async for e in stream]
        assert [e.token_id for e in events] == ref_tokens
        assert [e.logprob for e in events] == pytest.approx(ref_logprobs, abs=1e-4)
        assert engine.status().plan == [{"rank": 0, "position": 0, "heads": engine.config.num_heads,
                                         "kv_heads": engine.config.num_kv_heads,
                                         "mlp_columns": engine.config.intermediate_size,
                                         "vocab_rows": engine.config.vocab_size}]


async def test_scoring_over_the_split_vocabulary(llama):
    folder, _ = llama
    async with cluster(folder, 2) as (engine, _, _):
        scores = await engine.score(PROMPT, 2)
    assert len(scores) == len(PROMPT) - 1
    assert all(len(top) == 2 and top[0][1] >= top[1][1] for _, top in scores)
