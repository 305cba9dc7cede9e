"""What a device measures of itself at start, for `--weights auto`, and the weights it implies."""

from __future__ import annotations

import logging
import time

import psutil
import torch

from models.threads import in_passing_thread

log = logging.getLogger("edge_llm.profile")
PROBE_BYTES = 32 << 20


def measure_device() -> dict[str, float]:
    """Free memory and matrix-vector bandwidth (what decode is bound by), in about 0.2 s, measured
    on a thread that ends with it (models.threads.in_passing_thread)."""
    return in_passing_thread(_measure)


def _measure() -> dict[str, float]:
    rows = PROBE_BYTES // 4 // 1024
    weight, x = torch.randn(rows, 1024), torch.randn(1024)
    torch.mv(weight, x)  # warm-up
    reps, start = 5, time.perf_counter()
    for _ in range(reps):
        torch.mv(weight, x)
    gbps = reps * weight.numel() * 4 / (time.perf_counter() - start) / 1e9
    return {"gemv_gbps": gbps, "free_bytes": float(psutil.virtual_memory().available)}


def weights_from_profiles(profiles: list[dict[str, float]], model_bytes: int) -> list[float]:
    """Work in proportion to measured bandwidth, capped by what each device's free memory holds.

    Rounded to tenths of the fastest device, so measurement noise does not move the plan.
    """
    speed = [max(p.get("gemv_gbps", 1.0), 1e-3) for p in profiles]
    fits = [0.8 * p.get("free_bytes", float("inf")) / max(model_bytes, 1) for p in profiles]
    fixed: dict[int, float] = {}
    for _ in profiles:  # water-filling: devices whose memory caps their share keep the cap
        free = [i for i in range(len(speed)) if i not in fixed]
        rest = 1.0 - sum(fixed.values())
        shares = {i: rest * speed[i] / sum(speed[j] for j in free) for i in free} | fixed
        over = [i for i in free if shares[i] > fits[i]]
        if not over:
            break
        fixed |= {i: fits[i] for i in over}
    top = max(shares.values())
    return [max(round(shares[i] / top, 1), 0.1) for i in range(len(speed))]


def kv_room(free: dict[int, int], kv_heads: dict[int, int]) -> int:
    """Bytes of KV one request may take when every device holds the KV of its own heads: the
    tightest device's free memory scaled up by its share of the heads (0 when none reported)."""
    devices = [d for d in free if kv_heads.get(d)]
    total = sum(kv_heads.values())
    return int(min(free[d] * total / kv_heads[d] for d in devices)) if devices else 0
