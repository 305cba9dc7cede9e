"""Losing a device mid-stream: the gap in the token stream and where it goes.

A 3-device `edge-llm cluster` streams one greedy request; after token AT, worker rank 2 is
SIGKILLed. The gap is the time from the last token before the loss to the first after it, split
into detection (kill -> re-plan starts), loading the new slices (every device at once), the rest
of the re-plan (switching, reopening the requests) and replay (re-plan done -> next token: the
request's tokens fed again as one prefill, then its step). Scenarios: local checkpoints, a memory
budget (slices streamed from split files), and rank 1 without a checkpoint (it fetches its new
slice from the master). Writes bench/replan.json and bench/replan.md.

    .venv/bin/python scripts/bench_replan.py [--presets medium,large] [--tokens 48] [--at 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPT = list(range(1, 17))  # 16 prompt tokens, inside every preset's vocabulary
SECRET = "bench-replan-secret-" + "x" * 24


class Cluster:
    """`edge-llm cluster --workers 3` with the worker pids it prints."""

    def __init__(self, model: str, extra: list[str], secret_file: Path):
        cmd = [sys.executable, "-m", "edge_llm", "cluster", "--model", model, "--workers", "3", "--port", "0",
               "--secret-file", str(secret_file), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        self.pids: dict[int, int] = {}
        self.url = self.join_port = ""
        while not self.url:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("cluster failed to start")
            if m := re.search(r"worker rank (\d+) pid (\d+)", line):
                self.pids[int(m[1])] = int(m[2])
            if m := re.search(r"on (http://\S+) .*join at port (\d+)", line):
                self.url, self.join_port = m[1], m[2]

    def stream(self, n: int, at: int | None = None, on_token=None) -> list[float]:
        """Arrival times (time.time()) of n streamed tokens; on_token() runs when token `at` arrives."""
        body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
        req = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        times: list[float] = []
        with urllib.request.urlopen(req, timeout=600) as resp:
            for line in resp:
                if line.startswith(b"data: {"):
                    if b'"error"' in line:
                        raise RuntimeError(f"the stream failed: {line.decode()}")
                    times.append(time.time())
                    if len(times) == at and on_token is not None:
                        on_token()
        return times

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def wait_plan(self, ranks: list[int], timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while [p["rank"] for p in self.health().get("plan", [])] != ranks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the plan never became {ranks}")
            time.sleep(0.1)

    def metric(self, name: str) -> float:
        """A metric's value (NAME or NAME{labels}, as /metrics writes it)."""
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=10).read().decode()
        return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)[1])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def fetching_worker(cluster: Cluster, secret_file: Path, split_dir: Path) -> subprocess.Popen:
    """Rank 1 restarted as a device without a checkpoint: it fetches its slices from the master."""
    os.kill(cluster.pids[1], signal.SIGKILL)
    cluster.wait_plan([0, 2])
    cmd = [sys.executable, "-m", "edge_llm", "worker", "--rank", "1", "--master", f"127.0.0.1:{cluster.join_port}",
           "--secret-file", str(secret_file), "--threads", "1", "--split-dir", str(split_dir)]
    worker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cluster.wait_plan([0, 1, 2])
    return worker


def one_loss(model: str, scenario: str, tokens: int, at: int, tmp: Path) -> dict:
    secret_file = tmp / "secret"
    secret_file.write_text(SECRET)
    extra = ["--memory-budget-mb", str(budget_mb(model)), "--split-dir", str(tmp / "split")] \
        if scenario == "memory budget" else []
    cluster, worker = Cluster(model, extra, secret_file), None
    try:
        if scenario == "fetching worker":
            worker = fetching_worker(cluster, secret_file, tmp / "fetched")
        cluster.stream(4)  # warm-up
        killed: list[float] = []

        def kill() -> None:
            os.kill(cluster.pids[2], signal.SIGKILL)
            killed.append(time.time())

        times = cluster.stream(tokens, at, kill)
        after = next(i for i, t in enumerate(times) if t > killed[0])
        started, total = cluster.metric("edge_cluster_last_replan_started"), cluster.metric(
            "edge_cluster_last_replan_seconds")
        load = cluster.metric("edge_cluster_last_replan_load_seconds")
        steady = sorted(b - a for a, b in zip(times[1:at], times[2:at]))
        fetched = cluster.metric('edge_worker_fetched_bytes{rank="1"}') if worker is not None else 0.0
        held = cluster.metric('edge_worker_weight_bytes{rank="1"}')
        return {"scenario": scenario, "fetched_mb": fetched / 2**20, "slice_mb": held / 2**20,
                "gap_ms": 1000 * (times[after] - times[after - 1]), "detect_ms": 1000 * (started - killed[0]), "load_ms": 1000 * load,
                "switch_ms": 1000 * (total - load), "replay_ms": 1000 * (times[after] - started - total),
                "tpot_ms": 1000 * steady[len(steady) // 2], "tokens": len(times)}
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        cluster.stop()


def budget_mb(model: str) -> float:
    """A quarter of the weights per device: less than a share of 3 devices, so layers stream from the
    split files, and enough for the window of a share of 2 after the loss."""
    size = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
    return round(size / 4 / (1 << 20), 1)


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "replan.json").write_text(json.dumps(rows, indent=2))
    lines = ["A 3-device cluster streams one greedy request; worker rank 2 is SIGKILLed mid-stream. Gap: last "
             "token before the loss to the first after it = detection + re-plan (loading the new slices, then "
             "switching) + replay (the request's tokens fed again, then its step). One run each, 2-core host.",
             "Rank 1's slice after the loss: the weight bytes it holds (resident; with a budget, what stays) and "
             "what it fetched from the master (only the rows and columns its old slice lacked).",
             "", "| model | scenario | gap ms | detection ms | loading slices ms | switching ms | replay ms | "
             "time per token before ms | rank 1 resident MB | rank 1 fetched MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['scenario']} | {r['gap_ms']:.0f} | {r['detect_ms']:.0f} | {r['load_ms']:.0f} | "
              f"{r['switch_ms']:.0f} | {r['replay_ms']:.0f} | {r['tpot_ms']:.1f} | {r['slice_mb']:.0f} | "
              f"{r['fetched_mb']:.0f} |" for r in rows]
    (out / "replan.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="medium,large")
    parser.add_argument("--scenarios", default="local checkpoints,memory budget,fetching worker")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--at", type=int, default=16)
    parser.add_argument("--out", default="bench")
    args = parser.parse_args()
    rows = []
    for preset in args.presets.split(","):
        model = f"models-cache/{preset}"
        if not Path(model).is_dir():
            subprocess.run([sys.executable, "-m", "edge_llm", "make-model", model, "--preset", preset], check=True)
        for scenario in args.scenarios.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                row = {"model": preset} | one_loss(model, scenario, args.tokens, args.at, Path(tmp))
            print(json.dumps(row), flush=True)
            rows.append(row)
    write(rows, Path(args.out))
    print((Path(args.out) / "replan.md").read_text())


if __name__ == "__main__":
    main()
