#!/usr/bin/env bash
# Tiny preset on CPU under torchrun (gloo). Usage:
#   examples/tiny/run_torchrun.sh                 # 2 processes, DP=2
#   examples/tiny/run_torchrun.sh 2 parallel.tp=2 # 2 processes, TP=2 + sequence parallel
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${1:-2}
shift || true

LAUNCH_ARGS=(--standalone --nproc-per-node "$NPROC")
RUN_ARGS=(--config examples/tiny/tiny.yaml train.run_dir=runs/tiny_torchrun)

exec .venv/bin/torchrun "${LAUNCH_ARGS[@]}" pretrain/pretrain_step.py "${RUN_ARGS[@]}" "$@"
