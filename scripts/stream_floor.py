"""The memory-streaming floor of a decode step: N processes, each on the threads `edge-llm cluster`
gives one of N emulated devices (edge_llm.cluster.threads_per_process: the cores shared out, at
least one: two devices on two cores one thread each, one device both), each streaming its
own rank's weight bytes through models.quant_kernels.linear (the kernel the decode uses: numba's
float GEMV on float32, bf16 or fp16 weights, or with --quantize the int8/int4 kernels, the LM head at
int8 under int4 as served) concurrently, once per token; q, k, v and gate, up fused into one
matrix each, as the decode holds them (models.fusion).

Nothing else is done (no attention, norms, all-reduce or Python around it), so a cluster's time per
token over this floor is its overhead. Used by bench_decode.py; alone:

    .venv/bin/python scripts/stream_floor.py MODEL_DIR N [--dtype auto] [--quantize int8|int4] [--tokens 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from edge_llm.cluster import threads_per_process
from models.checkpoint import Checkpoint

WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from models.config import load_config
from models.dtypes import resolve_dtype
from models.fusion import fuse
from models.quant import quantize
from models.quant_kernels import linear, warm_kernels
from models.sharding import local_dims
from models.threads import step_threads
torch.set_num_threads(int(sys.argv[2]))  # the threads a cluster gives each of its devices
warm_kernels()
folder, world, rank, dtype_name, tokens = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], int(sys.argv[7])
method = sys.argv[8] if len(sys.argv) > 8 else None
cfg = load_config(__import__("pathlib").Path(folder))
dtype = resolve_dtype(dtype_name, cfg.torch_dtype)
d = local_dims(cfg, world)[rank]
D, hd = cfg.hidden_size, cfg.head_dim
shapes = [(d.n_local_heads * hd, D), (d.n_local_kv_heads * hd, D), (d.n_local_kv_heads * hd, D),
          (D, d.n_local_heads * hd), (d.local_intermediate, D), (d.local_intermediate, D), (D, d.local_intermediate)]
layers = [[torch.randn(s).to(dtype) for s in shapes] for _ in range(cfg.num_layers)]
head = torch.randn(d.local_vocab, D).to(dtype)
if method:
    layers = [[quantize(w, method) for w in ws] for ws in layers]
    head = quantize(head, "int8")
layers = [[fuse(ws[:3], [None] * 3)[0], ws[3], fuse(ws[4:6], [None] * 2)[0], ws[6]] for ws in layers]
x = {D: torch.randn(1, D).to(dtype), d.local_intermediate: torch.randn(1, d.local_intermediate).to(dtype),
     d.n_local_heads * hd: torch.randn(1, d.n_local_heads * hd).to(dtype)}
if method:
    x = {k: v.float() for k, v in x.items()}
nbytes = sum(w.nbytes for ws in layers for w in ws) + head.nbytes
def token():
    with step_threads(1):  # as a decode step runs its layers (torch's own ops on one thread)
        for ws in layers:
            for w in ws:
                linear(x[w.shape[1]], w)
    linear(x[D], head)
token()
print("ready", flush=True)
for line in sys.stdin:  # each "go": every rank allocated, all start together; EOF ends
    times = []
    for _ in range(tokens):
        t = time.perf_counter(); token(); times.append(time.perf_counter() - t)
    print(json.dumps({"rank": rank, "times": times, "bytes": nbytes}), flush=True)
"""


def stored_format(model: str) -> str | None:
    """int8 | int4 when the checkpoint's layers are stored as quantized blocks (a GGUF's, served as
    they are), for the floor to stream about as many bytes (a Q8_0 file's int8g blocks are streamed
    as per-channel int8, 8 bits a weight against 8.5); None for floats."""
    ckpt = Checkpoint(model)
    try:
        formats = ckpt.block_formats
    finally:
        ckpt.close()
    return "int4" if "int4" in formats else "int8" if formats else None


class Floor:
    """N floor processes, allocated once; `round()` runs one concurrent round, so a benchmark can
    alternate floor and system rounds and drift of the machine hits both alike."""

    def __init__(self, model: str, world: int, dtype: str = "auto", tokens: int = 20, quantize: str | None = None):
        root = str(Path(__file__).resolve().parent.parent)
        self.tokens = tokens
        threads = str(threads_per_process(world))  # as the cluster's devices: the same kernels, threads
        self.procs = [subprocess.Popen([sys.executable, "-c", WORKER, root, threads, model, str(world), str(r), dtype,
                                        str(tokens), *([quantize] if quantize else [])],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for r in range(world)]
        for p in self.procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a floor process failed to start")
        self.bytes_per_rank: list[int] = []

    def round(self) -> float:
        """Seconds per token of this round: the median over tokens of the slowest rank's time."""
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for p in self.procs]
        self.bytes_per_rank = [r["bytes"] for r in results]
        return statistics.median(max(r["times"][i] for r in results) for i in range(self.tokens))

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
            p.wait()


def measure_floor(model: str, world: int, dtype: str = "auto", tokens: int = 20, rounds: int = 1,
                  quantize: str | None = None) -> dict:
    """Median time per token of the slowest rank (they run concurrently), and bytes per rank."""
    floor = Floor(model, world, dtype, tokens, quantize)
    try:
        ms = [1000 * floor.round() for _ in range(rounds)]
    finally:
        floor.close()
    return {"ms": statistics.median(ms), "bytes_per_rank": floor.bytes_per_rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("workers", type=int)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(measure_floor(args.model, args.workers, args.dtype, args.tokens, quantize=args.quantize)))


if __name__ == "__main__":
    main()
