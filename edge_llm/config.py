"""Cluster TOML files for real multi-device clusters (see configs/cluster.example.toml)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from edge.master import MasterSettings
from edge_llm.cluster import HttpSettings, link_from_args
from models.drafting import SpeculationSettings
from models.dtypes import DTYPE_CHOICES
from models.quant import QUANT_CHOICES
from scheduler.cloud import CloudSettings
from scheduler.router import Policy


class ConfigError(ValueError):
    """A cluster file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ClusterConfig:
    model: str
    master_host: str
    worker_port: int
    http: HttpSettings
    weights: list[float]
    secret_file: str | None
    step_timeout: float
    latency_ms: float = 0.0
    bandwidth_mbps: float = 0.0
    attention_nodes: int = 0
    dtype: str = "auto"
    quantize: str = "auto"

    def master_settings(self, secret: bytes) -> MasterSettings:
        return MasterSettings(model=self.model, world_size=len(self.weights), weights=self.weights,
                              host=self.master_host, port=self.worker_port, secret=secret,
                              step_timeout=self.step_timeout,
                              link=link_from_args(self.latency_ms, self.bandwidth_mbps),
                              attention_nodes=self.attention_nodes, dtype=self.dtype, quantize=self.quantize)


def _policy(raw: dict) -> Policy:
    """The `[policy]` table: routing thresholds (see scheduler.router.Policy)."""
    unknown = set(raw) - {f.name for f in fields(Policy)}
    if unknown:
        raise ConfigError(f"unknown [policy] key(s) {sorted(unknown)}; known: {[f.name for f in fields(Policy)]}")
    def tokens(key: str) -> int | None:
        return None if raw.get(key) is None else int(raw[key])

    policy = Policy(edge_kv_fraction=float(raw.get("edge_kv_fraction", 0.5)),
                    offload_kv_fraction=float(raw.get("offload_kv_fraction", 0.8)),
                    offload_above_tokens=tokens("offload_above_tokens"),
                    cloud_above_tokens=tokens("cloud_above_tokens"))
    if not 0 < policy.edge_kv_fraction <= 1 or not 0 < policy.offload_kv_fraction <= 1:
        raise ConfigError("[policy] edge_kv_fraction and offload_kv_fraction must be in (0, 1]")
    return policy


def _cloud(raw: dict | None) -> CloudSettings | None:
    """The `[cloud]` table: url, model, api_key_env (the key itself never sits in the file)."""
    if raw is None:
        return None
    return CloudSettings(url=str(raw["url"]), model=raw.get("model"),
                         api_key=os.environ.get(str(raw.get("api_key_env", "EDGE_LLM_CLOUD_API_KEY"))))


def _speculation(raw: dict) -> SpeculationSettings:
    """The `[speculate]` table: method, num_draft_tokens, policy (adaptive | fixed), draft_model."""
    known = {"method", "num_draft_tokens", "policy", "draft_model"}
    if set(raw) - known:
        raise ConfigError(f"unknown [speculate] key(s) {sorted(set(raw) - known)}; known: {sorted(known)}")
    if raw.get("policy", "adaptive") not in ("adaptive", "fixed"):
        raise ConfigError(f"[speculate] policy = {raw['policy']!r} is not adaptive or fixed")
    settings = SpeculationSettings(str(raw.get("method", "draft" if raw.get("draft_model") else "off")),
                                   int(raw.get("num_draft_tokens", 4)), raw.get("policy", "adaptive") == "adaptive",
                                   raw.get("draft_model"))
    try:
        settings.check()
    except ValueError as e:
        raise ConfigError(f"[speculate] {e}") from e
    return settings


def _dtype(value: object) -> str:
    if value not in DTYPE_CHOICES:
        raise ConfigError(f"dtype = {value!r} is not one of {list(DTYPE_CHOICES)}")
    return str(value)


def _quantize(value: object) -> str:
    if value not in QUANT_CHOICES:
        raise ConfigError(f"quantize = {value!r} is not one of {list(QUANT_CHOICES)}")
    return str(value)


def load_cluster_config(path: str | Path) -> ClusterConfig:
    """Parse a cluster file; raises ConfigError (reported by the CLI) on missing keys."""
    try:
        raw = tomllib.loads(Path(path).read_text())
        nodes = raw["nodes"]
        master = nodes[0]
        link = raw.get("link", {})
        return ClusterConfig(
            model=raw["model"], master_host=master["address"], worker_port=int(raw.get("worker_port", 29500)),
            http=HttpSettings(host=raw.get("http_host", "0.0.0.0"), port=int(raw.get("http_port", 8000)),
                              served_name=raw.get("served_name"), cloud=_cloud(raw.get("cloud")),
                              policy=_policy(raw.get("policy", {})), speculation=_speculation(raw.get("speculate", {}))),
            attention_nodes=int(raw.get("attention", {}).get("nodes", 0)),
            weights=[float(n.get("weight", 1.0)) for n in nodes], secret_file=raw.get("secret_file"),
            step_timeout=float(raw.get("step_timeout", 5.0)), dtype=_dtype(raw.get("dtype", "auto")),
            quantize=_quantize(raw.get("quantize", "auto")),
            latency_ms=float(link.get("latency_ms", 0.0)), bandwidth_mbps=float(link.get("bandwidth_mbps", 0.0)))
    except (OSError, KeyError, IndexError, TypeError, ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: invalid cluster file ({type(e).__name__}: {e})") from e
