"""`edge-llm`: the one command-line entry point. It parses arguments and calls; nothing more."""

from __future__ import annotations

import argparse
import sys

from edge_llm import commands
from edge_llm.argtypes import (
    OneLineParser,
    fraction,
    non_negative_float,
    non_negative_int,
    port,
    positive_float,
    positive_int,
    temperature,
    top_p,
)
from models.drafting import MAX_DRAFT_TOKENS, SPECULATE_CHOICES
from models.dtypes import DTYPE_CHOICES
from models.quant import QUANT_CHOICES


def _dtype_flag(p: argparse.ArgumentParser, what: str = "hold weights (and activations, KV) in") -> None:
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES),
                   help=f"{what}; auto (default) = the checkpoint's own torch_dtype")


def _quantize_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default="auto", choices=list(QUANT_CHOICES),
                   help="weight-only quantization of the Linear layers and the LM head: int8 (per output "
                        "channel), int4 (groups of 32, scale + min), none (floats), or auto (default: as the "
                        "checkpoint stores them; a GGUF's Q8_0/Q4_0/Q4_1 blocks are kept)")


def _poll_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--poll-us", type=non_negative_int, default=0,
                   help="microseconds an all-reduce polls for its peers' data before it sleeps (faster "
                        "on a device whose cores are its own; 0: never)")
    p.add_argument("--poll-yield", action="store_true",
                   help="while polling, give the core to other runnable processes between tries (for "
                        "devices that share cores)")


def _speculate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", choices=list(SPECULATE_CHOICES),
                   help="speculative decoding: ngram (drafts looked up in the prompt and output so far), "
                        "draft (a small --draft-model on the master device) or off (default: draft when "
                        "--draft-model is given, else off); greedy output is unchanged, sampling keeps its "
                        "distribution")
    p.add_argument("--num-draft-tokens", type=positive_int, default=4,
                   help=f"tokens drafted per step at most, 1..{MAX_DRAFT_TOKENS} (default 4)")
    p.add_argument("--draft-policy", default="adaptive", choices=["adaptive", "fixed"],
                   help="adaptive (default): per request, draft as many as pay off by the measured acceptance "
                        "rate and step time (none when they do not); fixed: always --num-draft-tokens")
    p.add_argument("--draft-model", help="a small checkpoint folder with the served model's tokenizer")


def _make_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-model", help="write a random-initialised Llama checkpoint (HF layout)", description="write a random-initialised Llama checkpoint (HF layout)")
    p.add_argument("out", help="the folder to write (must be new or empty)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium", "large"],
                   help="model size: tiny/small for tests, medium ~330 MB, large ~2.3 GB in float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the dtype the weights are saved in (default float32)")
    p.set_defaults(func=commands.make_model)


def _import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="convert a GGUF checkpoint into a Hugging Face-layout folder", description="convert a GGUF checkpoint into a Hugging Face-layout folder")
    p.add_argument("gguf", help="MODEL.gguf (llama or qwen2 architecture)")
    p.add_argument("out", help="the folder to write (config.json, model.safetensors, tokenizer files)")
    _dtype_flag(p, "the dtype the weights are written in (quantized tensors are dequantized to it)")
    p.set_defaults(func=commands.import_gguf)


def _generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="one-shot generation, streamed to the terminal", description="one-shot generation, streamed to the terminal")
    p.add_argument("--model", required=True, help="a Hugging Face model folder or a .gguf file")
    p.add_argument("prompt_text", nargs="?", help="the prompt (same as --prompt)")
    p.add_argument("--prompt", help="the prompt text")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of text")
    p.add_argument("--chat", action="store_true", help="render the prompt as a user chat message")
    p.add_argument("--workers", type=positive_int, default=1, help="emulated devices (default 1: this process)")
    p.add_argument("--max-tokens", type=positive_int, default=32, help="tokens to generate at most")
    p.add_argument("--temperature", type=temperature, default=0.0, help="0..2; 0 is greedy")
    p.add_argument("--top-p", type=top_p, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0: no limit")
    p.add_argument("--seed", type=int, help="sampling seed (default: a random one)")
    p.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--json", action="store_true", help="print token ids and logprobs as JSON")
    _dtype_flag(p)
    _quantize_flag(p)
    _speculate_flags(p)
    p.set_defaults(func=commands.generate)


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="device weights, e.g. 2,1,1 (heads, MLP columns and vocabulary in "
                                     "proportion), or 'auto' from what each device measures at start")
    p.add_argument("--step-timeout", type=positive_float, default=5.0, help="seconds a step waits for a worker")
    p.add_argument("--link-latency-ms", type=non_negative_float, default=0.0,
                   help="emulated latency added to every message between devices")
    p.add_argument("--link-bandwidth-mbps", type=non_negative_float, default=0.0,
                   help="emulated bandwidth of every link between devices (0: unlimited)")
    p.add_argument("--allreduce", default="star", choices=["star", "ring", "auto"],
                   help="star (default: 2 hops, best on latency-bound links), ring, or auto (per message "
                        "size from link latency and bandwidth measured at start)")
    p.add_argument("--memory-budget-mb", type=positive_float,
                   help="per-device budget for weights + KV reserve; layers beyond it stream from disk")
    p.add_argument("--split-dir", help="per-layer shard files (default: MODEL.edge-split beside the model)")
    p.add_argument("--keep-page-cache", action="store_true",
                   help="leave streamed layers in the OS page cache (default: drop them, as a "
                        "memory-starved device would have to)")
    p.add_argument("--max-batch", type=positive_int, default=16,
                   help="decode steps of concurrent requests that run as one batched forward (1: no batching)")
    p.add_argument("--attention-nodes", type=non_negative_int, default=0,
                   help="attention-offload nodes (Lamina): they hold offloaded requests' KV caches "
                        "and compute their attention; the router sends long contexts there")
    _dtype_flag(p)
    _quantize_flag(p)


def _cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="emulate an N-device cluster on this machine and serve HTTP", description="emulate an N-device cluster on this machine and serve HTTP")
    p.add_argument("--model", required=True, help="a Hugging Face model folder or a .gguf file")
    p.add_argument("--workers", type=positive_int, default=2, help="N devices: rank 0 + N-1 worker processes")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on")
    p.add_argument("--port", type=port, default=8000, help="HTTP port (0 picks a free one)")
    p.add_argument("--served-name", help="the model name the API answers to (default: the folder's name)")
    p.add_argument("--secret-file", help="cluster secret (default: a fresh random one)")
    p.add_argument("--max-running", type=positive_int, default=16, help="sequences generating at once (a request counts one per choice it generates)")
    p.add_argument("--max-queue", type=non_negative_int, default=64, help="requests waiting; beyond it 429")
    p.add_argument("--request-timeout", type=positive_float, default=600.0, help="seconds per request")
    p.add_argument("--drain-timeout", type=non_negative_float, default=10.0,
                   help="on SIGTERM / Ctrl-C, seconds requests in flight may finish (a second signal stops at once)")
    p.add_argument("--body-timeout", type=positive_float, default=30.0,
                   help="seconds a request's body may take to arrive (a client that stalls gets 408)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: the "
                                     "EDGE_LLM_API_KEY environment variable, else none)")
    p.add_argument("--cloud", help="base URL (with /v1) of an OpenAI-compatible cloud tier")
    p.add_argument("--cloud-model", help="model name on the cloud tier (default: the request's)")
    p.add_argument("--cloud-api-key-env", default="EDGE_LLM_CLOUD_API_KEY",
                   help="environment variable holding the cloud tier's API key")
    p.add_argument("--edge-kv-fraction", type=fraction, default=0.5,
                   help="routing: share of a compute device's free memory KV caches may take")
    p.add_argument("--offload-above-tokens", type=non_negative_int,
                   help="routing: contexts (prompt + max_tokens) above this go to the attention nodes")
    p.add_argument("--cloud-above-tokens", type=non_negative_int,
                   help="routing: contexts above this go to the cloud tier")
    _cluster_flags(p)
    _speculate_flags(p)
    p.set_defaults(func=commands.cluster)


def _serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the master device of a real cluster from a TOML config", description="run the master device of a real cluster from a TOML config")
    p.add_argument("--config", required=True, help="cluster TOML (see configs/cluster.example.toml)")
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES),
                   help="hold weights in this dtype (default: the config's `dtype`, else auto)")
    p.add_argument("--quantize", choices=list(QUANT_CHOICES),
                   help="auto | none | int8 | int4 (default: the config's `quantize`, else auto)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: the "
                                     "EDGE_LLM_API_KEY environment variable, else none)")
    p.add_argument("--drain-timeout", type=non_negative_float, default=10.0,
                   help="on SIGTERM / Ctrl-C, seconds requests in flight may finish (a second signal stops at once)")
    _poll_flag(p)
    _speculate_flags(p)
    p.set_defaults(func=commands.serve)


def _worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run one worker device, which joins the master", description="run one worker device, which joins the master")
    p.add_argument("--config", help="cluster TOML (gives model, master address, secret file)")
    p.add_argument("--role", default="compute", choices=["compute", "attention"],
                   help="compute: a tensor-parallel rank (--rank); attention: an attention-offload "
                        "node (--node) that holds KV caches and needs no checkpoint")
    p.add_argument("--rank", type=positive_int,
                   help="compute rank, 1..N-1 (default: the master gives the lowest rank not connected)")
    p.add_argument("--node", type=non_negative_int, help="attention node index, 0..K-1")
    p.add_argument("--model", help="this device's copy of the model (without it: fetch the shard from the master)")
    p.add_argument("--master", help="HOST:PORT where the master accepts workers")
    p.add_argument("--secret-file", help="the cluster secret shared with the master (or $EDGE_LLM_SECRET); "
                                         "required")
    p.add_argument("--master-timeout", type=positive_float, default=300.0,
                   help="seconds without a reachable master after which the device exits")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--step-timeout", type=positive_float, default=5.0, help="seconds an all-reduce waits")
    _poll_flag(p)
    p.add_argument("--link-latency-ms", type=non_negative_float, default=0.0, help="emulated latency to the master")
    p.add_argument("--link-bandwidth-mbps", type=non_negative_float, default=0.0,
                   help="emulated bandwidth to the master (0: unlimited)")
    p.add_argument("--memory-budget-mb", type=positive_float,
                   help="budget for weights + KV reserve; layers beyond it stream from disk (default: all resident)")
    p.add_argument("--split-dir", help="this device's per-layer shard files")
    p.add_argument("--keep-page-cache", action="store_true", help="leave streamed layers in the OS page cache")
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES),
                   help="refuse to join unless the master holds weights in this dtype (default: the master's)")
    p.add_argument("--quantize", choices=list(QUANT_CHOICES),
                   help="refuse to join unless the master quantizes weights so (default: the master's)")
    p.set_defaults(func=commands.worker)


def _split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="write per-rank, per-layer shard files (resumable, checksummed)", description="write per-rank, per-layer shard files (resumable, checksummed)")
    p.add_argument("model", help="a Hugging Face model folder or a .gguf file")
    p.add_argument("--workers", type=positive_int, required=True, help="N devices the split is for")
    p.add_argument("--weights", help="device weights, e.g. 2,1,1 (default: even)")
    p.add_argument("--out", help="default: MODEL.edge-split beside the model (MODEL.edge-split-DTYPE "
                                 "for bfloat16/float16, -int8/-int4 when quantized)")
    _dtype_flag(p, "the dtype the shard files hold")
    _quantize_flag(p)
    p.set_defaults(func=commands.split)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="edge-llm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_make_model, _import, _generate, _split, _cluster, _serve, _worker):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except commands.UserError as e:
        print(f"edge-llm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
