"""The master and its workers in one process (one event loop, loopback TCP): the engine's parts
wired together, tested in seconds without spawning processes."""

import asyncio
import contextlib

import pytest
from hf_reference import hf_greedy, make_hf_checkpoint

from edge.master import ClusterEngine, MasterSettings
from edge.worker import Worker, WorkerSettings
from models.engine import EngineUnavailable
from models.generation import generate
from models.sampling import SamplingParams

PROMPT = [0, 17, 250, 33, 99, 5, 120]
NEW_TOKENS = 12
SECRET = b"in-process-secret-" + b"z" * 20


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=5)
    return folder, hf_greedy(folder, PROMPT, NEW_TOKENS)


@contextlib.asynccontextmanager
async def cluster(folder, world_size: int, **settings):
    engine = ClusterEngine(MasterSettings(model=str(folder), world_size=world_size, secret=SECRET, **settings))
    port = await engine.start()
    workers = [Worker(WorkerSettings(str(folder), r, "127.0.0.1", port, SECRET)) for r in range(1, world_size)]
    tasks = [asyncio.create_task(w.run(), name=f"worker-{w.settings.rank}") for w in workers]
    try:
        await engine.wait_ready(30)
        yield engine, workers
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in workers:
            await w.aclose()
        await engine.aclose()


async def greedy(engine, prompt=PROMPT, n=NEW_TOKENS) -> tuple[list[int], list[float]]:
    events = [e async for e in generate(engine, prompt, SamplingParams(max_tokens=n, ignore_eos=True))]
    return [e.token_id for e in events], [e.logprob for e in events]


@pytest.mark.parametrize("world_size", [2, 3])
async def test_in_process_cluster_matches_transformers(llama, world_size):
    folder, (ref_tokens, ref_logprobs) = llama
    async with cluster(folder, world_size) as (engine, _):
        tokens, logprobs = await greedy(engine)
        assert tokens == ref_tokens
        assert logprobs == pytest.approx(ref_logprobs, abs=1e-4)
        assert engine.status().up and engine.status().missing_ranks == []
        counters = engine.counters()
        assert counters.steps == NEW_TOKENS and counters.step_rows == NEW_TOKENS
        assert set(counters.weight_bytes) == set(range(world_size)) and all(counters.weight_bytes.values())


async def test_concurrent_requests_share_batched_steps(llama):
    folder, (ref_tokens, _) = llama
    async with cluster(folder, 2) as (engine, _):
        results = await asyncio.gather(*(greedy(engine) for _ in range(3)))
        assert all(tokens == ref_tokens for tokens, _ in results)
        counters = engine.counters()
        assert counters.step_rows == 3 * NEW_TOKENS
        assert counters.steps < counters.step_rows  # decode steps ran together


async def test_a_worker_that_goes_away_fails_its_request_once_and_shows_in_status(llama):
    folder, _ = llama
    async with cluster(folder, 3) as (engine, workers):
        stream = generate(engine, PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
        await anext(stream)
        await workers[1].master.aclose()  # rank 2's link drops mid-request
        with pytest.raises(EngineUnavailable):
            async for _ in stream:
                pass
        assert 2 in engine.status().missing_ranks or engine.status().up  # it may already have rejoined
        await engine.wait_ready(30)  # it rejoins by itself
        tokens, _ = await greedy(engine)
        assert tokens == llama[1][0]


async def test_scoring_over_the_split_vocabulary(llama):
    folder, _ = llama
    async with cluster(folder, 2) as (engine, _):
        scores = await engine.score(PROMPT, 2)
    assert len(scores) == len(PROMPT) - 1
    assert all(len(top) == 2 and top[0][1] >= top[1][1] for _, top in scores)
