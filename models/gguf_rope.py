"""Llama 3 rope scaling recovered from llama.cpp's `rope_freqs` tensor.

llama.cpp's converter does not write Llama 3's `rope_scaling` as metadata: it stores one divisor
per rotary frequency (`rope_freqs`, head_dim/2 floats), computed from factor, low/high frequency
factors and the original context. Loaders that ignore the tensor (transformers' GGUF loader does)
drift from the source model. We find Llama 3 parameters that reproduce every stored divisor and
write them as `rope_scaling`, so the imported folder is an ordinary Hugging Face checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from models.errors import CheckpointError

_RTOL = 1e-4  # the divisors are stored as float32; parameters that reproduce them this well are the same rope


def llama3_divisors(theta: float, head_dim: int, factor: float, low: float, high: float, original: float) -> np.ndarray:
    """The per-frequency divisors llama.cpp derives from Llama 3 parameters (its converter's formula)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, medium))


def _fit_original(wavelen: np.ndarray, divisors: np.ndarray, factor: float, low: float, high: float) -> float:
    """The original context that puts the observed divisors where they are, for given low/high factors."""
    medium = (divisors > 1 + _RTOL) & (divisors < factor * (1 - _RTOL))
    if medium.any():  # 1/d = (1 - s)/factor + s  ->  s; and s = (original / wavelen - low) / (high - low)
        smooth = (1 / divisors[medium] - 1 / factor) / (1 - 1 / factor)
        return float(np.median(wavelen[medium] * (smooth * (high - low) + low)))
    unscaled, scaled = wavelen[divisors <= 1 + _RTOL], wavelen[divisors >= factor * (1 - _RTOL)]
    lowest = unscaled.max() * high if unscaled.size else 1.0  # original / high must exceed these wavelengths
    highest = scaled.min() * low if scaled.size else lowest * 4  # and original / low stay below these
    return math.sqrt(lowest * highest)


def _fit_ratio(wavelen: np.ndarray, divisors: np.ndarray, factor: float) -> list[tuple[float, float]]:
    """(low, high) from two or more smoothly scaled frequencies: only low / (high - low) is determined
    (scaling low, high and the original context together changes nothing), so low is taken as 1."""
    medium = (divisors > 1 + _RTOL) & (divisors < factor * (1 - _RTOL))
    if medium.sum() < 2:
        return []
    smooth = (1 / divisors[medium] - 1 / factor) / (1 - 1 / factor)  # = A / wavelen - B
    slope, intercept = np.polyfit(1 / wavelen[medium], smooth, 1)
    if not intercept < 0 or not slope > 0:
        return []
    high = float(1.0 - 1.0 / intercept)
    return [(1.0, round(high, 4)), (1.0, high)]  # the round value when it reproduces the divisors


def rope_from_freqs(divisors: np.ndarray, theta: float, head_dim: int, source: str) -> dict[str, Any] | None:
    """A transformers `rope_scaling` (llama3) reproducing `divisors`; None when they are all 1.

    Raises CheckpointError when no Llama 3 parameters reproduce them (another scheme we do not know).
    """
    divisors = np.asarray(divisors, dtype=np.float64).reshape(-1)
    if divisors.size != head_dim // 2:
        raise CheckpointError(f"{source}: rope_freqs has {divisors.size} values, head_dim {head_dim} needs "
                              f"{head_dim // 2}")
    if np.allclose(divisors, 1.0, rtol=0, atol=_RTOL):
        return None
    factor = float(divisors.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    for low, high in [*_fit_ratio(wavelen, divisors, factor), (1.0, 4.0), (1.0, 2.0)]:  # Llama 3.x: 1, 4
        original = _fit_original(wavelen, divisors, factor, low, high)
        for candidate in (float(round(original)), original):
            if np.allclose(llama3_divisors(theta, head_dim, factor, low, high, candidate), divisors, rtol=_RTOL):
                value = int(candidate) if candidate.is_integer() else candidate
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": value}
    raise CheckpointError(f"{source}: rope_freqs does not follow Llama 3 rope scaling; this import "
                          "cannot reproduce it")
