"""What each `edge-llm` sub-command does, with user-facing errors mapped to one exception."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from models.errors import CheckpointError, GenerationError
from models.sampling import SamplingParams
from models.sharding import PlanError


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit status 2."""


def make_model(args: argparse.Namespace) -> None:
    from pathlib import Path

    from models.factory import make_model as write

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; choose another OUT or remove it")
    try:
        out = write(out, preset=args.preset, seed=args.seed, dtype=args.dtype)
    except OSError as e:
        raise UserError(f"cannot write the model to {out}: {e.strerror or e}") from e
    print(f"wrote {args.preset} model ({args.dtype}) to {out}")


def import_gguf(args: argparse.Namespace) -> None:
    from models.gguf_import import import_gguf as convert

    try:
        out = convert(args.gguf, args.out, args.dtype)
    except CheckpointError as e:
        raise UserError(str(e)) from e
    print(f"imported {args.gguf} into {out}")


def _model_folder(path: str | None) -> str | None:
    """`--model` as a folder: a .gguf file is imported once into MODEL.gguf.edge-import beside it."""
    if path is None or not path.endswith(".gguf"):
        return path
    from models.gguf_import import imported_folder

    try:
        return str(imported_folder(path))
    except CheckpointError as e:
        raise UserError(str(e)) from e


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


def speculation_settings(args: argparse.Namespace):
    """--speculate, --num-draft-tokens, --draft-policy, --draft-model, checked together."""
    from models.drafting import SpeculationSettings

    method = args.speculate or ("draft" if args.draft_model else "off")
    settings = SpeculationSettings(method, args.num_draft_tokens, args.draft_policy == "adaptive",
                                   _model_folder(args.draft_model) if args.draft_model else None)
    try:
        settings.check()
    except ValueError as e:
        raise UserError(str(e)) from e
    return settings


async def _run_generation(engine, prompt_ids: list[int], params: SamplingParams, as_json: bool,
                          speculation) -> None:
    from models.generation import generate

    result: dict[str, list] = {"token_ids": [], "logprobs": [], "top_logprobs": []}
    try:
        speculating = speculation.build(engine.config, engine.tokenizer)
    except ValueError as e:
        raise UserError(str(e)) from e
    async for event in generate(engine, prompt_ids, params, speculating):
        result["token_ids"].append(event.token_id)
        result["logprobs"].append(event.logprob)
        result["top_logprobs"].append([[i, lp] for i, lp in event.top_logprobs])
        if not as_json:
            print(event.text, end="", flush=True)
    print(json.dumps(result) if as_json else "")


async def _generate_on_cluster(args: argparse.Namespace, params: SamplingParams, speculation, forks) -> None:
    """`generate --workers N`: an emulated N-device cluster for one prompt, then stopped."""
    from edge.master import MasterSettings
    from edge_llm.cluster import running_cluster
    from transport.auth import new_secret

    settings = MasterSettings(model=args.model, world_size=args.workers, secret=new_secret(), dtype=args.dtype,
                              quantize=args.quantize)
    async with running_cluster(settings, spawn_workers=True, ready_timeout=300, announce=False,
                               forks=forks) as engine:
        await _run_generation(engine, _prompt_ids(args, engine.tokenizer), params, args.json, speculation)


def generate(args: argparse.Namespace) -> None:
    with _forked_devices(args.workers - 1) as forks:
        _generate(args, forks)


def _forked_devices(count: int):
    """edge_llm.spawn.DeviceForks of `count` devices (none for 0 or less), forked once everything a
    device process runs is imported and before anything computes."""
    import edge_llm.cluster  # noqa: F401 - the master, worker and attention node, and torch under them
    import models.generation  # noqa: F401
    from edge_llm.spawn import DeviceForks

    return DeviceForks(max(0, count))


def _generate(args: argparse.Namespace, forks) -> None:
    from edge_llm.cluster import StartupError
    from models.engine import EngineUnavailable
    from models.generation import LocalEngine
    from models.model import LocalModel
    from transport.loop import run_loop

    args.model = _model_folder(args.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            stop=tuple(args.stop), ignore_eos=args.ignore_eos,
                            logprobs=5 if args.json else 0)
    speculation = speculation_settings(args)  # refused before anything loads
    try:
        if args.workers > 1:
            run_loop(_generate_on_cluster(args, params, speculation, forks))
            return
        engine = LocalEngine(LocalModel(args.model, args.dtype, args.quantize))
        try:
            asyncio.run(_run_generation(engine, _prompt_ids(args, engine.tokenizer), params, args.json, speculation))
        finally:
            engine.close()
    except (CheckpointError, GenerationError, PlanError, EngineUnavailable, TimeoutError, StartupError) as e:
        raise UserError(str(e)) from e
    sys.stdout.flush()


def _weights(text: str | None, workers: int) -> list[float] | str | None:
    if not text:
        return None
    if text == "auto":
        return "auto"
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError as e:
        raise UserError(f"--weights must be comma-separated numbers ({e})") from e
    if len(weights) != workers:
        raise UserError(f"--weights gives {len(weights)} numbers for {workers} workers")
    return weights


def _secret(path: str | None, required: bool = False) -> bytes:
    """The cluster secret from `path` or $EDGE_LLM_SECRET; a new one for a master that has neither,
    a clear error for a device (`required`), which could never join with an invented one."""
    from transport.auth import SECRET_ENV, load_secret, new_secret
    from transport.errors import AuthError

    if path is None and not os.environ.get(SECRET_ENV):
        if required:
            raise UserError(f"a device needs the cluster's secret to join: --secret-file F or ${SECRET_ENV} "
                            "(the master's --secret-file, or what the emulated cluster printed)")
        return new_secret()
    try:
        return load_secret(path)
    except (AuthError, OSError) as e:
        raise UserError(str(e)) from e


def _run_master(settings, http, spawn: bool, secret_file: str | None = None, forks=None) -> None:
    from edge_llm.cluster import StartupError, run_master
    from transport.loop import run_loop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run_loop(run_master(settings, http, spawn_workers=spawn, secret_file=secret_file, forks=forks))
    except (CheckpointError, PlanError, StartupError) as e:
        raise UserError(str(e)) from e
    except TimeoutError as e:
        raise UserError("workers did not all join in time; check their logs") from e


def cluster(args: argparse.Namespace) -> None:
    with _forked_devices(max(0, args.workers - 1) + max(0, args.attention_nodes)) as forks:
        _cluster(args, forks)


def _cluster(args: argparse.Namespace, forks) -> None:
    from edge.master import MasterSettings
    from edge_llm.cluster import HttpSettings, link_from_args

    settings = MasterSettings(model=_model_folder(args.model), world_size=args.workers, dtype=args.dtype,
                              quantize=args.quantize,
                              weights=_weights(args.weights, args.workers), secret=_secret(args.secret_file),
                              step_timeout=args.step_timeout,
                              link=link_from_args(args.link_latency_ms, args.link_bandwidth_mbps),
                              memory_budget_mb=args.memory_budget_mb, split_dir=args.split_dir,
                              keep_page_cache=args.keep_page_cache, allreduce=args.allreduce,
                              attention_nodes=args.attention_nodes, max_batch=args.max_batch)
    if args.max_batch < 1:
        raise UserError("--max-batch must be at least 1")
    from scheduler.cloud import CloudSettings

    cloud = CloudSettings(url=args.cloud, model=args.cloud_model,
                          api_key=os.environ.get(args.cloud_api_key_env)) if args.cloud else None
    from scheduler.router import Policy

    if not 0 < args.edge_kv_fraction <= 1:
        raise UserError("--edge-kv-fraction must be in (0, 1]")
    policy = Policy(edge_kv_fraction=args.edge_kv_fraction, offload_above_tokens=args.offload_above_tokens,
                    cloud_above_tokens=args.cloud_above_tokens)
    http = HttpSettings(args.host, args.port, args.served_name, max_running=args.max_running,
                        max_queue=args.max_queue, request_timeout=args.request_timeout,
                        body_timeout=args.body_timeout, drain_timeout=args.drain_timeout,
                        api_key=args.api_key or os.environ.get("EDGE_LLM_API_KEY"), cloud=cloud, policy=policy,
                        speculation=speculation_settings(args))
    _run_master(settings, http, spawn=True, secret_file=args.secret_file or _private_secret_file(settings.secret),
                forks=forks)


def _private_secret_file(secret: bytes) -> str:
    """The emulated cluster's own secret in a file only this user reads (removed at exit), so a
    worker that died can be restarted by hand as the cluster prints."""
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="edge-llm-"))
    path = folder / "secret"
    path.touch(mode=0o600)
    path.write_bytes(secret)
    atexit.register(shutil.rmtree, folder, True)
    return str(path)


def _cluster_config(path: str):
    from edge_llm.config import ConfigError, load_cluster_config

    try:
        return load_cluster_config(path)
    except ConfigError as e:
        raise UserError(str(e)) from e


def serve(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from transport.fastpath import set_poll_us

    set_poll_us(args.poll_us, args.poll_yield)
    cfg = _cluster_config(args.config)
    cfg = replace(cfg, model=_model_folder(cfg.model), dtype=args.dtype or cfg.dtype,
                  quantize=args.quantize or cfg.quantize)
    http = replace(cfg.http, api_key=args.api_key or os.environ.get("EDGE_LLM_API_KEY"),  # never in the file
                   drain_timeout=args.drain_timeout)
    if args.speculate or args.draft_model:  # the command line overrides the file's [speculate] table
        http = replace(http, speculation=speculation_settings(args))
    _run_master(cfg.master_settings(_secret(cfg.secret_file)), http, spawn=False)


def worker(args: argparse.Namespace) -> None:
    from edge.rejoin import StopJoining
    from edge.slices import PlanRefused
    from edge.worker import WorkerSettings
    from edge_llm.cluster import link_from_args, run_worker
    from transport.fastpath import set_poll_us
    from transport.loop import run_loop

    model, master, secret_file = _model_folder(args.model), args.master, args.secret_file
    if args.config:
        cfg = _cluster_config(args.config)
        model = model or _model_folder(cfg.model)
        master = master or f"{cfg.master_host}:{cfg.worker_port}"
        secret_file = secret_file or cfg.secret_file
    if not master or ":" not in master:
        raise UserError("a worker needs --master HOST:PORT (or --config); without --model it fetches "
                        "its shard files from the master into --split-dir")
    host, port = master.rsplit(":", 1)
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise UserError(f"--master {master!r} is not HOST:PORT with a port in 1..65535")
    if args.role == "attention":
        _attention_node(args, host, int(port), secret_file)
        return
    if model is not None:  # a folder that is no checkpoint: said now, not after the master is reached
        _check_checkpoint(model)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{args.rank or '?'} %(levelname)s %(message)s")
    settings = WorkerSettings(model=model, rank=args.rank, master_host=host, master_port=int(port),
                              secret=_secret(secret_file, required=True), step_timeout=args.step_timeout,
                              link=link_from_args(args.link_latency_ms, args.link_bandwidth_mbps),
                              memory_budget_mb=args.memory_budget_mb, split_dir=args.split_dir,
                              keep_page_cache=args.keep_page_cache, dtype=args.dtype, quantize=args.quantize,
                              master_timeout=args.master_timeout)
    set_poll_us(args.poll_us, args.poll_yield)
    try:
        run_loop(run_worker(settings, args.threads or __import__("torch").get_num_threads()))
    except (CheckpointError, PlanError, PlanRefused, StopJoining) as e:
        raise UserError(str(e)) from e


def _check_checkpoint(folder: str) -> None:
    from models.config import load_config

    try:
        load_config(Path(folder))
    except CheckpointError as e:
        raise UserError(str(e)) from e


def _attention_node(args: argparse.Namespace, host: str, port: int, secret_file: str | None) -> None:
    from edge.attention import AttentionNodeSettings, NodeRefused
    from edge.rejoin import StopJoining
    from edge_llm.cluster import link_from_args, run_attention_node
    from transport.loop import run_loop

    if args.node is None:
        raise UserError("an attention node needs --node K (0..K-1)")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s attn{args.node} %(levelname)s %(message)s")
    settings = AttentionNodeSettings(node=args.node, master_host=host, master_port=port,
                                     secret=_secret(secret_file, required=True),
                                     link=link_from_args(args.link_latency_ms, args.link_bandwidth_mbps),
                                     master_timeout=args.master_timeout)
    try:
        run_loop(run_attention_node(settings, args.threads or __import__("torch").get_num_threads()))
    except (NodeRefused, StopJoining) as e:
        raise UserError(str(e)) from e


def split(args: argparse.Namespace) -> None:
    from edge.split import split_model

    weights = _weights(args.weights, args.workers)
    if weights == "auto":
        raise UserError("split needs explicit --weights (the cluster splits by itself under --weights auto)")
    try:
        out = split_model(_model_folder(args.model), args.workers, weights, args.out, dtype=args.dtype,
                          quantize=args.quantize)
    except (CheckpointError, PlanError) as e:
        raise UserError(str(e)) from e
    print(f"split {args.model} for {args.workers} workers into {out}")
