#!/usr/bin/env bash
# One device call (2 GPUs; TESTS=tests/pallas_kernels on one): the gpu-marked tests of the kernels
# and of the disaggregated split, then where one kernel call's time goes
# (scripts/profile_kernels.py). Logs under $OUT. (No commit file: the device copy's git
# metadata can be stale; record the commit on this side.)
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-gpu_logs}"; mkdir -p "$LOG"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$LOG/gpu.txt" 2>&1
CROSSPOOL_TEST_ON_GPU=1 timeout "${TEST_TIMEOUT:-260}" python3 -m pytest -q -m gpu \
  ${TESTS:-tests/disagg tests/pallas_kernels} -p no:cacheprovider > "$LOG/gpu_tests.log" 2>&1
echo "tests rc=$?"; tail -5 "$LOG/gpu_tests.log"
timeout "${PROFILE_TIMEOUT:-200}" python3 scripts/profile_kernels.py --json "$LOG/profile.json" \
  ${CASES:+--cases "$CASES"} > "$LOG/profile.log" 2>&1
echo "profile rc=$?"; cat "$LOG/profile.log" | cut -c1-160 | tail -120
