"""Star, ring and torch.distributed gloo all-reduce on N real processes over loopback (or emulated
links); adds a row to bench/allreduce.json and rewrites bench/allreduce.md.

    python scripts/bench_allreduce.py --workers N [--size ELEMENTS] [--iters I]
        [--link-latency-ms L] [--link-bandwidth-mbps B] [--json] [--out bench]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import time
from pathlib import Path

import numpy as np

from transport.auth import new_secret
from transport.collectives import RingAllReduce, StarAllReduce, measure_links
from transport.link import LinkSpec
from transport.loop import run_loop
from transport.mesh import build_mesh, free_ports


def _stats(samples: list[float]) -> dict[str, float]:
    us = np.array(samples) * 1e6
    return {"median_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99)),
            "mean_us": float(us.mean()), "iterations": len(samples)}


async def _time_ours(rank: int, ports: list[int], secret: bytes, size: int, iters: int,
                     link: LinkSpec) -> dict:
    mesh = await build_mesh(rank, [("127.0.0.1", p) for p in ports], secret, link=link)
    n = len(ports)
    x = np.random.default_rng(rank).standard_normal(size).astype(np.float32)
    out: dict = {}
    try:
        model = await measure_links(rank, n, mesh.channels)
        out["auto_choice"] = model.choose(x.nbytes, n)
        out["link_model"] = {"alpha_us": model.alpha * 1e6, "bandwidth_MBps": model.bandwidth / 1e6}
        for name, cls in (("star", StarAllReduce), ("ring", RingAllReduce)):
            algo = cls(rank, n, mesh.channels, timeout=60)
            for _ in range(max(3, iters // 10)):
                await algo.allreduce(x)
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                await algo.allreduce(x)
                times.append(time.perf_counter() - start)
            out[name] = _stats(times)
        out["auto"] = out[out["auto_choice"]]
    finally:
        await mesh.aclose()
    return out


def _time_gloo(rank: int, n: int, port: int, size: int, iters: int) -> dict:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    try:
        t = torch.from_numpy(np.random.default_rng(rank).standard_normal(size).astype(np.float32))
        for _ in range(max(3, iters // 10)):
            dist.all_reduce(t.clone())
        times = []
        for _ in range(iters):
            buf = t.clone()
            start = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - start)
        return _stats(times)
    finally:
        dist.destroy_process_group()


def _rank_main(rank: int, ports: list[int], gloo_port: int, secret: bytes, size: int, iters: int,
               link: LinkSpec, results: mp.Queue) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = run_loop(_time_ours(rank, ports, secret, size, iters, link))
    out["gloo"] = _time_gloo(rank, len(ports), gloo_port, size, iters)
    if rank == 0:
        results.put(out)


def _first_result(results: mp.Queue, procs: list, timeout: float = 1800) -> dict:
    """Rank 0's result; fails fast if any rank died instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"benchmark rank(s) {dead} failed; see their tracebacks above")
    raise TimeoutError("the benchmark did not finish")


def run(workers: int, size: int, iters: int, link: LinkSpec) -> dict:
    """Run all ranks as real processes; returns rank 0's timings (each all-reduce ends in sync)."""
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    ports = free_ports(workers + 1)
    secret = new_secret()
    procs = [ctx.Process(target=_rank_main, args=(r, ports[:workers], ports[-1], secret, size, iters,
                                                   link, results)) for r in range(workers)]
    for p in procs:
        p.start()
    try:
        out = _first_result(results, procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    out |= {"workers": workers, "elements": size, "bytes": size * 4, "iterations": iters,
            "link": {"latency_ms": link.latency_ms, "bandwidth_mbps": link.bandwidth_mbps}}
    out["star_over_gloo"] = out["star"]["median_us"] / out["gloo"]["median_us"]
    return out


def write_results(rows: list[dict], out_dir: Path = Path("bench")) -> None:
    """bench/allreduce.json and bench/allreduce.md (one table row per configuration)."""
    out_dir.mkdir(exist_ok=True)
    (out_dir / "allreduce.json").write_text(json.dumps(rows, indent=2))
    lines = ["Back-to-back all-reduces on rank 0: median and mean (= wall time / iterations, the rate a "
             "chain of dependent all-reduces runs at) per call. With 2 ranks the star is a direct "
             "exchange (one hop).", "",
             "| workers | elements | latency ms | bandwidth Mbit/s | star median us | star mean us | star p99 us | "
             "ring median us | gloo median us | gloo mean us | star/gloo (median) | auto picks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['elements']} | {r['link']['latency_ms']} | "
                     f"{r['link']['bandwidth_mbps'] or 'loopback'} | {r['star']['median_us']:.0f} | "
                     f"{r['star']['mean_us']:.0f} | {r['star']['p99_us']:.0f} | {r['ring']['median_us']:.0f} | "
                     f"{r['gloo']['median_us']:.0f} | {r['gloo']['mean_us']:.0f} | {r['star_over_gloo']:.2f} | "
                     f"{r['auto_choice']} |")
    (out_dir / "allreduce.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="processes taking part (at least 2)")
    p.add_argument("--size", type=int, default=4096, help="float32 elements")
    p.add_argument("--iters", type=int, default=500, help="all-reduces per system")
    p.add_argument("--link-latency-ms", type=float, default=0.0, help="emulated latency per hop")
    p.add_argument("--link-bandwidth-mbps", type=float, default=0.0, help="emulated bandwidth per link (0: unlimited)")
    p.add_argument("--json", action="store_true", help="print this row as JSON instead of the table")
    p.add_argument("--out", default="bench", help="folder for the JSON and Markdown results")
    args = p.parse_args(argv)
    if args.workers < 2 or args.size < 1 or args.iters < 1:
        p.error("--workers must be at least 2, --size and --iters at least 1")
    link = LinkSpec(latency_ms=args.link_latency_ms, bandwidth_mbps=args.link_bandwidth_mbps)
    result = run(args.workers, args.size, args.iters, link)
    out = Path(args.out)
    path = out / "allreduce.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    key = (result["workers"], result["elements"], result["link"])
    rows = [r for r in rows if (r["workers"], r["elements"], r["link"]) != key] + [result]
    write_results(rows, out)
    print(json.dumps(result) if args.json else (out / "allreduce.md").read_text())


if __name__ == "__main__":
    main()
