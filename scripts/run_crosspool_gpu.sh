#!/usr/bin/env bash
# Issue 4's GPU measurements (2 GPUs or more): whether the step programs run in place
# (scripts/check_step_memory.py: the placed step and the disaggregated 1+1 step on random
# models of real layer shapes), swap-in into the CrossPool arena (scripts/bench_swap.py) and the
# three memory modes side by side (scripts/bench_modes.py).
#   run(command="bash scripts/run_crosspool_gpu.sh", kind="nvidia-h200-x2")   logs under $OUT
# STEPS picks the parts (default "memory swap modes"); DEVICE_GIB, MODELS and the *_TIMEOUT
# variables size them (one device call allows 600 s: run "memory swap" and "modes" apart).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-gpu_logs}"
mkdir -p "$LOG"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
STEPS="${STEPS:-memory swap modes}"
quiet() { grep -v "^[IW][0-9]\{4\} "; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$LOG/gpu.txt"
if [[ " $STEPS " == *" memory "* ]]; then
  for args in "--random_config mixtral-8x7b-2l --kv_pool_bytes 4294967296" \
              "--random_config mixtral-8x7b-2l --crosspool_split 1+1 --kv_pool_bytes 8589934592" \
              "--random_config qwen3moe-30b-a3b-4l --crosspool_split 1+1 --kv_pool_bytes 8589934592"; do
    echo "== check_step_memory $args" | tee -a "$LOG/check_step_memory.log"
    timeout "${MEMORY_TIMEOUT:-120}" python3 scripts/check_step_memory.py $args 2>&1 | quiet \
      | tee -a "$LOG/check_step_memory.log"
  done
  # the placed step's remaining temp is one layer's attention weights (the scan's dynamic slice,
  # copied for the cuBLAS dot): does XLA's dynamic-slice fusion read it in place?
  echo "== check_step_memory placed, XLA dynamic-slice fusion on" | tee -a "$LOG/check_step_memory.log"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_dynamic_slice_fusion=true" timeout "${MEMORY_TIMEOUT:-120}" \
    python3 scripts/check_step_memory.py --random_config mixtral-8x7b-2l --kv_pool_bytes 4294967296 2>&1 | quiet \
    | tee -a "$LOG/check_step_memory.log"
fi
if [[ " $STEPS " == *" swap "* ]]; then
  timeout "${SWAP_TIMEOUT:-80}" python3 scripts/bench_swap.py --sizes_mib=1024 --devices=1 --arena_splits=1+1 \
    --arena_model=qwen3moe-30b-a3b-4l 2>&1 | tee "$LOG/bench_swap.log"
fi
if [[ " $STEPS " == *" modes "* ]]; then
  timeout "${MODES_TIMEOUT:-500}" python3 scripts/bench_modes.py --device_gib "${DEVICE_GIB:-40}" \
    --models "${MODELS:-mixtral-8x7b-2l,qwen3moe-30b-a3b-4l,mixtral-8x7b-2l,qwen3moe-30b-a3b-4l}" \
    --out "$LOG" 2>&1 | quiet | tee "$LOG/bench_modes.log"
fi
echo "done"
