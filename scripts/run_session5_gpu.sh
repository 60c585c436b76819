#!/usr/bin/env bash
# One device call for this tree's GPU measurements (results under $OUT): the runtime redesign's
# one-GPU bench (scripts/run_redesign_gpu.sh: shared, 8 models) and issue 13's trace sweep
# (scripts/run_trace_gpu.sh: static vs shared), each part under its own time limit.
#   run(command="bash scripts/run_session5_gpu.sh", carry=[".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-gpu_logs}"
mkdir -p "$OUT"
TIMEOUT="${MODES_TIMEOUT:-260}" bash scripts/run_redesign_gpu.sh 2>&1 | tail -30
RATES="${RATES:-2,8}" DURATION_S="${DURATION_S:-8}" WARMUP_S="${WARMUP_S:-4}" RUN_TIMEOUT="${RUN_TIMEOUT:-140}" \
  timeout "${TRACE_TIMEOUT:-300}" bash scripts/run_trace_gpu.sh 2>&1 | tail -40
echo "session5 done"
