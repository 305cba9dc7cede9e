#!/usr/bin/env bash
# Sets up .venv with the test extras and runs the whole suite. Extra args go to pytest ("-n 0" runs
# it in one process).
# One pytest worker per core, at most 4, each test file on one worker (its module fixtures made
# once): most tests wait on processes they started, so two workers on this 2-core host took the
# suite from 740 to 462 s.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -n auto --maxprocesses 4 --dist loadfile "$@"
