"""numba for the kernels, imported here once with its CPU target set for them, and what the target
says about the host that the kernels branch on.

Every kernel module (quant_kernels, decode_kernels, dequant_kernels) takes `numba` from here (None
on a platform without a numba wheel), so the target is set before anything compiles; numba keys its
on-disk cache by the target, so a changed target never loads code built for another.

Why 512-bit vectors on AVX-512 hosts: LLVM tunes Intel's AVX-512 cores to prefer 256-bit vectors
(older parts lowered their clock for wide ones). The int4 kernel turns every nibble into a float and
is compute-bound on one core: on a Sapphire Rapids class Xeon (2 threads, 12 matrices of
5632 x 2048, from memory) 512-bit vectors took it from 10.5-11.0 to 11.9-13.7 Gparam/s on one
thread and from 20.5 to 23.9 on two; int8 and float32, memory-bound, stayed within noise (+0-8%).
In the quantized kernels the vector width only changes how many output channels one instruction
computes, never the order of any channel's sum: the same bits (tests/test_numba_target.py). The
float32 one-row dot runs along K, so its summation order follows the width (still within the
float32 dot-product bound, and the same on every rank of a cluster of one kind of host).

A user's own NUMBA_CPU_NAME / NUMBA_CPU_FEATURES / NUMBA_ENABLE_AVX=0 is left as it is.
"""

from __future__ import annotations

import threading

try:
    import numba
    from llvmlite import binding as llvm
except ImportError:  # pragma: no cover - numba ships wheels for every platform we target
    numba = None

WIDE_VECTORS = ",-prefer-256-bit"  # the LLVM tuning feature that holds AVX-512 code at 256 bits


def _user_set_target() -> bool:
    config = numba.config
    return config.CPU_NAME is not None or config.CPU_FEATURES is not None or not config.ENABLE_AVX


def _prefer_wide_vectors() -> None:
    """On an AVX-512 host (byte and word ops included), let LLVM use 512-bit vectors."""
    if numba is None or _user_set_target():
        return
    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:  # pragma: no cover - a host LLVM cannot describe: numba's own default
        return
    if features.get("avx512f") and features.get("avx512bw"):
        numba.config.CPU_FEATURES = features.flatten() + WIDE_VECTORS


def host_cpu_name() -> str:
    """The CPU the kernels are compiled for (LLVM's name: 'znver3', 'sapphirerapids', ...)."""
    if numba is None:
        return ""
    return numba.config.CPU_NAME or llvm.get_host_cpu_name()


def host_has(*features: str) -> bool:
    """True when the kernels' target has every one of these LLVM features ('avx512vnni', ...): those
    NUMBA_CPU_FEATURES names (the user's, or the host's as set above), else the host's own; False
    for a target named by CPU only (NUMBA_CPU_NAME), whose features are not ours to guess."""
    if numba is None:
        return False
    named = numba.config.CPU_FEATURES
    if named is None:
        if numba.config.CPU_NAME is not None or not numba.config.ENABLE_AVX:
            return False
        try:
            named = llvm.get_host_cpu_features().flatten()
        except RuntimeError:  # pragma: no cover - a host LLVM cannot describe
            return False
    return all(f"+{f}" in named.split(",") for f in features)


def amd_cores() -> bool:
    """True on AMD Zen (and older AMD) cores: there one vectorized dot per output channel (one memory
    stream) was measured the faster float32 one-row GEMV (the EPYC host's cores read 31 GB/s each),
    elsewhere four streams (12-14 GB/s per core on the Intel Xeon host; models.f32_kernels)."""
    return host_cpu_name().startswith(("znver", "bdver", "btver", "amdfam"))


_prefer_wide_vectors()


_threads_set = threading.local()  # the count this OS thread last gave numba (asking numba costs 2 us)


def compiled_for(threads: int, variants: dict, compile_variant, parallel: bool = True):
    """A kernel module's variant for a call on `threads` threads: its `prange` one (compiled on first
    use into `variants`, keyed by parallel or not) when `parallel` and threads > 1, with numba's count
    for this OS thread set to `threads` (numba's count is per OS thread; capped at numba's pool),
    else its serial one."""
    parallel = parallel and threads > 1
    if parallel not in variants:
        variants[parallel] = compile_variant(parallel)
    if parallel and getattr(_threads_set, "count", None) != threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        _threads_set.count = threads
    return variants[parallel]
