"""Parallel work off the compute thread runs on passing threads, which leave no OpenMP team behind."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from models.threads import in_passing_thread, to_passing_thread


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def parallel_work() -> float:
    """Enough elementwise work that torch splits it over its OpenMP team."""
    a = torch.ones(1 << 22)
    return float((a * 2).sum())


def settled(target: int, timeout: float = 2.0) -> int:
    """The thread count once it comes down to `target` (exiting threads take a moment), or as it is."""
    deadline = time.monotonic() + timeout
    while os_threads() > target and time.monotonic() < deadline:
        time.sleep(0.01)
    return os_threads()


@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_passing_thread_leaves_no_thread_team_where_a_pool_thread_does(two_torch_threads):
    start = os_threads()
    assert in_passing_thread(parallel_work) == 2 * (1 << 22)
    assert settled(start) == start
    pool = ThreadPoolExecutor(1)
    try:  # the contrast: a thread that stays keeps its OpenMP team (and then kernels stop spinning)
        pool.submit(parallel_work).result()
        assert settled(start + 1) > start + 1  # the pool's thread and at least one team thread
    finally:
        pool.shutdown()


def test_results_and_exceptions_come_back():
    caller = threading.get_ident()
    assert in_passing_thread(lambda a, b: (a + b, threading.get_ident() != caller), 2, b=3) == (5, True)
    with pytest.raises(ZeroDivisionError):
        in_passing_thread(lambda: 1 / 0)


async def test_the_async_form_awaits_the_result_and_the_exception(two_torch_threads):
    start = os_threads()
    assert await to_passing_thread(parallel_work) == 2 * (1 << 22)
    assert await to_passing_thread(dict, a=1) == {"a": 1}
    with pytest.raises(KeyError):
        await to_passing_thread({}.__getitem__, "missing")
    assert settled(start) == start
