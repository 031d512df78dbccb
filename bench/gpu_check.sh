#!/usr/bin/env bash
# GPU check (issue 5): Fisher diagonal + top-5 eigenvalues and an 11x11 landscape on a
# 0.5B Qwen2 (bf16, from config) over 64 x 512-token probe sequences, under max_memory_gb=20.
# Prints each metric's plan, measured peak and time; stops after 8 minutes in any case.
# Issue 16: the Trainer with fsdp="full_shard" (FSDP2, sharded checkpoints) + UMACallback under
# torchrun (2 processes with 2 GPUs, else 1): prints fsdp_params_are_dtensor=1/0 (checked inside
# the callback), fsdp_metrics_ok, and the backfill of its DCP checkpoints (dcp_backfill_*).
# Usage: bash bench/gpu_check.sh [metrics|fsdp] [gpu_check.py args]   (default: both; from any folder;
#        python: $PYTHON or .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
MODE=all
if [ "$#" -gt 0 ] && { [ "$1" = metrics ] || [ "$1" = fsdp ]; }; then MODE="$1"; shift; fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
if [ "$MODE" != fsdp ]; then
  timeout 470 "$PYTHON" bench/gpu_check.py --max-memory-gb 20 "$@" || echo "gpu_check metrics: exit $?"
fi
if [ "$MODE" != metrics ]; then
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  NPROC=$(( NGPU >= 2 ? 2 : 1 )); CPU=""
  if [ "$NGPU" -eq 0 ]; then NPROC=2; CPU=--cpu; fi  # no GPU: a functional check only (Accelerate runs DDP on CPU)
  timeout 300 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" bench/gpu_check.py --fsdp-trainer $CPU \
    || echo "gpu_check fsdp: exit $?"
fi
