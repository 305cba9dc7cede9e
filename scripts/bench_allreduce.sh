#!/usr/bin/env bash
# Every all-reduce row of bench/allreduce.{json,md}: loopback decode-sized messages on 2 and 4
# processes, then emulated edge links (latency-bound and bandwidth-bound).
set -euo pipefail
cd "$(dirname "$0")/.."
B=".venv/bin/python scripts/bench_allreduce.py"
$B --workers 2 --size 4096 --iters 2000 --json
$B --workers 4 --size 4096 --iters 2000 --json
$B --workers 4 --size 4194304 --iters 20 --json
$B --workers 2 --size 4096 --iters 30 --link-latency-ms 5 --json
$B --workers 4 --size 4096 --iters 30 --link-latency-ms 5 --json
$B --workers 4 --size 262144 --iters 5 --link-latency-ms 1 --link-bandwidth-mbps 10 --json
