"""Admission counted in sequences: slots per choice, FIFO order, 429 when the queue is full, and
nothing leaked by requests that give up while waiting (unit tests on the event loop; the API test
with a real server is in test_api.py)."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import openai
import pytest
from cluster_proc import ClusterProcess
from hf_reference import make_hf_checkpoint

from scheduler.admission import Admission
from scheduler.errors import ApiError


async def hold(admission: Admission, sequences: int, release: asyncio.Event, log: list, name: str) -> None:
    async with admission.slot(None, sequences):
        log.append(name)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_request_holds_one_slot_per_sequence():
    admission, release, log = Admission(4, 8), asyncio.Event(), []
    wide = asyncio.create_task(hold(admission, 3, release, log, "wide"))
    await settle()
    assert (admission.free, admission.running) == (1, 1)
    narrow = asyncio.create_task(hold(admission, 2, release, log, "narrow"))  # 2 > 1 free: waits
    await settle()
    assert log == ["wide"] and admission.waiting == 1
    release.set()
    await asyncio.gather(wide, narrow)
    assert log == ["wide", "narrow"] and admission.free == 4 and admission.running == 0


async def test_a_request_wider_than_the_limit_runs_alone_instead_of_never():
    admission, release, log = Admission(2, 8), asyncio.Event(), []
    huge = asyncio.create_task(hold(admission, 32, release, log, "huge"))
    await settle()
    assert log == ["huge"] and admission.free == 0
    one = asyncio.create_task(hold(admission, 1, release, log, "one"))
    await settle()
    assert log == ["huge"]
    release.set()
    await asyncio.gather(huge, one)
    assert log == ["huge", "one"] and admission.free == 2


async def test_waiting_requests_are_served_in_arrival_order_so_a_wide_one_is_not_starved():
    admission, first, rest, log = Admission(2, 8), asyncio.Event(), asyncio.Event(), []
    running = asyncio.create_task(hold(admission, 1, first, log, "running"))
    await settle()
    wide = asyncio.create_task(hold(admission, 2, rest, log, "wide"))  # needs both: waits for "running"
    await settle()
    narrow = asyncio.create_task(hold(admission, 1, rest, log, "narrow"))  # one is free, but wide came first
    await settle()
    assert log == ["running"] and admission.waiting == 2
    first.set()
    await settle()
    assert log == ["running", "wide"]
    rest.set()
    await asyncio.gather(running, wide, narrow)
    assert log == ["running", "wide", "narrow"]


async def test_full_queue_answers_429_by_sequences_not_by_requests():
    admission, release, log = Admission(4, 1), asyncio.Event(), []
    held = asyncio.create_task(hold(admission, 3, release, log, "held"))
    await settle()
    assert not admission.queue_full(1)  # one slot is free: admitted at once
    queued = asyncio.create_task(hold(admission, 2, release, log, "queued"))
    await settle()
    assert admission.queue_full(1)  # behind a waiting request, with the queue full
    with pytest.raises(ApiError) as refused:
        async with admission.slot(None, 1):
            pass
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
    assert "3 of 4 sequences running" in str(refused.value)
    release.set()
    await asyncio.gather(held, queued)


async def test_a_waiter_that_times_out_or_is_cancelled_leaves_nothing_held_and_unblocks_the_next():
    admission, release, log = Admission(2, 8), asyncio.Event(), []
    running = asyncio.create_task(hold(admission, 1, release, log, "running"))
    await settle()
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):  # a wide request gives up at its deadline...
        async with admission.slot(loop.time() + 0.05, 2):
            pass
    assert admission.waiting == 0 and admission.free == 1
    cancelled = asyncio.create_task(hold(admission, 2, release, log, "cancelled"))
    await settle()
    behind = asyncio.create_task(hold(admission, 1, release, log, "behind"))  # held back by the wide one
    await settle()
    assert log == ["running"]
    cancelled.cancel()  # ...or its client leaves: the narrow one behind it fits the free slot now
    await settle()
    assert log == ["running", "behind"] and admission.free == 0
    release.set()
    await asyncio.gather(running, behind)
    assert admission.free == 2 and admission.running == 0 and admission.waiting == 0


async def test_slots_granted_to_a_waiter_cancelled_before_it_resumed_are_handed_back():
    admission, log = Admission(1, 8), []
    held = admission.slot(None, 1)
    await held.__aenter__()  # the only slot
    waiter = asyncio.create_task(hold(admission, 1, asyncio.Event(), log, "waiter"))
    await settle()
    assert admission.waiting == 1
    await held.__aexit__(None, None, None)  # grants the slot to the waiter, which has not run since
    assert admission.free == 0
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert log == [] and admission.free == 1 and admission.running == 0


@pytest.fixture(scope="module")
def two_slot_cluster(tmp_path_factory):
    """Two generation slots, a queue of one, 20 ms links: a 100-token request takes seconds."""
    model = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=6)
    proc = ClusterProcess(model, 2, tmp_path_factory.mktemp("slots"), "--max-running", "2", "--max-queue", "1",
                          "--link-latency-ms", "20")
    yield proc
    proc.stop()


async def queue_depth(url: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        return float(re.findall(r"^edge_queue_depth (\S+)$", await r.text(), re.M)[0])


async def test_a_request_of_n_choices_holds_n_slots_of_a_real_server(two_slot_cluster):
    """A streamed request of n=2 holds both slots: the next request waits (the queue's one place) and
    the one after is refused, until the wide one's client leaves."""
    url = two_slot_cluster.url
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60) as oai:
        name = two_slot_cluster.model.name
        wide = await oai.completions.create(model=name, prompt="wide", max_tokens=100, n=2, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
        await anext(aiter(wide))  # generating: both slots held
        queued = asyncio.create_task(oai.completions.create(model=name, prompt="queued", max_tokens=2))
        for _ in range(100):
            if await queue_depth(url) == 1:
                break
            await asyncio.sleep(0.05)
        assert await queue_depth(url) == 1 and not queued.done()
        with pytest.raises(openai.RateLimitError, match="2 of 2 sequences running"):
            await oai.completions.create(model=name, prompt="one too many", max_tokens=2)
        await wide.close()  # the client leaves: its slots go to the waiting request
        answer = await asyncio.wait_for(queued, 30)
        assert answer.choices[0].finish_reason == "length" and await queue_depth(url) == 0
