"""Tier benchmark: time per output token for the edge, offload and cloud routes under emulated
links, and bytes per decode token on every link with and without attention offload (measured
against the formulas). Writes bench/tiers.json and bench/tiers.md.

    .venv/bin/python scripts/bench_tiers.py [--model DIR | --preset medium] [--workers 2] [--nodes 2]

One edge cluster (N workers + K attention nodes; edge links 1 ms / 1 Gbit/s, then plain loopback)
serves the edge and offload routes (forced with x-edge-route); its cloud tier is another edge-llm server behind a
TCP proxy that adds 30 ms each way and caps the link at 100 Mbit/s. Routes alternate per round.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import PROMPT, Cluster, benchmark_model, model_parser

ROUTES = ("edge", "offload", "cloud")


class DelayProxy:
    """A TCP proxy adding `latency_ms` one way and a `mbps` cap per direction (the cloud link)."""

    def __init__(self, target_port: int, latency_ms: float, mbps: float):
        self.target_port, self.delay, self.rate = target_port, latency_ms / 1000, mbps * 1e6 / 8
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pump(reader, up_w), self._pump(up_r, writer), return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Each chunk leaves when the link is free (bandwidth) and arrives `delay` later (latency)."""
        free_at = 0.0
        loop = asyncio.get_running_loop()
        try:
            while chunk := await reader.read(65536):
                now = loop.time()
                free_at = max(free_at, now) + len(chunk) / self.rate
                loop.call_at(free_at + self.delay, writer.write, chunk)
            await asyncio.sleep(max(0.0, free_at + self.delay - loop.time()))
        finally:
            writer.close()


def stream(url: str, route: str, n: int) -> list[float]:
    """Arrival times of n streamed tokens on a forced route."""
    body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "x-edge-route": route})
    start, times = time.perf_counter(), []
    with urllib.request.urlopen(req, timeout=600) as resp:
        assert resp.headers["x-edge-route"] == route, resp.headers["x-edge-route-reason"]
        for line in resp:
            if line.startswith(b"data: {"):
                times.append(time.perf_counter() - start)
    return times


def counters(url: str) -> dict[str, float]:
    """Link byte counters (master<->rank, node<->rank) and rank 0's attention wait, from /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    out = {f"master-r{r} {k}": float(v) for k, r, v in
           re.findall(r'edge_transport_bytes_(sent|received)_total\{rank="(\d+)"\} (\S+)', text)}
    for labels, v in re.findall(r"^edge_attention_node_bytes_total\{(.*)\} (\S+)", text, re.MULTILINE):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[f"node{label['node']}-r{label['rank']} {label['direction']}"] = float(v)
    for name, rank, v in re.findall(r'edge_window_(compute_wait_s|disk_busy_s|bytes_read)_total\{rank="(\d+)"\} (\S+)', text):
        out[f"window-r{rank} {name}"] = float(v)
    for name in ("edge_offload_attention_wait_seconds_total", "edge_offload_round_trips_total"):
        m = re.search(rf"^{name} (\S+)", text, re.MULTILINE)
        out[name] = float(m[1]) if m else 0.0
    return out


def per_decode_token(url: str, route: str, n: int) -> dict[str, float]:
    """(counters of an n-token run - a 1-token run) / (n - 1): decode only, prefill cancels out."""
    def delta(tokens: int) -> dict[str, float]:
        before = counters(url)
        stream(url, route, tokens)
        time.sleep(1.2)  # attention nodes report their counters every 0.5 s
        after = counters(url)
        return {k: after[k] - before.get(k, 0.0) for k in after}

    one, many = delta(1), delta(n)
    return {k: (many[k] - one.get(k, 0.0)) / (n - 1) for k in many}


def formulas(config: dict, workers: int) -> dict[str, float]:
    d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    group = config["num_attention_heads"] // config["num_key_value_heads"]
    return {"allreduce_worker_sends": 2 * layers * d * 4 + vocab / workers * 4,
            "allreduce_master_sends_each": d * 4 + 2 * layers * d * 4,
            "offload_to_nodes": (1 + 2 / group) * d * 4 * layers,  # q + new k, v, all ranks and nodes
            "offload_from_nodes": d * 4 * layers,  # the attention output
            "offload_total": (2 + 2 / group) * d * 4 * layers}


def run(model: str, workers: int, nodes: int, rounds: int, n: int, edge_latency_ms: float,
        extra: list[str]) -> dict:
    cloud = Cluster(model, 1)
    proxy = DelayProxy(int(cloud.url.rsplit(":", 1)[1]), 30.0, 100.0)
    links = ["--link-latency-ms", str(edge_latency_ms), "--link-bandwidth-mbps", "1000"] if edge_latency_ms else []
    edge = Cluster(model, workers, ["--attention-nodes", str(nodes), *links, *extra,
                                    "--cloud", f"http://127.0.0.1:{proxy.port}/v1"])
    try:
        for route in ROUTES:
            stream(edge.url, route, 4)  # warm-up
        samples: dict[str, dict[str, list[float]]] = {r: {"ttft": [], "tpot": []} for r in ROUTES}
        for _ in range(rounds):
            for route in ROUTES:
                times = stream(edge.url, route, n)
                samples[route]["ttft"].append(times[0])
                samples[route]["tpot"].append(statistics.median(b - a for a, b in itertools.pairwise(times)))
        result = {r: {"ttft_ms": 1000 * statistics.median(s["ttft"]), "tpot_ms": 1000 * statistics.median(s["tpot"])}
                  for r, s in samples.items()}
        for route in ("edge", "offload"):
            result[route]["per_decode_token"] = per_decode_token(edge.url, route, 9)
        return result
    finally:
        edge.stop()
        cloud.stop()


def overlap(per: dict[str, float]) -> str:
    """Weight-window overlap efficiency over all ranks: 1 - compute wait on disk / disk busy time."""
    busy = sum(v for k, v in per.items() if k.endswith("disk_busy_s"))
    wait = sum(v for k, v in per.items() if k.endswith("compute_wait_s"))
    return f"{1 - wait / busy:.2f}" if busy else ""


def _links(per: dict[str, float], direction: str) -> float:
    """Bytes per token over all node links in one direction, as the nodes count them."""
    return sum(v for k, v in per.items() if k.startswith("node") and k.endswith(direction))


def write(results: dict, out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "tiers.json").write_text(json.dumps(results, indent=2))
    f = results["formula"]
    title = (f"Model: {results['model']}, {results['workers']} compute workers + {results['nodes']} attention "
             f"node(s); cloud link 30 ms / 100 Mbit/s (the cloud is a 1-device edge-llm on the same model); "
             f"prompt {len(PROMPT)} tokens, {results['new_tokens']} new tokens, median of {results['rounds']} "
             "rounds; all processes share this machine's cores.")
    lines = [title, "",
             ("| edge links | route | TTFT ms | time per output token ms | rank 0 wait on attention per token ms "
              "| weight-window overlap |"), "|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        o = r["offload"]["per_decode_token"]
        wait = 1000 * o.get("edge_offload_attention_wait_seconds_total", 0.0)
        for route in ROUTES:
            extra = f"{wait:.1f} ({o.get('edge_offload_round_trips_total', 0):.0f} round trips)" \
                if route == "offload" else ""
            window = overlap(r[route].get("per_decode_token", {}))
            lines.append(f"| {name} | {route} | {r[route]['ttft_ms']:.0f} | {r[route]['tpot_ms']:.1f} | {extra} "
                         f"| {window} |")
    r = next(iter(results["runs"].values()))
    e, o = r["edge"]["per_decode_token"], r["offload"]["per_decode_token"]
    lines += ["", "Bytes per decode token (measured incl. frame headers; formula = payload):", "",
              "| link | edge route | offload route | formula |", "|---|---|---|---|"]
    for w in range(1, results["workers"]):
        lines.append(f"| master -> rank {w} | {e.get(f'master-r{w} sent', 0):.0f} | "
                     f"{o.get(f'master-r{w} sent', 0):.0f} | {f['allreduce_master_sends_each']:.0f} |")
        lines.append(f"| rank {w} -> master | {e.get(f'master-r{w} received', 0):.0f} | "
                     f"{o.get(f'master-r{w} received', 0):.0f} | {f['allreduce_worker_sends']:.0f} |")
    for node in range(results["nodes"]):
        for rank in range(results["workers"]):
            key = f"node{node}-r{rank}"
            if key + " received" in o:
                lines.append(f"| rank {rank} -> / <- attention node {node} | 0 | "
                             f"{o[key + ' received']:.0f} / {o[key + ' sent']:.0f} | |")
    lines.append(f"| all ranks -> attention nodes | 0 | {_links(o, 'received'):.0f} | {f['offload_to_nodes']:.0f} |")
    lines.append(f"| attention nodes -> all ranks | 0 | {_links(o, 'sent'):.0f} | {f['offload_from_nodes']:.0f} |")
    (out / "tiers.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = model_parser(__doc__, "2")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--edge-latency-ms", default="1,0", help="emulated edge link latencies to run")
    parser.add_argument("--budget-mb", type=float, default=120.0,
                        help="also run with this per-device memory budget (weights streamed from the "
                             "page cache; about half of a rank's layers for the medium preset); 0 skips")
    parser.set_defaults(preset="medium")
    args = parser.parse_args()
    model = benchmark_model(args)
    config = json.loads(Path(model, "config.json").read_text())
    workers = int(args.workers)
    results = {"model": model, "workers": workers, "nodes": args.nodes, "rounds": args.rounds,
               "new_tokens": args.new_tokens, "formula": formulas(config, workers), "runs": {}}
    runs = [(f"{x:g} ms / 1 Gbit/s" if x else "loopback", x, []) for x in map(float, args.edge_latency_ms.split(","))]
    if args.budget_mb:  # the weight window keeps reading while compute waits on round trips
        runs.append((f"1 ms / 1 Gbit/s, {args.budget_mb:g} MB budget", 1.0,
                     ["--memory-budget-mb", str(args.budget_mb), "--keep-page-cache"]))
    for name, latency, extra in runs:
        results["runs"][name] = run(model, workers, args.nodes, args.rounds, args.new_tokens, latency, extra)
        print(name, {r: results["runs"][name][r]["tpot_ms"] for r in ROUTES}, flush=True)
    write(results, Path(args.out))
    print((Path(args.out) / "tiers.md").read_text())


if __name__ == "__main__":
    main()
