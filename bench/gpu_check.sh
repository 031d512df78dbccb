#!/usr/bin/env bash
# GPU check (issue 5): Fisher diagonal + top-5 eigenvalues and an 11x11 landscape on a
# 0.5B Qwen2 (bf16, from config) over 64 x 512-token probe sequences, under max_memory_gb=20.
# Prints each metric's plan, measured peak and time; stops after 8 minutes in any case.
# Usage: bash bench/gpu_check.sh   (from the repository root; python: $PYTHON or .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
timeout 470 "$PYTHON" bench/gpu_check.py --max-memory-gb 20 "$@"
