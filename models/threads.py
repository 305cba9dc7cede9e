"""Thread counts for the decode path: torch's own ops on one thread, the GEMV kernels on all.

Why: a decode step is dozens of tiny torch ops per layer (norms, RoPE, attention over one query)
between the weight GEMVs. Run with several OpenMP threads from a thread other than the main one
(every engine computes on its own compute thread), each such op pays for waking its thread team:
on the 2-core AMD host a [3, 3, 64] x [64, 100] matmul took 52 us instead of 16 and a softmax 25 us
instead of 3, and SmolLM2-135M decoded at 33-37 ms per token on a compute thread against 27-29 on
the main thread. With torch on one thread for the step the compute thread decodes as fast as the
main thread, and the GEMV kernels (models.quant_kernels), which do the memory-bound work, still
run on every thread the process was given (`kernel_threads`).

Steps of more tokens (a prefill) keep torch's threads: their GEMMs need them. Small steps of bf16 /
fp16 models once kept them too, while torch computed their GEMVs (bf16 on one device: 76 ms per token
with two threads, 105 with one, `large` preset); the kernels compute those now, as they do float32's.

Part of what that measured was a second OpenMP team: one left behind by loading on another thread
that stayed alive. Parallel work now belongs on the compute thread alone, and loads, splits and
warm-ups run on passing threads (`in_passing_thread` says why and what it saved).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")

SMALL_STEP_TOKENS = 8  # tokens per step (rows x positions) up to which torch runs on one thread

_lock = threading.Lock()
_threads: int | None = None  # the process's count: set_threads', else torch's before the first step


def set_threads(threads: int) -> None:
    """The process's thread count: torch's, and the GEMV kernels' during small steps."""
    global _threads
    with _lock:
        _threads = threads
    torch.set_num_threads(threads)


def kernel_threads() -> int:
    """Threads the GEMV kernels may use (torch itself may be on one thread during a step)."""
    return _threads if _threads is not None else torch.get_num_threads()


def _process_threads() -> int:
    global _threads
    with _lock:
        if _threads is None:  # read once, before any step set torch to one thread
            _threads = torch.get_num_threads()
        return _threads


@contextmanager
def step_threads(tokens: int) -> Iterator[None]:
    """Run a step of `tokens` tokens (rows x positions): torch on one thread when the step is small
    (its GEMVs are the kernels', on `kernel_threads`).

    The count is restored when the step ends. torch's setting is partly per OS thread (OpenMP)
    and partly global (MKL), so a prefill running concurrently in the same process (in-process
    tests run several ranks in one) may run on fewer threads meanwhile: slower, never wrong.
    """
    if tokens > SMALL_STEP_TOKENS:
        yield
        return
    threads = _process_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def in_passing_thread(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """fn(*args, **kwargs) on a thread of its own that ends when fn does; its result, or its exception.

    Why: OpenMP (libgomp, under torch's parallel ops and the numba kernels) keeps a thread team
    for every thread that ever started parallel work, for as long as that thread lives, and once
    its threads outnumber the cores it stops spinning between parallel regions, so that every
    kernel call of the compute thread then pays for waking its team. On a 2-core Intel host one
    2-thread device decoded SmolLM2-135M at 30 ms per token after loading (or warming kernels)
    on another live thread, 12-13 ms when that thread had ended. Loads, splits and warm-ups run
    here, never on the event loop's thread or asyncio.to_thread's pool, whose threads stay.
    """
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=run, name="passing")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


async def to_passing_thread(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """As asyncio.to_thread, on a thread that ends with fn (`in_passing_thread`). If the caller is
    cancelled, fn still runs to its end and its result is dropped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(setter: Callable[[object], None], value: object) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            outcome: tuple = (future.set_result, fn(*args, **kwargs))
        except BaseException as e:  # handed to the awaiting task
            outcome = (future.set_exception, e)
        try:
            loop.call_soon_threadsafe(deliver, *outcome)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    threading.Thread(target=run, name="passing", daemon=True).start()
    return await future
