#!/usr/bin/env bash
# Issue 4's GPU measurements in one device call (2 GPUs or more): the three memory modes side by
# side (scripts/bench_modes.py), swap-in into the CrossPool arena (scripts/bench_swap.py) and
# whether the step programs update the KV pool in place (scripts/check_step_memory.py).
#   run(command="bash scripts/run_crosspool_gpu.sh", kind="nvidia-h200-x2")   logs under $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-gpu_logs}"
mkdir -p "$LOG"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$LOG/gpu.txt"
timeout "${MODES_TIMEOUT:-400}" python3 scripts/bench_modes.py --device_gib "${DEVICE_GIB:-16}" \
  --models "${MODELS:-mixtral-8x7b-2l,qwen3moe-30b-a3b-4l,mixtral-8x7b-2l,qwen3moe-30b-a3b-4l}" \
  --out "$LOG" 2>&1 | grep -v "^[IW][0-9]\{4\} " | tee "$LOG/bench_modes.log"
timeout "${SWAP_TIMEOUT:-80}" python3 scripts/bench_swap.py --sizes_mib=1024 --devices=1 --arena_splits=1+1 \
  --arena_model=qwen3moe-30b-a3b-4l 2>&1 | tee "$LOG/bench_swap.log"
timeout "${MEMORY_TIMEOUT:-60}" python3 scripts/check_step_memory.py --kv_pool_bytes 4294967296 2>&1 \
  | grep -v "^[IW][0-9]\{4\} " | tee "$LOG/check_step_memory.log"
echo "done"
