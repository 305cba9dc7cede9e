"""Weight-window benchmark: decode speed and disk overlap under memory budgets.

For each worker count and budget (a fraction of one rank's layer shard, plus its head and KV
reserve), starts `edge-llm cluster --memory-budget-mb`, decodes, and reads the window counters
from /metrics: tokens/s, bytes re-read per token, the disk-bound limit (those bytes / measured
sequential read bandwidth) and overlap efficiency = 1 - compute wait on disk / disk busy time.
Writes bench/window.json and bench/window.md.

    .venv/bin/python scripts/bench_window.py [--preset large] [--workers 2,4] [--fractions 1,0.5,0.25]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import Cluster, benchmark_model, model_parser

from edge.split import MANIFEST, head_file, layer_file, split_model

MB = 1 << 20
KV_RESERVE_MB = 64  # >= the 2048-token reserve of the presets used here


def drop_page_cache() -> bool:
    """Start each run cold where the machine allows it (root, writable /proc)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_bandwidth(path: Path) -> float:
    """Sequential read bandwidth (bytes/s) of one cold shard file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start, total = time.perf_counter(), 0
        while chunk := os.read(fd, 1 << 24):
            total += len(chunk)
        return total / (time.perf_counter() - start)
    finally:
        os.close(fd)


def window_counters(cluster: Cluster) -> dict[str, dict[str, float]]:
    text = subprocess.run(["curl", "-s", f"{cluster.url}/metrics"], capture_output=True, text=True).stdout
    out: dict[str, dict[str, float]] = {}
    for name, rank, value in re.findall(r'edge_window_(\w+)_total\{rank="(\d+)"\} (\S+)', text):
        out.setdefault(rank, {})[name] = float(value)
    return out


def run_one(model: str, split: Path, workers: int, budget_mb: float, tokens: int, cache: bool) -> dict:
    extra = ["--memory-budget-mb", f"{budget_mb:.1f}", "--split-dir", str(split)]
    cluster = Cluster(model, workers, extra + (["--keep-page-cache"] if cache else []))
    try:
        cluster.request(2)
        before = window_counters(cluster)
        start = time.perf_counter()
        times = cluster.request(tokens)
        elapsed = time.perf_counter() - start
        after = window_counters(cluster)
    finally:
        cluster.stop()
    ranks = {}
    for rank, stats in after.items():
        delta = {k: v - before.get(rank, {}).get(k, 0.0) for k, v in stats.items()}
        forwards = max(delta.get("forwards", 0.0), 1.0)
        busy = delta.get("disk_busy_s", 0.0)
        ranks[rank] = {"bytes_per_token": delta.get("bytes_read", 0.0) / forwards,
                       "read_GBps": delta.get("bytes_read", 0.0) / busy / 1e9 if busy else None,
                       "disk_busy_s": busy, "compute_wait_s": delta.get("compute_wait_s", 0.0),
                       "overlap_efficiency": 1 - delta.get("compute_wait_s", 0.0) / busy if busy else None}
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"tokens_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
            "tpot_ms": 1000 * sorted(gaps)[len(gaps) // 2], "elapsed_s": elapsed, "ranks": ranks}


def main() -> None:
    parser = model_parser(__doc__, "2,4")
    parser.add_argument("--fractions", default="1,0.5,0.25")
    parser.add_argument("--tokens", type=int, default=9)
    args = parser.parse_args()
    model = benchmark_model(args)
    layers = json.loads(Path(model, "config.json").read_text())["num_hidden_layers"]
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        split = split_model(model, workers, out=Path(f"{model}.split-{workers}"), quiet=True)
        files = json.loads((split / MANIFEST).read_text())["files"]
        shard = max(sum(files[layer_file(workers, r, i)]["bytes"] for i in range(layers)) for r in range(workers))
        head = max(files[head_file(workers, r)]["bytes"] for r in range(workers))
        bandwidth = read_bandwidth(split / layer_file(workers, 1, layers - 1))
        for fraction in (float(f) for f in args.fractions.split(",")):
            for cache in (False, True):
                if fraction >= 1 and cache:
                    continue
                budget_mb = (fraction * shard + head) / MB + KV_RESERVE_MB
                cold = drop_page_cache()
                result = run_one(model, split, workers, budget_mb, args.tokens, cache)
                worst = max(result["ranks"].values(), key=lambda r: r["bytes_per_token"])
                # The disk-bound limit uses the read rate the ranks achieved in this run (two
                # ranks share the disk); a single cold read of one file overstates it.
                rate = min((r["read_GBps"] for r in result["ranks"].values() if r["read_GBps"]),
                           default=bandwidth / 1e9)
                result |= {"workers": workers, "fraction": fraction, "budget_mb": budget_mb,
                           "page_cache": cache, "shard_mb": shard / MB, "single_read_GBps": bandwidth / 1e9,
                           "cold_start": cold, "disk_bound_ms": worst["bytes_per_token"] / rate / 1e6}
                rows.append(result)
                print(json.dumps(result), flush=True)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "window.json").write_text(json.dumps(rows, indent=2))
    lines = [f"Model: {model}. Budget = fraction x one rank's layer shard + its head + {KV_RESERVE_MB} MB "
             "KV reserve. 'disk' rows drop each streamed layer from the page cache after reading it (a "
             "memory-starved device); 'page cache' rows leave it there (a fast disk). Disk-bound limit = "
             "re-read bytes per token / the read rate the ranks achieved (they share one disk).", "",
             "| workers | budget (of shard) | reads from | shard MB | re-read MB/token (max rank) | "
             "disk-bound ms/token | time per token ms | tokens/s | achieved read GB/s | overlap efficiency "
             "(min rank) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        worst = max(r["ranks"].values(), key=lambda x: x["bytes_per_token"])
        overlaps = [x["overlap_efficiency"] for x in r["ranks"].values() if x["overlap_efficiency"] is not None]
        source = "page cache" if r["page_cache"] else "disk"
        speed = worst.get("read_GBps")
        lines.append(f"| {r['workers']} | {r['fraction']:.0%} ({r['budget_mb']:.0f} MB) | {source} | "
                     f"{r['shard_mb']:.0f} | {worst['bytes_per_token'] / MB:.0f} | {r['disk_bound_ms']:.0f} | "
                     f"{r['tpot_ms']:.0f} | {r['tokens_per_s']:.2f} | {speed or 0:.2f} | "
                     f"{min(overlaps) if overlaps else float('nan'):.2f} |")
    (out / "window.md").write_text("\n".join(lines) + "\n")
    print((out / "window.md").read_text())


if __name__ == "__main__":
    main()
