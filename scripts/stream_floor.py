"""The memory-streaming floor of a decode step: N processes, one thread each, each streaming its
own rank's weight bytes through F.linear (the kernel the decode uses) concurrently, once per token.

Nothing else is done (no attention, norms, all-reduce or Python around it), so a cluster's time per
token over this floor is its overhead. Used by bench_decode.py; alone:

    .venv/bin/python scripts/stream_floor.py MODEL_DIR N [--dtype auto] [--tokens 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from models.config import load_config
from models.dtypes import resolve_dtype
from models.sharding import local_dims
torch.set_num_threads(1)
folder, world, rank, dtype_name, tokens = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
cfg = load_config(__import__("pathlib").Path(folder))
dtype = resolve_dtype(dtype_name, cfg.torch_dtype)
d = local_dims(cfg, world)[rank]
D, hd = cfg.hidden_size, cfg.head_dim
shapes = [(d.n_local_heads * hd, D), (d.n_local_kv_heads * hd, D), (d.n_local_kv_heads * hd, D),
          (D, d.n_local_heads * hd), (d.local_intermediate, D), (d.local_intermediate, D), (D, d.local_intermediate)]
layers = [[torch.randn(s).to(dtype) for s in shapes] for _ in range(cfg.num_layers)]
head = torch.randn(d.local_vocab, D).to(dtype)
x = {D: torch.randn(1, D).to(dtype), d.local_intermediate: torch.randn(1, d.local_intermediate).to(dtype),
     d.n_local_heads * hd: torch.randn(1, d.n_local_heads * hd).to(dtype)}
nbytes = sum(w.nbytes for ws in layers for w in ws) + head.nbytes
def token():
    for ws in layers:
        for w in ws:
            torch.nn.functional.linear(x[w.shape[1]], w)
    torch.nn.functional.linear(x[D], head)
token()
print("ready", flush=True)
sys.stdin.readline()  # every rank allocated: all start together
times = []
for _ in range(tokens):
    t = time.perf_counter(); token(); times.append(time.perf_counter() - t)
print(json.dumps({"rank": rank, "times": times, "bytes": nbytes}))
"""


def measure_floor(model: str, world: int, dtype: str = "auto", tokens: int = 20) -> dict:
    """Median time per token of the slowest rank (they run concurrently), and bytes per rank."""
    root = str(Path(__file__).resolve().parent.parent)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, root, model, str(world), str(r), dtype, str(tokens)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("a floor process failed to start")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.communicate()[0]) for p in procs]
    per_token = [max(r["times"][i] for r in results) for i in range(tokens)]
    return {"ms": 1000 * statistics.median(per_token), "bytes_per_rank": [r["bytes"] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("workers", type=int)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(measure_floor(args.model, args.workers, args.dtype, args.tokens)))


if __name__ == "__main__":
    main()
