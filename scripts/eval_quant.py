"""Quality of int8 / int4 weights on a real model: the default model (SmolLM2-135M-Instruct, shipped
as a Q4_1 GGUF) against its own float32 dequantized weights, over a few thousand tokens of real
text (the docstrings of Python's standard library). Writes bench/quant_quality.json and .md.

    .venv/bin/python scripts/eval_quant.py [--model X.gguf | DIR] [--tokens 4096]

Per format: the mean |logprob difference| of the text's tokens against the float32 reference, how
often the top-1 next token agrees, and each one's perplexity. Teacher-forced, 512-token windows.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import sysconfig
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.default_model import default_gguf  # noqa: E402
from models.gguf_import import imported_folder  # noqa: E402
from models.model import LocalModel  # noqa: E402
from models.quant import QuantWeight, quantize  # noqa: E402

MODULES = ["json/__init__.py", "textwrap.py", "argparse.py", "collections/__init__.py", "pathlib.py",
           "functools.py", "subprocess.py", "shutil.py", "string.py", "difflib.py", "heapq.py", "bisect.py"]
WINDOW = 512


def docstrings() -> str:
    """The docstrings of a dozen standard-library modules, in order (text no model here was tuned on)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in MODULES:
        path = stdlib / name
        if path.is_file():
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and ast.get_docstring(node):
                    texts.append(ast.get_docstring(node))
    return "\n\n".join(texts)


def requantized(model: LocalModel, method: str, head: bool = True) -> LocalModel:
    """`model` with every Linear weight (and with `head` the LM head) quantized by our own quantizer
    from its floats."""
    fields = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    def floats(w):
        return w.dequantize() if isinstance(w, QuantWeight) else w

    model.layers = [replace(w, **{f: quantize(floats(getattr(w, f)), method) for f in fields}) for w in model.layers]
    if head:
        model.head = replace(model.head, lm_head=quantize(model.head.lm_head, method))
    return model


@torch.inference_mode()
def token_logprobs(model: LocalModel, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs [S-1, V] of each next token, window by window (each window starts a fresh cache)."""
    out = []
    for start in range(0, len(ids) - 1, WINDOW):
        chunk = ids[start:start + WINDOW + 1]
        logits = model.forward(chunk[:-1], model.new_cache(len(chunk)), all_logits=True)  # [S, V]
        out.append(torch.log_softmax(logits.float(), -1))
    logprobs = torch.cat(out)
    targets = torch.tensor(ids[1:len(logprobs) + 1])
    return logprobs, targets


def compare(ref: tuple[torch.Tensor, torch.Tensor], got: tuple[torch.Tensor, torch.Tensor]) -> dict:
    (ref_lp, targets), (lp, _) = ref, got
    chosen_ref, chosen = ref_lp.gather(1, targets[:, None])[:, 0], lp.gather(1, targets[:, None])[:, 0]
    return {"mean_abs_logprob_diff": float((chosen - chosen_ref).abs().mean()),
            "max_abs_logprob_diff": float((chosen - chosen_ref).abs().max()),
            "top1_agreement": float((lp.argmax(-1) == ref_lp.argmax(-1)).float().mean()),
            "perplexity": math.exp(-float(chosen.mean()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a .gguf or a model folder (default: the default model)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", default="bench")
    args = parser.parse_args()
    source = Path(args.model) if args.model else default_gguf()
    folder = imported_folder(source) if source.suffix == ".gguf" else source
    systems = {
        "float32 (the file's weights, dequantized)": lambda: LocalModel(folder, "float32", "none"),
        "as shipped (--quantize auto: the file's blocks)": lambda: LocalModel(folder, "float32", "auto"),
        "int8 (--quantize int8: layers and LM head requantized per channel)":
            lambda: LocalModel(folder, "float32", "int8"),
        "int4 layers requantized from the float32 weights by our quantizer, LM head as shipped (Q8_0)":
            lambda: requantized(LocalModel(folder, "float32", "auto"), "int4", head=False),
        "int4 layers and an int4 LM head (why --quantize int4 keeps the head at int8)":
            lambda: requantized(LocalModel(folder, "float32", "none"), "int4"),
    }
    reference = LocalModel(folder, "float32", "none")
    ids = reference.tokenizer.encode(docstrings())[: args.tokens + 1]
    ref = token_logprobs(reference, ids)
    results = {"model": str(source), "tokens": len(ids) - 1, "systems": {}}
    for name, build in systems.items():
        results["systems"][name] = compare(ref, token_logprobs(build(), ids))
        print(name, results["systems"][name], flush=True)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "quant_quality.json").write_text(json.dumps(results, indent=2))
    lines = [f"Model: {source.name}, {results['tokens']} tokens of Python standard-library docstrings, "
             f"teacher-forced in {WINDOW}-token windows; reference: the same file's weights dequantized to float32.",
             "", "| weights | mean abs logprob diff | max abs logprob diff | top-1 agreement | perplexity |",
             "|---|---|---|---|---|"]
    for name, r in results["systems"].items():
        lines.append(f"| {name} | {r['mean_abs_logprob_diff']:.4f} | {r['max_abs_logprob_diff']:.3f} | "
                     f"{100 * r['top1_agreement']:.1f}% | {r['perplexity']:.2f} |")
    (out / "quant_quality.md").write_text("\n".join(lines) + "\n")
    print((out / "quant_quality.md").read_text())


if __name__ == "__main__":
    main()
