#!/usr/bin/env bash
# One device call for the one-GPU measurements (results under $OUT): optionally whether a served
# step keeps the KV pool in place (DONATION=1: scripts/check_pool_donation.py), the runtime
# redesign's bench (scripts/run_redesign_gpu.sh: shared, 8 models) and the host's share of a
# decode step (PROFILE=1: scripts/profile_decode.py, 8 copies of one architecture as 4-lane
# programs) for each tree of TREES (default: an earlier tree in baseline/, then this one, each in
# a fresh process), then this tree again with the engine's variants (VARIANTS, default
# "pipeline": `--pipeline_models`; "steps8": 8 decode tokens per dispatch, the engine's default;
# "sync" and "steps8sync": the same without async scheduling (`--noasync_scheduling`; the
# engine's runs above and "steps8" have it on, its default); each in a fresh process sharing a
# persistent compilation cache, so their warm-ups are short),
# then issue 13's trace sweep (TRACE=1: scripts/run_trace_gpu.sh: static vs shared), each part
# under its own time limit.
#   run(command="bash scripts/run_one_gpu.sh", carry=[".whl", "baseline"])
# baseline/ (git-ignored): `git archive <commit>` of the earlier tree with this tree's
# scripts/bench_modes.py, crosspool_jax/runtime/compiles.py and crosspool_jax/bench/latency.py
# copied in (bench_modes imports them). The profile runs in trees whose profile_decode.py has
# --copies (since 389a6fc; e.g. TREES="before ." with before/ = `git archive 6021a31`, the tree
# before PackedArrays, and this tree's profile_decode.py copied in).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:-gpu_logs}"
export OUT="$(cd "${OUT:-gpu_logs}" && pwd)"         # absolute: the parts run inside each tree
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}"   # 75% (JAX's default) is 59 GiB of an H100
if [ "${DONATION:-0}" = 1 ]; then     # does a served step keep the pool in place (BENCHMARKS.md, part 2)?
  PYTHONPATH=. timeout 120 python3 scripts/check_pool_donation.py --random_config olmoe-1b-7b-4l 2>&1 \
    | grep -v "^[IW][0-9]\{4\} " | tee "$OUT/pool_donation.txt" | tail -16
fi
# one persistent compilation cache for the runs of this call: the variants reuse this tree's programs
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/crosspool_jax_cache}" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
for tree in ${TREES:-baseline .}; do
  [ -d "$tree" ] || { echo "no tree $tree: skipped"; continue; }
  TREE="$tree" TIMEOUT="${MODES_TIMEOUT:-180}" DEVICE_GIB="${DEVICE_GIB:-64}" bash scripts/run_redesign_gpu.sh 2>&1 | tail -25
  if [ "${PROFILE:-1}" = 1 ] && grep -q "_COPIES" "$tree/scripts/profile_decode.py"; then
    (cd "$tree" && PYTHONPATH=. timeout "${PROFILE_TIMEOUT:-90}" python3 scripts/profile_decode.py \
      --random_config qwen3moe-30b-a3b-4l --copies 8 --max_lanes 4 --tokens 24 --kv_pool_bytes 8589934592 2>&1 \
      | grep -v "^[IW][0-9]\{4\} " | tee "$OUT/profile_decode_$(basename "$(cd "$tree" && pwd)").txt" | tail -8)
  fi
done
for variant in ${VARIANTS-pipeline steps8}; do
  case "$variant" in
    pipeline) steps=1 args=--pipeline_models ;;
    steps8) steps=8 args= ;;
    sync) steps=1 args=--noasync_scheduling ;;
    steps8sync) steps=8 args=--noasync_scheduling ;;
    *) echo "unknown variant $variant: skipped"; continue ;;
  esac
  NAME="this_$variant" STEPS="$steps" BENCH_ARGS="$args" TREE=. TIMEOUT="${VARIANT_TIMEOUT:-200}" \
    DEVICE_GIB="${DEVICE_GIB:-64}" bash scripts/run_redesign_gpu.sh 2>&1 | tail -25
done
if [ "${TRACE:-0}" = 1 ]; then
  RATES="${RATES:-2,16}" DURATION_S="${DURATION_S:-8}" WARMUP_S="${WARMUP_S:-4}" RUN_TIMEOUT="${RUN_TIMEOUT:-110}" \
    timeout "${TRACE_TIMEOUT:-230}" bash scripts/run_trace_gpu.sh 2>&1 | tail -40
fi
echo "one-gpu suite done"
