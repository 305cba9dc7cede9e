"""Where one decode token's time goes, on 1 and 2 emulated devices: writes bench/profile.json and .md.

    .venv/bin/python scripts/profile_decode.py [--model DIR ...] [--workers 1,2] [--tokens 64] [--quantize int8|int4]

Per model and device count, over the decode steps of one streamed request (a trace of every
forward and all-reduce on every rank, edge.trace; the ranks of this emulated cluster share one
clock): the forward on each rank's compute thread, the part of it in all-reduces (send, the
peer's arrival, the sum), split into waiting for the slower rank to arrive and the exchange after
it, the rest of the forward (GEMVs, attention, norms, the Python around them), and what the token
costs outside the forward (the step runner, embedding, the logits gather, sampling, detokenising,
the SSE write), split in a second table at the moments rank 0 and the workers mark between two
forwards (edge.trace.STAGES: back on the event loop, logits gathered, next step begun, its rows
embedded, a worker's command received). Next to it, the memory-streaming floor of the same plan
through the same kernels (scripts/stream_floor.py) and one process running the same layers with no cluster at all
(models.model.LocalModel, one thread per device's share).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import Cluster  # noqa: E402
from stream_floor import measure_floor, stored_format  # noqa: E402

from edge.trace import (  # noqa: E402
    TRACE_ENV,
    between_forwards,
    forward_seconds,
    read_trace,
    split_allreduces,
)

LOCAL = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from models.model import LocalModel
from models.threads import set_threads
set_threads(int(sys.argv[3]))
m = LocalModel(sys.argv[2], quantize=sys.argv[5]); kv = m.new_cache(512); m.forward([1, 2, 3], kv)
times = []
for _ in range(int(sys.argv[4])):
    t = time.perf_counter(); m.forward([5], kv); times.append(time.perf_counter() - t)
print(json.dumps(sorted(times)[len(times) // 2]))
"""


def profile_cluster(model: str, workers: int, tokens: int, extra: list[str]) -> dict:
    """The decode steps of one streamed request: the trace (edge.trace) from its first token on."""
    with tempfile.TemporaryDirectory() as trace_dir:
        cluster = Cluster(model, workers, extra, env={TRACE_ENV: trace_dir})
        try:
            cluster.request(8)
            started = time.monotonic_ns()
            times = cluster.request(tokens)
            until = time.monotonic_ns()
        finally:
            cluster.stop()
        trace = read_trace(trace_dir)
    since = started + int(times[0] * 1e9)  # the prefill is over
    split = split_allreduces(trace, since, until)
    tpot = (times[-1] - times[0]) / (len(times) - 1)
    ranks = {}
    for rank, records in trace.items():
        forward_s, forwards = forward_seconds(records, since, until)
        count = split[rank]["count"] / forwards if forwards else 0.0  # all-reduces per forward
        wait, exchange = 1000 * split[rank]["wait_s"] * count, 1000 * split[rank]["exchange_s"] * count
        ranks[str(rank)] = {"forward_ms": 1000 * forward_s, "allreduce_ms": wait + exchange,
                            "allreduce_wait_ms": wait, "allreduce_exchange_ms": exchange,
                            "compute_ms": 1000 * forward_s - wait - exchange, "allreduces_per_token": count}
    between = {k: v if k == "steps" else 1000 * v for k, v in between_forwards(trace, since, until).items()}
    outside = 1000 * tpot - ranks["0"]["forward_ms"]
    return {"tpot_ms": 1000 * tpot, "ranks": ranks, "outside_forward_ms": outside, "between_forwards_ms": between}


def local_forward_ms(model: str, threads: int, tokens: int, quantize: str | None) -> float:
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", LOCAL, root, model, str(threads), str(tokens), quantize or "auto"],
                         capture_output=True, text=True, check=True)
    return 1000 * json.loads(out.stdout.strip().splitlines()[-1])


def write(results: dict, out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "profile.json").write_text(json.dumps(results, indent=2))
    lines = ["Per decode token (ms), mean over the decode steps of one streamed request. All-reduce: this "
             "rank's time in them, of which 'waiting' until the last rank entered and 'exchange' from then "
             "until this rank had the sum (link, wake-up, sum). 'one process' runs the whole model's layers in "
             "one process on the same cores (no cluster); 'floor' streams each rank's weight bytes through the "
             "decode's own GEMV kernels, concurrently.", "",
             "| model | devices | time per token | floor | one process | rank | forward | of it all-reduce "
             "(count) | waiting | exchange | of it compute | outside the forward (rank 0) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, per_n in results["models"].items():
        for n, r in per_n.items():
            for i, (rank, p) in enumerate(sorted(r["ranks"].items())):
                head = (f"| {model} | {n} | {r['tpot_ms']:.2f} | {r['floor_ms']:.2f} | {r['local_ms']:.2f} " if i == 0
                        else "| | | | | ")
                tail = f"{r['outside_forward_ms']:.2f} |" if i == 0 else " |"
                lines.append(f"{head}| {rank} | {p['forward_ms']:.2f} | {p['allreduce_ms']:.2f} "
                             f"({p['allreduces_per_token']:.0f}) | {p['allreduce_wait_ms']:.2f} | "
                             f"{p['allreduce_exchange_ms']:.2f} | {p['compute_ms']:.2f} | {tail}")
    (out / "profile.md").write_text("\n".join(lines + between_table(results)) + "\n")


BETWEEN = (("to_loop", "back on the event loop"), ("gather", "other ranks' logits gathered"),
           ("next_step", "token chosen, step runner"),
           ("embed", "step rows embedded"), ("to_compute", "command framed and sent, to the compute thread"),
           ("worker_receive", "worker: command received"),
           ("worker_to_compute", "worker: to its compute thread"))


def between_table(results: dict) -> list[str]:
    """Rank 0's time from one forward's exit to the next one's entry, stage by stage (edge.trace)."""
    lines = ["", "Between two forwards of rank 0 (us per decode step, mean): the gap from its forward's "
             "exit to its next forward's entry, split at the moments it marks (edge.trace.STAGES), each "
             "column the part that its moment ends (in the order they happen: on the data plane the "
             "gather precedes the hop back to the event loop); the worker columns run from rank 0's rows "
             "embedded, beside rank 0's last one.", "",
             "| model | devices | " + " | ".join(title for _, title in BETWEEN) + " | steps |",
             "|---|---|" + "---|" * (len(BETWEEN) + 1)]
    for model, per_n in results["models"].items():
        for n, r in per_n.items():
            b = r["between_forwards_ms"]
            cells = " | ".join(f"{1000 * b[k]:.0f}" if k in b else "-" for k, _ in BETWEEN)
            lines.append(f"| {model} | {n} | {cells} | {b.get('steps', 0)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="checkpoint folder (repeatable; default: the small "
                                                         "preset and the default model)")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quantize", choices=["int8", "int4"], help="serve the weights quantized (the "
                                                                    "floor and one process too)")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args()
    models = args.model or ["models-cache/small", "models-cache/smollm2-135m-instruct"]
    if "models-cache/small" in models and not Path("models-cache/small/config.json").is_file():
        subprocess.run([sys.executable, "-m", "edge_llm", "make-model", "models-cache/small", "--preset", "small"],
                       check=True)
    results: dict = {"models": {}}
    for model in models:
        for n in (int(w) for w in args.workers.split(",")):
            r = profile_cluster(model, n, args.tokens, ["--quantize", args.quantize] if args.quantize else [])
            r["floor_ms"] = measure_floor(model, n, quantize=args.quantize or stored_format(model))["ms"]
            r["local_ms"] = local_forward_ms(model, max(1, 2 // n), args.tokens, args.quantize)
            results["models"].setdefault(Path(model).name, {})[str(n)] = r
            print(model, n, json.dumps(r), flush=True)
    write(results, Path(args.out))
    print((Path(args.out) / "profile.md").read_text())


if __name__ == "__main__":
    main()
