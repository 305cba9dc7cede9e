#!/usr/bin/env bash
# The main job on a fresh machine: set up, make the default (tiny) model, answer a prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${EDGE_LLM_MODEL:-models-cache/tiny}
[ -f "$MODEL/config.json" ] || .venv/bin/edge-llm make-model "$MODEL" --preset tiny
exec .venv/bin/edge-llm generate --model "$MODEL" --max-tokens 24 "${1:-The edge is}"
