"""Moving averages of what each tier delivers (time to first token, time per output token),
fed by every request that runs there; the router's latency inputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Ewma:
    """Exponentially weighted moving average; None until the first sample."""

    alpha: float = 0.2
    value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else (1 - self.alpha) * self.value + self.alpha * sample


@dataclass
class TierLatency:
    ttft: Ewma = field(default_factory=Ewma)
    tpot: Ewma = field(default_factory=Ewma)


class Measured:
    """Per route ('edge', 'offload', 'cloud'): measured TTFT and TPOT in seconds."""

    def __init__(self) -> None:
        self.routes: dict[str, TierLatency] = {}

    def tier(self, route: str) -> TierLatency:
        return self.routes.setdefault(route, TierLatency())

    def ttft(self, route: str) -> float | None:
        return self.tier(route).ttft.value

    def tpot(self, route: str) -> float | None:
        return self.tier(route).tpot.value
