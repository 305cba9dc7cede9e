"""Typed application state (aiohttp AppKeys) shared by the handlers."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from models.drafting import Speculation
from models.engine import Engine
from scheduler.admission import Admission
from scheduler.cloud import CloudSettings, CloudTier
from scheduler.measure import Measured
from scheduler.metrics import Metrics
from scheduler.router import Policy


@dataclass(frozen=True)
class ServerSettings:
    """What the front end enforces; every field has a command-line flag."""

    served_name: str
    request_timeout: float = 600.0
    body_timeout: float = 30.0  # a request body that takes longer to arrive is refused (408)
    max_running: int = 16
    max_queue: int = 64
    api_key: str | None = None
    cloud: CloudSettings | None = None
    policy: Policy = field(default_factory=Policy)
    # OpenAI's system_fingerprint: names the backend configuration (checkpoint, dtype, quantization),
    # so a client can tell when answers to the same seed may change; None leaves it out.
    system_fingerprint: str | None = None


ENGINE = web.AppKey("engine", Engine)
SETTINGS = web.AppKey("settings", ServerSettings)
METRICS = web.AppKey("metrics", Metrics)
ADMISSION = web.AppKey("admission", Admission)
CLOUD = web.AppKey("cloud", CloudTier)
MEASURED = web.AppKey("measured", Measured)
SPECULATION = web.AppKey("speculation", Speculation)  # drafts for every request (method "off": none)
ROUTE_KEY = "edge_route"  # request-scoped: the Decision taken for this request
