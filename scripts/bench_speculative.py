"""Speculative decoding benchmark: decode tokens per second of `edge-llm cluster` with and without
`--speculate ngram` (adaptive policy), side by side in one run, on loopback and on emulated
5 ms / 100 Mbit/s links, for a repetitive chat request (a document to quote word for word) and a
non-repetitive one (a story). Writes bench/speculative.json and bench/speculative.md.

    .venv/bin/python scripts/bench_speculative.py [--models medium,large,smollm2-135m-instruct]
        [--workers 2,3] [--tokens 48] [--rounds 2]

Both clusters of a configuration run at once; their requests alternate (off, ngram, off, ...),
so both see the same state of this shared machine. Tokens per second: (tokens - 1) / (time of the
last token - time of the first), the prefill excluded. Acceptance: drafted and accepted tokens
from the speculating cluster's /metrics over the same requests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import Cluster  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ("The lighthouse at Cape Wrath was built in 1828 by Robert Stevenson. It stands on cliffs above "
            "the Atlantic and its light can be seen from twenty-two nautical miles away. The keepers left in "
            "1998, when the light was automated, and the buildings now house a small cafe for walkers.")
PROMPTS = {  # chat messages: a document to quote word for word, and a story to make up
    "repetitive": "Repeat the following text exactly, word for word:\n\n" + DOCUMENT,
    "non-repetitive": "Write a short story about a lighthouse keeper who finds a strange map washed ashore.",
}
LINKS = {"loopback": [], "5 ms, 100 Mbit/s": ["--link-latency-ms", "5", "--link-bandwidth-mbps", "100"]}


def timed_request(cluster: Cluster, prompt: str, n: int) -> list[float]:
    """Arrival times of the streamed tokens of a greedy chat completion of the user message `prompt`."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n, "temperature": 0, "stream": True,
            "ignore_eos": True}
    req = urllib.request.Request(f"{cluster.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start, times = time.perf_counter(), []
    with urllib.request.urlopen(req, timeout=900) as resp:
        for line in resp:
            if line.startswith(b"data: {") and b'"content"' in line:
                times.append(time.perf_counter() - start)
    return times


def spec_counters(cluster: Cluster) -> dict[str, float]:
    text = urllib.request.urlopen(f"{cluster.url}/metrics", timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^edge_spec_(\w+) (\S+)$", text, re.M)}


def measure(model: str, workers: int, link: list[str], tokens: int, rounds: int) -> list[dict]:
    """Both systems of one configuration, each prompt `rounds` times, alternating."""
    off = Cluster(model, workers, link)
    spec = Cluster(model, workers, [*link, "--speculate", "ngram"])
    try:
        rows = []
        for name, prompt in PROMPTS.items():
            timed_request(off, prompt, 4), timed_request(spec, prompt, 4)  # warm up
            before = spec_counters(spec)
            rates: dict[str, list[float]] = {"off": [], "ngram": []}
            for _ in range(rounds):
                for mode, cluster in (("off", off), ("ngram", spec)):
                    times = timed_request(cluster, prompt, tokens)
                    rates[mode].append((len(times) - 1) / (times[-1] - times[0]))
            after = spec_counters(spec)
            drafted = after["drafted_tokens_total"] - before["drafted_tokens_total"]
            accepted = after["accepted_tokens_total"] - before["accepted_tokens_total"]
            steps = after["steps_total"] - before["steps_total"]
            emitted = after["step_tokens_total"] - before["step_tokens_total"]
            off_rate, spec_rate = statistics.median(rates["off"]), statistics.median(rates["ngram"])
            rows.append({"prompt": name, "off_tok_s": off_rate, "ngram_tok_s": spec_rate,
                         "speedup": spec_rate / off_rate, "drafted": drafted, "accepted": accepted,
                         "acceptance": accepted / drafted if drafted else 0.0,
                         "tokens_per_step": emitted / steps if steps else 0.0,
                         "samples": rates})
            print(f"  {name}: off {off_rate:.1f} tok/s, ngram {spec_rate:.1f} tok/s "
                  f"(x{spec_rate / off_rate:.2f}, acceptance {rows[-1]['acceptance']:.2f})", flush=True)
        return rows
    finally:
        off.stop()
        spec.stop()


def markdown(results: dict) -> str:
    lines = [f"Greedy decode, {results['tokens']} tokens per request, median of {results['rounds']} alternating "
             f"rounds, {results['cores']} cores (one machine: every device of the cluster shares them). "
             "`ngram`: `--speculate ngram`, adaptive policy, at most 4 drafts per step. Acceptance: accepted / "
             "drafted tokens; tokens per step: tokens emitted per decode step of the speculating cluster.", "",
             "| model | devices | link | prompt | off tok/s | ngram tok/s | speed-up | acceptance | tokens/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['workers']} | {r['link']} | {r['prompt']} | {r['off_tok_s']:.1f} | "
                     f"{r['ngram_tok_s']:.1f} | {r['speedup']:.2f}x | {r['acceptance']:.2f} | "
                     f"{r['tokens_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="medium,large,smollm2-135m-instruct",
                        help="folders under models-cache/ (or paths)")
    parser.add_argument("--workers", default="2,3")
    parser.add_argument("--links", default=",".join(LINKS), help="loopback and/or '5 ms, 100 Mbit/s'")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "speculative"))
    args = parser.parse_args()
    results = {"tokens": args.tokens, "rounds": args.rounds, "cores": os.cpu_count(), "rows": []}
    for model in args.models.split(","):
        folder = model if Path(model).exists() else str(ROOT / "models-cache" / model)
        for workers in (int(w) for w in args.workers.split(",")):
            for link in [x for x in LINKS if x in args.links]:
                print(f"{model}, {workers} devices, {link}", flush=True)
                for row in measure(folder, workers, LINKS[link], args.tokens, args.rounds):
                    results["rows"].append({"model": Path(model).name, "workers": workers, "link": link, **row})
                Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    Path(args.out + ".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
