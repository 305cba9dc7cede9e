"""What each `edge-llm` sub-command does, with user-facing errors mapped to one exception."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from models.errors import CheckpointError, GenerationError
from models.sampling import SamplingParams
from models.sharding import PlanError


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit status 2."""


def make_model(args: argparse.Namespace) -> None:
    from models.factory import make_model as write

    out = write(args.out, preset=args.preset, seed=args.seed)
    print(f"wrote {args.preset} model to {out}")


def _prompt_ids(args: argparse.Namespace, tokenizer) -> list[int]:
    text = args.prompt if args.prompt is not None else args.prompt_text
    if args.prompt_ids:
        try:
            return [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError as e:
            raise UserError(f"--prompt-ids must be comma-separated integers ({e})") from e
    if text is None:
        raise UserError("give a prompt: edge-llm generate --model DIR 'text' (or --prompt-ids)")
    if args.chat:
        return tokenizer.encode_chat([{"role": "user", "content": text}])
    return tokenizer.encode(text)


async def _run_generation(engine, prompt_ids: list[int], params: SamplingParams, as_json: bool) -> None:
    from models.generation import generate

    result: dict[str, list] = {"token_ids": [], "logprobs": [], "top_logprobs": []}
    async for event in generate(engine, prompt_ids, params):
        result["token_ids"].append(event.token_id)
        result["logprobs"].append(event.logprob)
        result["top_logprobs"].append([[i, lp] for i, lp in event.top_logprobs])
        if not as_json:
            print(event.text, end="", flush=True)
    print(json.dumps(result) if as_json else "")


def generate(args: argparse.Namespace) -> None:
    from models.generation import LocalEngine
    from models.model import LocalModel

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            stop=tuple(args.stop), ignore_eos=args.ignore_eos,
                            logprobs=5 if args.json else 0)
    try:
        engine = LocalEngine(LocalModel(args.model))
        try:
            asyncio.run(_run_generation(engine, _prompt_ids(args, engine.tokenizer), params, args.json))
        finally:
            engine.close()
    except (CheckpointError, GenerationError, PlanError) as e:
        raise UserError(str(e)) from e
    sys.stdout.flush()


def bench_allreduce(args: argparse.Namespace) -> None:
    from pathlib import Path

    from edge.bench_allreduce import run, write_results
    from transport.link import LinkSpec

    if args.workers < 2:
        raise UserError("--workers must be at least 2 for an all-reduce benchmark")
    link = LinkSpec(latency_ms=args.link_latency_ms, bandwidth_mbps=args.link_bandwidth_mbps)
    result = run(args.workers, args.size, args.iters, link)
    out = Path(args.out)
    path = out / "allreduce.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    key = (result["workers"], result["elements"], result["link"])
    rows = [r for r in rows if (r["workers"], r["elements"], r["link"]) != key] + [result]
    write_results(rows, out)
    if not args.json:
        print((out / "allreduce.md").read_text())
    print(json.dumps({k: result[k] for k in ("star", "ring", "gloo", "auto_choice", "star_over_gloo")}))
