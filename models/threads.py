"""Thread counts for the decode path: torch's own ops on one thread, the GEMV kernels on all.

Why: a decode step is dozens of tiny torch ops per layer (norms, RoPE, attention over one query)
between the weight GEMVs. Run with several OpenMP threads from a thread other than the main one
(every engine computes on its own compute thread), each such op pays for waking its thread team:
on the 2-core AMD host a [3, 3, 64] x [64, 100] matmul took 52 us instead of 16 and a softmax 25 us
instead of 3, and SmolLM2-135M decoded at 33-37 ms per token on a compute thread against 27-29 on
the main thread. With torch on one thread for the step the compute thread decodes as fast as the
main thread, and the GEMV kernels (models.quant_kernels), which do the memory-bound work, still
run on every thread the process was given (`kernel_threads`).

Steps of more tokens (a prefill) keep torch's threads: their GEMMs need them; so do half-precision
steps, whose GEMVs torch computes (bf16 on one device: 76 ms per token with two threads, 105 with
one, `large` preset).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

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
def step_threads(tokens: int, dtype: torch.dtype) -> Iterator[None]:
    """Run a step of `tokens` tokens (rows x positions) with activations in `dtype`: torch on one
    thread when the step is small and float32 (its GEMVs are the kernels', on `kernel_threads`).

    The count is restored when the step ends. torch's setting is partly per OS thread (OpenMP)
    and partly global (MKL), so a prefill running concurrently in the same process (in-process
    tests run several ranks in one) may run on fewer threads meanwhile: slower, never wrong.
    """
    if tokens > SMALL_STEP_TOKENS or dtype != torch.float32:
        yield
        return
    threads = _process_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
