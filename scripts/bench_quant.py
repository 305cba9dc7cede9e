"""Quantized weights: the `large` preset served as float32, bf16, int8 and int4 on 1 and 2 devices,
next to transformers float32, in one run; each with the bandwidth floor of its own bytes.
Writes bench/quant.json and bench/quant.md.

    .venv/bin/python scripts/bench_quant.py [--model DIR] [--rounds 3] [--new-tokens 33]

Rounds alternate between the systems (all started first), so drift of this shared machine hits
all of them alike. Floor: N processes (one per device, one thread each) each reading its rank's
resident weight bytes (from the cluster's /metrics) with one streaming pass (torch.sum over a
buffer of that size), concurrently, once per token: the time per token if decode did nothing
but read every weight byte once. GB/s = resident weight bytes of all ranks / time per token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import HF_SCRIPT, PROMPT, Cluster  # noqa: E402

READ_SCRIPT = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(1)
buf = torch.ones(int(sys.argv[1]) // 4)  # float32 elements: the rank's weight bytes
buf.sum()
print("ready", flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        t = time.perf_counter(); buf.sum(); times.append(time.perf_counter() - t)
    print(json.dumps(times), flush=True)
"""


class ReadFloor:
    """One streaming-read process per rank, each over that rank's weight bytes, run together."""

    def __init__(self, bytes_per_rank: list[int]):
        self.procs = [subprocess.Popen([sys.executable, "-c", READ_SCRIPT, str(b)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True) for b in bytes_per_rank]
        for p in self.procs:
            p.stdout.readline()

    def round(self, n: int) -> float:
        for p in self.procs:
            p.stdin.write(f"{n}\n")
            p.stdin.flush()
        times = [json.loads(p.stdout.readline()) for p in self.procs]
        return statistics.median(max(t[i] for t in times) for i in range(n))

    def stop(self) -> None:
        for p in self.procs:
            p.stdin.close()
            p.wait()


class Transformers:
    def __init__(self, model: str, threads: int):
        self.proc = subprocess.Popen([sys.executable, "-c", HF_SCRIPT, model, str(threads), json.dumps(PROMPT),
                                      "float32"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.weight_bytes = {"0": json.loads(self.proc.stdout.readline())["weight_bytes"]}

    def round(self, n: int) -> float:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["tpot"]

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


class Edge:
    """An emulated cluster with these flags, timed by streaming one request; its floor beside it."""

    def __init__(self, model: str, workers: int, flags: list[str]):
        self.cluster = Cluster(model, workers, flags)
        self.cluster.request(4)  # warm-up (and the kernels' first compile)
        text = urllib.request.urlopen(f"{self.cluster.url}/metrics", timeout=10).read().decode()
        self.weight_bytes = {r: int(float(v)) for r, v in
                             re.findall(r'^edge_worker_weight_bytes\{rank="(\d+)"\} (\S+)$', text, re.M)}
        self.floor = ReadFloor([self.weight_bytes[str(r)] for r in range(workers)])
        self.floor_s: list[float] = []

    def round(self, n: int) -> float:
        self.floor_s.append(self.floor.round(n))
        times = self.cluster.request(n)
        return statistics.median(b - a for a, b in zip(times, times[1:]))

    def stop(self) -> None:
        self.floor.stop()
        self.cluster.stop()


def measure(systems: dict, rounds: int, n: int) -> dict:
    samples: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(rounds):
        for name, system in systems.items():
            samples[name].append(system.round(n))
    results = {}
    for name, system in systems.items():
        tpot = statistics.median(samples[name])
        total = sum(system.weight_bytes.values())
        results[name] = {"tpot_ms": 1000 * tpot, "weight_bytes": system.weight_bytes, "gb_s": total / tpot / 1e9}
        if isinstance(system, Edge):
            results[name]["floor_ms"] = 1000 * statistics.median(system.floor_s)
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "quant.json").write_text(json.dumps(results, indent=2))
    base = results["systems"]["transformers float32"]["tpot_ms"]
    lines = [f"Model: {results['model']} (`large` preset), prompt {len(PROMPT)} tokens, {results['new_tokens']} "
             f"new tokens, {results['cores']} cores ({results['cpu']}), median of {results['rounds']} alternating "
             "rounds. Floor: each rank's resident weight bytes read once per token by one streaming pass "
             "(one process and thread per rank, concurrently), measured before each round of the same system.", "",
             "| system | time per output token ms | vs transformers float32 | resident weight MB per rank | "
             "weights GB/s | floor ms | vs floor |", "|---|---|---|---|---|---|---|"]
    for name, r in results["systems"].items():
        per_rank = ", ".join(f"r{k}: {v / 1e6:.0f}" for k, v in sorted(r["weight_bytes"].items()))
        floor = f"{r['floor_ms']:.1f} | {r['tpot_ms'] / r['floor_ms']:.2f}" if "floor_ms" in r else "- | -"
        lines.append(f"| {name} | {r['tpot_ms']:.1f} | {r['tpot_ms'] / base:.2f} | {per_rank} | {r['gb_s']:.1f} | "
                     f"{floor} |")
    (out / "quant.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models-cache/large")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args()
    if not Path(args.model, "config.json").is_file():
        subprocess.run([sys.executable, "-m", "edge_llm", "make-model", args.model, "--preset", "large"], check=True)
    cores = os.cpu_count() or 1
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    formats = {"float32": ["--dtype", "float32"], "bfloat16": ["--dtype", "bfloat16"],
               "int8": ["--quantize", "int8"], "int4": ["--quantize", "int4"]}
    systems: dict = {}
    try:
        systems["transformers float32"] = Transformers(args.model, cores)
        for workers in (int(w) for w in args.workers.split(",")):
            for name, flags in formats.items():
                systems[f"edge-llm {workers} device(s) {name}"] = Edge(args.model, workers, flags)
                print(f"started {workers} x {name}", flush=True)
        results = {"model": args.model, "new_tokens": args.new_tokens, "cores": cores, "cpu": cpu,
                   "rounds": args.rounds, "systems": measure(systems, args.rounds, args.new_tokens)}
    finally:
        for system in systems.values():
            system.stop()
    write(results, Path(args.out))
    print((Path(args.out) / "quant.md").read_text())


if __name__ == "__main__":
    main()
