#!/usr/bin/env bash
# One device call for the one-GPU measurements (results under $OUT): whether a served step keeps
# the KV pool in place (scripts/check_pool_donation.py), the runtime redesign's
# bench (scripts/run_redesign_gpu.sh: shared, 8 models) for each tree of TREES (default: an
# earlier tree in baseline/, then this one, each mode in a fresh process), then issue 13's trace
# sweep (scripts/run_trace_gpu.sh: static vs shared), each part under its own time limit.
#   run(command="bash scripts/run_one_gpu.sh", carry=[".whl", "baseline"])
# baseline/ (git-ignored): `git archive <commit>` of the earlier tree with this tree's
# scripts/bench_modes.py, crosspool_jax/runtime/compiles.py and crosspool_jax/bench/latency.py
# copied in (bench_modes imports them).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-gpu_logs}"
mkdir -p "$OUT"
if [ "${DONATION:-1}" = 1 ]; then     # does a served step keep the pool in place (BENCHMARKS.md, part 2)?
  PYTHONPATH=. timeout 120 python3 scripts/check_pool_donation.py --random_config olmoe-1b-7b-4l 2>&1 \
    | grep -v "^[IW][0-9]\{4\} " | tee "$OUT/pool_donation.txt" | tail -16
fi
for tree in ${TREES:-baseline .}; do
  [ -d "$tree" ] || { echo "no tree $tree: skipped"; continue; }
  TREE="$tree" TIMEOUT="${MODES_TIMEOUT:-180}" bash scripts/run_redesign_gpu.sh 2>&1 | tail -25
done
if [ "${TRACE:-1}" = 1 ]; then
  RATES="${RATES:-2,16}" DURATION_S="${DURATION_S:-8}" WARMUP_S="${WARMUP_S:-4}" RUN_TIMEOUT="${RUN_TIMEOUT:-110}" \
    timeout "${TRACE_TIMEOUT:-230}" bash scripts/run_trace_gpu.sh 2>&1 | tail -40
fi
echo "one-gpu suite done"
