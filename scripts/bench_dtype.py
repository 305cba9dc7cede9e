"""Weights as shipped: the `large` preset saved in bf16, served with --dtype bfloat16 and --dtype
float32 on 1 and 2 devices, next to transformers computing in both dtypes, in one run. Also one
GEMV (5632 x 2048, the large preset's MLP) per dtype and thread count, torch's and the decode's own
kernel: where the speed comes from.
Writes bench/dtype.json and bench/dtype.md.

    .venv/bin/python scripts/bench_dtype.py [--model DIR] [--rounds 3] [--new-tokens 33]

Rounds alternate between the systems (all started first), so drift of this shared machine hits
all of them alike. GB/s = resident weight bytes of all ranks / time per output token.
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

GEMV_SCRIPT = r"""
import json, statistics, sys, time, torch
from models.quant_kernels import linear, warm_kernels
from models.threads import set_threads
set_threads(int(sys.argv[1]))
warm_kernels()
out = {}
for name in ("float32", "bfloat16", "float16"):
    dtype = getattr(torch, name)
    # 16 matrices (0.7-1.5 GB) cycled, so every call streams from memory, not from the cache
    ws = [torch.randn(5632, 2048).to(dtype) for _ in range(16)]; x = torch.randn(1, 2048).to(dtype)
    for kernel, fn in (("F.linear", torch.nn.functional.linear), ("edge-llm", linear)):
        for w in ws: fn(x, w)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for w in ws: fn(x, w)
            times.append((time.perf_counter() - t) / len(ws))
        s = statistics.median(times)
        w = ws[0]
        out[f"{name} {kernel}"] = {"ms": s * 1e3, "gparam_s": w.numel() / s / 1e9,
                                   "gb_s": w.numel() * w.element_size() / s / 1e9}
    del ws
print(json.dumps(out))
"""


class Transformers:
    """transformers' generate() in `dtype`, in its own process, timed on request."""

    def __init__(self, model: str, dtype: str, threads: int):
        self.proc = subprocess.Popen([sys.executable, "-c", HF_SCRIPT, model, str(threads), json.dumps(PROMPT), dtype],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.weight_bytes = {"0": json.loads(self.proc.stdout.readline())["weight_bytes"]}

    def round(self, n: int) -> tuple[float, float]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        sample = json.loads(self.proc.stdout.readline())
        return sample["ttft"], sample["tpot"]

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


class Edge:
    """An emulated edge-llm cluster, timed by streaming one request."""

    def __init__(self, model: str, dtype: str, workers: int):
        self.cluster = Cluster(model, workers, ["--dtype", dtype])
        self.cluster.request(4)  # warm-up
        text = urllib.request.urlopen(f"{self.cluster.url}/metrics", timeout=10).read().decode()
        self.weight_bytes = {r: int(float(v)) for r, v in
                             re.findall(r'^edge_worker_weight_bytes\{rank="(\d+)"\} (\S+)$', text, re.M)}

    def round(self, n: int) -> tuple[float, float]:
        times = self.cluster.request(n)
        return times[0], statistics.median(b - a for a, b in zip(times, times[1:]))

    def stop(self) -> None:
        self.cluster.stop()


def gemv(threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", GEMV_SCRIPT, str(threads)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    return json.loads(out.stdout)


def measure(systems: dict, rounds: int, n: int) -> dict:
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}
    for _ in range(rounds):
        for name, system in systems.items():
            samples[name].append(system.round(n))
    results = {}
    for name, system in systems.items():
        tpot = statistics.median(s[1] for s in samples[name])
        total = sum(system.weight_bytes.values())
        results[name] = {"ttft_ms": 1000 * statistics.median(s[0] for s in samples[name]), "tpot_ms": 1000 * tpot,
                         "weight_bytes": system.weight_bytes, "gb_s": total / tpot / 1e9, "rounds": rounds}
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "dtype.json").write_text(json.dumps(results, indent=2))
    base = results["systems"]["transformers float32"]["tpot_ms"]
    lines = [f"Model: {results['model']} (`large` preset saved in bf16, {results['params'] / 1e9:.2f} G parameters), "
             f"prompt {len(PROMPT)} tokens, {results['new_tokens']} new tokens, {results['cores']} cores "
             f"({results['cpu']}), median of {results['rounds']} alternating rounds.", "",
             "| system | TTFT ms | time per output token ms | vs transformers float32 | resident weight MB per rank | "
             "weights GB/s |", "|---|---|---|---|---|---|"]
    for name, r in results["systems"].items():
        per_rank = ", ".join(f"r{k}: {v / 1e6:.0f}" for k, v in sorted(r["weight_bytes"].items()))
        lines.append(f"| {name} | {r['ttft_ms']:.0f} | {r['tpot_ms']:.1f} | {r['tpot_ms'] / base:.2f} | "
                     f"{per_rank} | {r['gb_s']:.1f} |")
    lines += ["", "One GEMV, 5632 x 2048 (one token; torch's F.linear and the kernel a decode step uses, "
              "models.quant_kernels.linear; 16 such matrices cycled so each call streams its weights from "
              "memory), median of 5 rounds:", "",
              "| dtype, kernel | threads | ms | Gparam/s | GB/s |", "|---|---|---|---|---|"]
    for threads, per_dtype in results["gemv"].items():
        for name, g in per_dtype.items():
            lines.append(f"| {name} | {threads} | {g['ms']:.3f} | {g['gparam_s']:.2f} | {g['gb_s']:.1f} |")
    (out / "dtype.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models-cache/large-bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--out", default="bench")
    args = parser.parse_args()
    if not Path(args.model, "config.json").is_file():
        subprocess.run([sys.executable, "-m", "edge_llm", "make-model", args.model, "--preset", "large",
                        "--dtype", "bfloat16"], check=True)
    cores = os.cpu_count() or 1
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    results = {"model": args.model, "new_tokens": args.new_tokens, "cores": cores, "cpu": cpu, "rounds": args.rounds,
               "gemv": {str(t): gemv(t) for t in (1, 2)}}
    print(json.dumps(results["gemv"]), flush=True)
    systems = {}
    try:
        for dtype in ("float32", "bfloat16"):
            systems[f"transformers {dtype}"] = Transformers(args.model, dtype, cores)
        for workers in (1, 2):
            for dtype in ("float32", "bfloat16"):
                systems[f"edge-llm {workers} device(s) {dtype}"] = Edge(args.model, dtype, workers)
        results["systems"] = measure(systems, args.rounds, args.new_tokens)
    finally:
        for system in systems.values():
            system.stop()
    results["params"] = results["systems"]["transformers bfloat16"]["weight_bytes"]["0"] / 2
    write(results, Path(args.out))
    print((Path(args.out) / "dtype.md").read_text())


if __name__ == "__main__":
    main()
