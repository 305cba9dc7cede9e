"""Prometheus metrics of one server: requests, latency histograms, tokens, cluster transport."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from models.engine import ClusterCounters
from models.speculative import SpeculationStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class _ClusterCollector(Collector):
    """Reads live counters of the engine at scrape time (bytes per link, resident weights)."""

    def __init__(self, counters: Callable[[], ClusterCounters | None]):
        self._counters = counters

    def collect(self) -> Iterable:
        snap = self._counters()
        if snap is None:  # a single device: no cluster counters
            return
        sent = CounterMetricFamily("edge_transport_bytes_sent", "Bytes rank 0 sent to each rank",
                                   labels=["rank"])
        received = CounterMetricFamily("edge_transport_bytes_received", "Bytes rank 0 received from each rank",
                                       labels=["rank"])
        weights = GaugeMetricFamily("edge_worker_weight_bytes", "Resident weight bytes per rank", labels=["rank"])
        for rank, link in snap.links.items():
            sent.add_metric([str(rank)], link["sent"])
            received.add_metric([str(rank)], link["received"])
        for rank, nbytes in snap.weight_bytes.items():
            weights.add_metric([str(rank)], nbytes)
        fixed = GaugeMetricFamily("edge_worker_fixed_rss_bytes",
                                  "A worker's RSS before loading weights (runtime overhead)", labels=["rank"])
        for rank, nbytes in snap.fixed_rss.items():
            fixed.add_metric([str(rank)], nbytes)
        fetched = GaugeMetricFamily("edge_worker_fetched_bytes",
                                    "Shard bytes a worker fetched from the master when it last joined or re-planned",
                                    labels=["rank"])
        for rank, nbytes in snap.fetched.items():
            fetched.add_metric([str(rank)], nbytes)
        yield from (sent, received, weights, fixed, fetched, *self._window(snap.window))
        yield from self._timing(snap.timing)
        yield from self._offload(snap)

    @staticmethod
    def _offload(snap: ClusterCounters) -> Iterable:
        """Step batching and attention-offload counters: KV rebuilds, per node its KV bytes and link bytes."""
        yield _single(CounterMetricFamily, "edge_cluster_steps", "Cluster-wide forward steps", snap.steps)
        yield _single(CounterMetricFamily, "edge_cluster_step_rows", "Request-steps those forwards carried "
                      "(concurrent decode and verification steps run as one batched forward)", snap.step_rows)
        yield from _plan(snap)
        rebuilds = CounterMetricFamily("edge_offload_kv_rebuilds",
                                       "Offloaded requests whose KV was rebuilt after losing an attention node")
        rebuilds.add_metric([], snap.kv_rebuilds)
        yield rebuilds
        attention = snap.attention
        if not attention:
            return
        kv = GaugeMetricFamily("edge_attention_node_kv_bytes", "KV-cache bytes held by each attention node",
                               labels=["node"])
        rss = GaugeMetricFamily("edge_attention_node_rss_bytes", "Resident memory of each attention node",
                                labels=["node"])
        link = CounterMetricFamily("edge_attention_node_bytes", "Bytes each attention node sent to and "
                                   "received from each compute rank", labels=["node", "rank", "direction"])
        for node, stats in attention["stats"].items():
            kv.add_metric([str(node)], stats.get("kv_bytes", 0))
            rss.add_metric([str(node)], stats.get("rss", 0))
            for rank, counts in (stats.get("links") or {}).items():
                for direction in ("sent", "received"):
                    link.add_metric([str(node), str(rank), direction], counts.get(direction, 0))
        ready = GaugeMetricFamily("edge_attention_nodes_ready", "1 while every attention node is linked")
        ready.add_metric([], 1.0 if attention["ready"] else 0.0)
        wait = CounterMetricFamily("edge_offload_attention_wait_seconds",
                                   "Seconds rank 0's compute thread waited on attention round trips")
        wait.add_metric([], attention["rank0_wait_s"])
        trips = CounterMetricFamily("edge_offload_round_trips", "Attention round trips of rank 0 (one per layer)")
        trips.add_metric([], attention["rank0_round_trips"])
        yield from (kv, rss, link, ready, wait, trips)

    @staticmethod
    def _window(per_rank: dict) -> Iterable:
        """Weight-window counters per rank: disk bytes and seconds, compute wait, forwards."""
        yield from _per_rank_counters(per_rank, {
            "bytes_read": ("edge_window_bytes_read", "Bytes read from disk by the weight window"),
            "disk_busy_s": ("edge_window_disk_busy_s", "Seconds the weight reader spent reading"),
            "compute_wait_s": ("edge_window_compute_wait_s", "Seconds compute waited for the disk"),
            "forwards": ("edge_window_forwards", "Forward passes through the streamed layers")})

    @staticmethod
    def _timing(per_rank: dict) -> Iterable:
        """Where each rank's step time goes: forwards on its compute thread and their all-reduces."""
        yield from _per_rank_counters(per_rank, {
            "forward_s": ("edge_rank_forward_seconds", "Seconds of forward passes on the compute thread"),
            "allreduce_s": ("edge_rank_allreduce_seconds", "Seconds of those spent in all-reduces (send + wait)"),
            "forwards": ("edge_rank_forwards", "Forward passes"),
            "allreduces": ("edge_rank_allreduces", "All-reduces")})


def _plan(snap: ClusterCounters) -> Iterable:
    """The plan served (per device: heads, MLP columns), re-plans, their time, requests replayed."""
    heads = GaugeMetricFamily("edge_plan_heads", "Query heads each device serves", labels=["rank"])
    columns = GaugeMetricFamily("edge_plan_mlp_columns", "MLP columns each device serves", labels=["rank"])
    for entry in snap.plan:
        heads.add_metric([str(entry["rank"])], entry["heads"])
        columns.add_metric([str(entry["rank"])], entry["mlp_columns"])
    yield from (heads, columns)
    yield _single(CounterMetricFamily, "edge_cluster_replans", "Plans adopted after a device was lost or came back",
                  snap.replans)
    yield _single(CounterMetricFamily, "edge_cluster_replan_seconds", "Seconds those re-plans took",
                  snap.replan_seconds)
    yield _single(GaugeMetricFamily, "edge_cluster_last_replan_seconds", "Seconds the last re-plan took",
                  snap.last_replan_seconds)
    yield _single(GaugeMetricFamily, "edge_cluster_last_replan_started", "Unix time the last re-plan began",
                  snap.last_replan_started_at)
    yield _single(GaugeMetricFamily, "edge_cluster_last_replan_load_seconds",
                  "Of the last re-plan: loading the new slices", snap.last_replan_load_seconds)
    yield _single(CounterMetricFamily, "edge_cluster_replayed_requests",
                  "Requests rebuilt from their tokens on a new plan", snap.replayed)


def _per_rank_counters(per_rank: dict, families: dict[str, tuple[str, str]]) -> Iterable:
    """One counter family per key (metric name, help), a sample per rank that reported the key."""
    for key, (name, doc) in families.items():
        family = CounterMetricFamily(name, doc, labels=["rank"])
        for rank, stats in per_rank.items():
            if key in stats:
                family.add_metric([str(rank)], stats[key])
        yield family


class _SpeculationCollector(Collector):
    """Speculative decoding over every request: drafted and accepted tokens, tokens per step."""

    def __init__(self, stats: SpeculationStats):
        self._stats = stats

    def collect(self) -> Iterable:
        s = self._stats
        yield _single(CounterMetricFamily, "edge_spec_drafted_tokens", "Drafted tokens verified by the model",
                      s.drafted)
        yield _single(CounterMetricFamily, "edge_spec_accepted_tokens", "Drafted tokens the model accepted", s.accepted)
        yield _single(CounterMetricFamily, "edge_spec_steps", "Decode steps of speculating requests (plain or "
                      "verifying)", s.steps)
        yield _single(CounterMetricFamily, "edge_spec_step_tokens", "Tokens those steps emitted", s.tokens)
        yield _single(GaugeMetricFamily, "edge_spec_acceptance_rate", "Accepted / drafted tokens (0 before any draft)",
                      s.acceptance_rate)
        yield _single(GaugeMetricFamily, "edge_spec_tokens_per_step", "Tokens emitted per decode step of "
                      "speculating requests (1.0 without speculation's gains)", s.tokens_per_step)


def _single(kind: type, name: str, doc: str, value: float):
    """A metric family of one unlabelled sample."""
    family = kind(name, doc)
    family.add_metric([], value)
    return family


class Metrics:
    """One registry per app, so several servers in one process (tests) never share counters."""

    def __init__(self, cluster_counters: Callable[[], ClusterCounters | None] | None = None,
                 speculation: SpeculationStats | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edge_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.tokens = Counter("edge_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("edge_prompt_tokens", "Prompt tokens processed", registry=r)
        self.ttft = Histogram("edge_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("edge_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("edge_requests_running", "Generations running now", registry=r)
        self.queue = Gauge("edge_queue_depth", "Requests waiting for a generation slot", registry=r)
        self.routes = Counter("edge_routes", "Requests by the route they took", ["route"], registry=r)
        self.cancelled = Counter("edge_requests_cancelled", "Generations stopped because the client left",
                                 registry=r)
        if cluster_counters is not None:
            r.register(_ClusterCollector(cluster_counters))
        if speculation is not None:
            r.register(_SpeculationCollector(speculation))

    def render(self) -> bytes:
        return generate_latest(self.registry)
