"""Quantized weights: the `large` preset served as float32, bf16, int8 and int4 on 1 and 2 devices,
next to transformers float32, in one run; each with the bandwidth floor of its own bytes.
Writes bench/quant.json and bench/quant.md.

    .venv/bin/python scripts/bench_quant.py [--model DIR] [--rounds 3] [--new-tokens 33]

Rounds alternate between the systems (all started first), so drift of this shared machine hits
all of them alike. Then peak memory: a 2-device cluster per format whose worker loads its shard
from split files (as a device too small for the float32 weights would), and rank 1's peak RSS
(VmHWM) against its resident weight bytes and the runtime's fixed overhead.

Floor: N processes (one per device, one thread each) each reading the weight bytes its rank
streams per token (resident bytes from the cluster's /metrics, less rank 0's embedding table, of
which a token reads one row) with one streaming pass (torch.sum over a buffer of that size),
concurrently, once per token: the time per token if decode did nothing but read every weight byte
once. GB/s = those streamed bytes of all ranks / time per token.

Kernel floor: the same N processes streaming their rank's weights through the decode's own GEMV
kernels instead (scripts/stream_floor.py: random weights of the rank's shapes, in the format served,
nothing but the GEMVs). Kernel floor / floor is what the kernel reaches of the memory's speed; time
per token / kernel floor is what the rest of the decode (attention, norms, all-reduces, sampling,
the hops between threads and processes) adds.
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
from stream_floor import Floor  # noqa: E402

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
        config = json.loads(Path(model, "config.json").read_text())
        embed = config["vocab_size"] * config["hidden_size"] * (2 if "bfloat16" in flags else 4)
        self.streamed = {r: b - (embed if r == "0" else 0) for r, b in self.weight_bytes.items()}
        self.floor_bytes = [self.streamed[str(r)] for r in range(workers)]
        self.floor_s: list[float] = []
        self.kernel_floor_s: list[float] = []
        self.model, self.workers = model, workers
        self.dtype = flags[flags.index("--dtype") + 1] if "--dtype" in flags else "auto"
        self.quantize = flags[flags.index("--quantize") + 1] if "--quantize" in flags else None

    def round(self, n: int) -> float:
        floor = ReadFloor(self.floor_bytes)  # up for its round only: eight systems' buffers held at
        try:  # once (8.5 GB beside the clusters and transformers) made a 24 GB host swap its pages
            self.floor_s.append(floor.round(n))
        finally:
            floor.stop()
        kernels = Floor(self.model, self.workers, self.dtype, n, self.quantize)  # likewise up for its round only
        try:
            self.kernel_floor_s.append(kernels.round())
        finally:
            kernels.close()
        times = self.cluster.request(n)
        return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))

    def stop(self) -> None:
        self.cluster.stop()


def peak_rss(model: str, flags: list[str], split_dir: str) -> dict:
    """Rank 1's peak RSS, fixed overhead (RSS before any weight) and resident weight bytes, loading
    from split files (written first by `edge-llm split`, so the worker itself only reads them)."""
    subprocess.run([sys.executable, "-m", "edge_llm", "split", model, "--workers", "2", "--out", split_dir, *flags],
                   check=True, capture_output=True)
    cmd = [sys.executable, "-m", "edge_llm", "cluster", "--model", model, "--workers", "2", "--port", "0",
           "--split-dir", split_dir, "--memory-budget-mb", "100000", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid, url = None, None
    while url is None:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"cluster failed to start: {proc.stderr.read()[-2000:]}")
        pid = int(m[1]) if (m := re.search(r"worker rank 1 pid (\d+)", line)) else pid
        url = m[1] if (m := re.search(r"on (http://\S+)", line)) else None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) * 1024
        text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
        weights = int(float(re.search(r'^edge_worker_weight_bytes\{rank="1"\} (\S+)$', text, re.M)[1]))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    fixed = int(re.search(r"rank 1 fixed overhead (\d+) MB RSS", proc.stderr.read())[1]) << 20
    return {"peak_rss": peak, "fixed_rss": fixed, "weight_bytes": weights}


def measure(systems: dict, rounds: int, n: int) -> dict:
    samples: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(rounds):
        for name, system in systems.items():
            samples[name].append(system.round(n))
    results = {}
    for name, system in systems.items():
        tpot = statistics.median(samples[name])
        total = sum(getattr(system, "streamed", system.weight_bytes).values())
        results[name] = {"tpot_ms": 1000 * tpot, "weight_bytes": system.weight_bytes, "gb_s": total / tpot / 1e9}
        if isinstance(system, Edge):
            results[name]["floor_ms"] = 1000 * statistics.median(system.floor_s)
            results[name]["kernel_floor_ms"] = 1000 * statistics.median(system.kernel_floor_s)
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "quant.json").write_text(json.dumps(results, indent=2))
    base = results["systems"]["transformers float32"]["tpot_ms"]
    lines = [f"Model: {results['model']} (`large` preset), prompt {len(PROMPT)} tokens, {results['new_tokens']} "
             f"new tokens, {results['cores']} cores ({results['cpu']}), median of {results['rounds']} alternating "
             "rounds. Floor: the weight bytes each rank streams per token (resident, less rank 0's embedding "
             "table) read once by one streaming pass (one process and thread per rank, concurrently), measured "
             "before each round of the same system. GB/s: those bytes / time per token. Kernel floor: those "
             "processes streaming the rank's weights through the decode's own GEMV kernels instead, nothing else "
             "(kernel floor / floor: the kernel; time / kernel floor: the rest of the decode).", "",
             "| system | time per output token ms | vs transformers float32 | resident weight MB per rank | "
             "weights GB/s | floor ms | vs floor | kernel floor ms | kernel floor / floor | vs kernel floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["systems"].items():
        per_rank = ", ".join(f"r{k}: {v / 1e6:.0f}" for k, v in sorted(r["weight_bytes"].items()))
        floor = (f"{r['floor_ms']:.1f} | {r['tpot_ms'] / r['floor_ms']:.2f} | {r['kernel_floor_ms']:.1f} | "
                 f"{r['kernel_floor_ms'] / r['floor_ms']:.2f} | {r['tpot_ms'] / r['kernel_floor_ms']:.2f}"
                 if "floor_ms" in r else "- | - | - | - | -")
        lines.append(f"| {name} | {r['tpot_ms']:.1f} | {r['tpot_ms'] / base:.2f} | {per_rank} | {r['gb_s']:.1f} | "
                     f"{floor} |")
    if "peak" in results:
        f32 = results["peak"]["float32"]["weight_bytes"]
        lines += ["", "Peak memory of worker rank 1 (of 2), loading its shard from split files (`edge-llm split "
                  "--quantize ...` first), VmHWM; the goal for int4: at most a third of float32's weight bytes "
                  "plus the fixed overhead.", "",
                  "| format | resident weight MB | fixed overhead MB | peak RSS MB | peak - fixed | "
                  "float32 weights / 3 + fixed |", "|---|---|---|---|---|---|"]
        for name, r in results["peak"].items():
            lines.append(f"| {name} | {r['weight_bytes'] / 1e6:.0f} | {r['fixed_rss'] / 1e6:.0f} | "
                         f"{r['peak_rss'] / 1e6:.0f} | {(r['peak_rss'] - r['fixed_rss']) / 1e6:.0f} | "
                         f"{(f32 / 3 + r['fixed_rss']) / 1e6:.0f} |")
    (out / "quant.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models-cache/large")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--out", default="bench")
    parser.add_argument("--skip-peak", action="store_true", help="skip the peak-memory part")
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
    if not args.skip_peak:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            results["peak"] = {name: peak_rss(args.model, flags, f"{tmp}/{name}") for name, flags in formats.items()
                               if name != "bfloat16"}
    write(results, Path(args.out))
    print((Path(args.out) / "quant.md").read_text())


if __name__ == "__main__":
    main()
