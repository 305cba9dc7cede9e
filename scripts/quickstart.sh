#!/usr/bin/env bash
# The main job on a fresh machine: set up, make the default (tiny) model, start an emulated
# 2-device cluster, answer a prompt over the OpenAI-compatible HTTP API, stop the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${EDGE_LLM_MODEL:-models-cache/tiny}
[ -f "$MODEL/config.json" ] || .venv/bin/edge-llm make-model "$MODEL" --preset tiny
exec .venv/bin/python scripts/demo.py "$MODEL" "${1:-The edge is}"
