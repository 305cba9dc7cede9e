"""Decode benchmark: time to first token, time per output token and bytes per token per rank,
for `edge-llm cluster` with N = 1..4 workers next to transformers' own generate() on the same
checkpoint and the same cores. Writes bench/decode.json and bench/decode.md.

    .venv/bin/python scripts/bench_decode.py [--model DIR | --preset large] [--workers 1,2,3,4]
                                             [--prompt-tokens N]

Next to each cluster size: the memory-streaming floor (scripts/stream_floor.py: N processes on
the threads the cluster gives each device, streaming their rank's weight bytes through the decode's
GEMV kernels concurrently), one floor round before each cluster round so both see the same state
of the machine, and the cluster's time per token over it (its overhead). `--prompt-tokens`
measures decode after a long prompt (a chat's history): each token then reads the whole KV cache
too, which the weights-only floor leaves out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from stream_floor import Floor, stored_format  # noqa: E402

PROMPT = list(range(1, 17))  # the prompt's token ids (`--prompt-tokens` makes it longer)


def set_prompt_tokens(n: int, vocab_size: int) -> None:
    """A prompt of n token ids, 1.. cycling below the vocabulary's size."""
    PROMPT[:] = [1 + i % (vocab_size - 1) for i in range(n)]


HF_SCRIPT = r"""
import json, sys, time, torch, transformers
torch.set_num_threads(int(sys.argv[2]))
dtype = getattr(torch, sys.argv[4]) if len(sys.argv) > 4 else torch.float32
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dtype).eval()
ids = torch.tensor([json.loads(sys.argv[3])]); mask = torch.ones_like(ids)
def run(n):
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                       pad_token_id=None)
    return time.perf_counter() - t
run(2)
print(json.dumps({"weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}), flush=True)
for line in sys.stdin:
    n = int(line)
    t1, tn = run(1), run(n)
    print(json.dumps({"ttft": t1, "tpot": (tn - t1) / (n - 1)}), flush=True)
"""


class Cluster:
    def __init__(self, model: str, workers: int, extra: list[str] | None = None, env: dict | None = None):
        cmd = [sys.executable, "-m", "edge_llm", "cluster", "--model", model, "--workers", str(workers),
               "--port", "0", *(extra or [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=None if env is None else os.environ | env)
        self.url = ""
        while not self.url:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("cluster failed to start")
            if m := re.search(r"on (http://\S+)", line):
                self.url = m[1]

    def request(self, n: int, prompt: list[int] | None = None) -> list[float]:
        """Arrival times of the n streamed tokens, relative to the request."""
        body = {"prompt": prompt or PROMPT, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
        req = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        start, times = time.perf_counter(), []
        with urllib.request.urlopen(req, timeout=600) as resp:
            for line in resp:
                if line.startswith(b"data: {"):
                    times.append(time.perf_counter() - start)
        return times

    def link_bytes(self) -> dict[str, dict[str, float]]:
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=10).read().decode()
        out: dict[str, dict[str, float]] = {}
        for kind, rank, value in re.findall(r'edge_transport_bytes_(sent|received)_total\{rank="(\d+)"\} (\S+)', text):
            out.setdefault(rank, {})[kind] = float(value)
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def decode_bytes_per_token(cluster: Cluster, n: int) -> dict[str, dict[str, float]]:
    """Bytes per decode token on each master<->rank link: (bytes of an n-token run - 1-token run) / (n-1)."""
    def delta(tokens: int) -> dict[str, dict[str, float]]:
        before = cluster.link_bytes()
        cluster.request(tokens)
        after = cluster.link_bytes()
        return {r: {k: after[r][k] - before[r][k] for k in after[r]} for r in after}

    one, many = delta(1), delta(n)
    return {r: {k: (many[r][k] - one[r][k]) / (n - 1) for k in many[r]} for r in many}


def formula(config: dict, workers: int) -> dict[str, float]:
    """Payload bytes per decode token: 2 all-reduces of D floats per layer, plus the step and logits."""
    d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    per_worker_up = 2 * layers * d * 4 + vocab / workers * 4  # partials + its slice of the logits
    per_worker_down = d * 4 + 2 * layers * d * 4  # the step's hidden state + the sums
    return {"worker_sends": per_worker_up, "master_sends_each": per_worker_down}


def bench_hf(model: str, threads: int, rounds: int, n: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", HF_SCRIPT, model, str(threads), json.dumps(PROMPT)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc.stdout.readline()  # loaded and warmed up
    samples = []
    for _ in range(rounds):
        proc.stdin.write(f"{n}\n")
        proc.stdin.flush()
        samples.append(json.loads(proc.stdout.readline()))
    proc.stdin.close()
    proc.wait()
    return {"ttft_ms": 1000 * statistics.median(s["ttft"] for s in samples),
            "tpot_ms": 1000 * statistics.median(s["tpot"] for s in samples), "rounds": rounds}


def bench_cluster(model: str, workers: int, rounds: int, n: int, floor: Floor | None = None) -> dict:
    """Rounds of one streamed request; with `floor`, a floor round before each (the same drift)."""
    cluster = Cluster(model, workers)
    try:
        cluster.request(4)  # warm-up: page in weights, JIT nothing
        ttfts, tpots, floors = [], [], []
        for _ in range(rounds):
            if floor is not None:
                floors.append(floor.round())
            times = cluster.request(n)
            ttfts.append(times[0])
            tpots.append(statistics.median(b - a for a, b in zip(times, times[1:])))
        result = {"ttft_ms": 1000 * statistics.median(ttfts), "tpot_ms": 1000 * statistics.median(tpots),
                  "rounds": rounds}
        if floors:
            result["floor_ms"] = 1000 * statistics.median(floors)
        if workers > 1:
            result["bytes_per_token"] = decode_bytes_per_token(cluster, 9)
        return result
    finally:
        cluster.stop()


def write(results: dict, out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "decode.json").write_text(json.dumps(results, indent=2))
    hf = results["transformers"]
    lines = [f"Model: {results['model']} ({results['model_bytes'] / 1e9:.2f} GB on disk), prompt {len(PROMPT)} "
             f"tokens, {results['new_tokens']} new tokens, {results['cores']} cores, median of "
             f"{hf['rounds']} rounds.", "",
             "| system | TTFT ms | time per output token ms | vs transformers | floor ms | vs floor | "
             "bytes/token worker->master | formula |",
             "|---|---|---|---|---|---|---|---|",
             f"| transformers generate() ({results['cores']} threads) | {hf['ttft_ms']:.0f} | {hf['tpot_ms']:.1f} | 1.00 "
             "| | | | |"]
    for n, r in results["edge"].items():
        bpt = r.get("bytes_per_token", {})
        measured = ", ".join(f"r{k}: {v['received']:.0f}" for k, v in sorted(bpt.items()))
        expected = f"{results['formula'][n]['worker_sends']:.0f}" if n in results["formula"] else ""
        floor = r.get("floor_ms")
        vs_floor = f"{floor:.1f} | {r['tpot_ms'] / floor:.2f}" if floor else " | "
        lines.append(f"| edge-llm cluster, {n} device(s) | {r['ttft_ms']:.0f} | {r['tpot_ms']:.1f} | "
                     f"{r['tpot_ms'] / hf['tpot_ms']:.2f} | {vs_floor} | {measured} | {expected} |")
    (out / "decode.md").write_text("\n".join(lines) + "\n")


def model_parser(doc: str, workers: str) -> argparse.ArgumentParser:
    """The options every benchmark shares: which model (made on first use) and where results go."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: models-cache/PRESET, made if missing)")
    parser.add_argument("--preset", default="large")
    parser.add_argument("--workers", default=workers)
    parser.add_argument("--out", default="bench")
    return parser


def benchmark_model(args: argparse.Namespace) -> str:
    model = args.model or f"models-cache/{args.preset}"
    if not Path(model, "config.json").is_file():
        subprocess.run([sys.executable, "-m", "edge_llm", "make-model", model, "--preset", args.preset], check=True)
    return model


def main() -> None:
    parser = model_parser(__doc__, "1,2,3,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--prompt-tokens", type=int, default=len(PROMPT))
    args = parser.parse_args()
    model = benchmark_model(args)
    config = json.loads(Path(model, "config.json").read_text())
    set_prompt_tokens(args.prompt_tokens, config["vocab_size"])
    cores = os.cpu_count() or 1
    results = {"model": model, "model_bytes": sum(p.stat().st_size for p in Path(model).glob("*.safetensors")),
               "new_tokens": args.new_tokens, "cores": cores, "edge": {}, "formula": {}}
    results["transformers"] = bench_hf(model, cores, args.rounds, args.new_tokens)
    print("transformers", results["transformers"], flush=True)
    for n in (int(w) for w in args.workers.split(",")):
        floor = Floor(model, n, quantize=stored_format(model))  # a GGUF's blocks stream as they are served
        try:
            results["edge"][str(n)] = bench_cluster(model, n, args.rounds, args.new_tokens, floor)
        finally:
            floor.close()
        if n > 1:
            results["formula"][str(n)] = formula(config, n)
        print(f"{n} worker(s)", results["edge"][str(n)], flush=True)
    write(results, Path(args.out))
    print((Path(args.out) / "decode.md").read_text())


if __name__ == "__main__":
    main()
