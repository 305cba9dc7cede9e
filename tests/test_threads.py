"""Parallel work off the compute thread runs on passing threads, which leave no OpenMP team behind."""

import json
import subprocess
import sys
import threading

import pytest

from models.threads import in_passing_thread, to_passing_thread

# Run in a fresh process, so that no other test's threads come or go while the threads are counted.
COUNT_THREADS = r"""
import asyncio, json, os, time
from concurrent.futures import ThreadPoolExecutor
import torch
from models.threads import in_passing_thread, to_passing_thread

torch.set_num_threads(2)


def threads():
    return len(os.listdir("/proc/self/task"))


def settled(target):
    deadline = time.monotonic() + 2.0  # an exiting thread takes a moment to go
    while threads() > target and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads()


def parallel_work():  # enough elementwise work that torch splits it over its OpenMP team
    return float((torch.ones(1 << 22) * 2).sum())


start = threads()
out = {"start": start, "sum": in_passing_thread(parallel_work)}
out["after_passing"] = settled(start)
out["async_sum"] = asyncio.run(to_passing_thread(parallel_work))
out["after_async"] = settled(start)
pool = ThreadPoolExecutor(1)  # the contrast: a thread that stays keeps its team
pool.submit(parallel_work).result()
out["after_pool"] = settled(start + 1)
print(json.dumps(out))
"""


def test_a_passing_thread_leaves_no_thread_team_where_a_pool_thread_does():
    run = subprocess.run([sys.executable, "-c", COUNT_THREADS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    counts = json.loads(run.stdout)
    assert counts["sum"] == counts["async_sum"] == 2 * (1 << 22)
    assert counts["after_passing"] == counts["after_async"] == counts["start"]
    assert counts["after_pool"] > counts["start"] + 1  # the pool's thread and at least one team thread


def test_results_and_exceptions_come_back():
    caller = threading.get_ident()
    assert in_passing_thread(lambda a, b: (a + b, threading.get_ident() != caller), 2, b=3) == (5, True)
    with pytest.raises(ZeroDivisionError):
        in_passing_thread(lambda: 1 / 0)


async def test_the_async_form_awaits_the_result_and_the_exception():
    assert await to_passing_thread(dict, a=1) == {"a": 1}
    with pytest.raises(KeyError):
        await to_passing_thread({}.__getitem__, "missing")
