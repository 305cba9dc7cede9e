"""Concurrency benchmark: aggregate decode throughput and time per output token with 1, 2, 4 and
8 concurrent streams on one emulated cluster (their decode steps run as batched forwards).
Writes bench/batch.json and bench/batch.md.

    .venv/bin/python scripts/bench_batch.py [--model DIR | --preset large] [--workers 2] [--streams 1,2,4,8]
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import Cluster, benchmark_model, model_parser


def steps_and_rows(url: str) -> tuple[float, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    steps = re.search(r"^edge_cluster_steps_total (\S+)", text, re.MULTILINE)
    rows = re.search(r"^edge_cluster_step_rows_total (\S+)", text, re.MULTILINE)
    return float(steps[1]), float(rows[1])


def run_streams(cluster: Cluster, streams: int, tokens: int) -> dict:
    """`streams` concurrent requests of `tokens` tokens each (distinct prompts, greedy)."""
    def one(i: int) -> list[float]:
        return cluster.request(tokens, prompt=list(range(1 + i, 17 + i)))

    steps0, rows0 = steps_and_rows(cluster.url)
    began = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(one, range(streams)))
    wall = time.perf_counter() - began
    steps1, rows1 = steps_and_rows(cluster.url)
    tpots = [statistics.median(b - a for a, b in itertools.pairwise(t)) for t in results]
    return {"streams": streams, "tokens_per_s": streams * tokens / wall, "tpot_ms": 1000 * statistics.median(tpots),
            "mean_batch": (rows1 - rows0) / max(steps1 - steps0, 1)}


def main() -> None:
    parser = model_parser(__doc__, "2")
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--new-tokens", type=int, default=33)
    args = parser.parse_args()
    model = benchmark_model(args)
    cluster = Cluster(model, int(args.workers), ["--max-running", "16"])
    try:
        run_streams(cluster, 1, 4)  # warm-up
        rows = [run_streams(cluster, int(n), args.new_tokens) for n in args.streams.split(",")]
    finally:
        cluster.stop()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    result = {"model": model, "workers": int(args.workers), "new_tokens": args.new_tokens, "runs": rows}
    (out / "batch.json").write_text(json.dumps(result, indent=2))
    lines = [f"Model: {model}, {args.workers} emulated devices, {args.new_tokens} new tokens per stream, "
             "prompts of 16 tokens (prefills run alone, decode steps of concurrent streams batch).", "",
             "| concurrent streams | aggregate tokens/s | time per output token ms (median stream) | "
             "mean decode batch |", "|---|---|---|---|"]
    lines += [f"| {r['streams']} | {r['tokens_per_s']:.1f} | {r['tpot_ms']:.1f} | {r['mean_batch']:.2f} |" for r in rows]
    (out / "batch.md").write_text("\n".join(lines) + "\n")
    print((out / "batch.md").read_text())


if __name__ == "__main__":
    main()
