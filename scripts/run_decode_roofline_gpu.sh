#!/usr/bin/env bash
# Issue 18's one-GPU measurement, an earlier tree against this one (results under $OUT):
#   1. this tree's gpu-marked layer_matmul tests and the layer-matmul rows of bench_kernels
#      (a scanned layer of Qwen3-30B-A3B's q/k/o projections: XLA's dot of the slice against
#      `layer_matmul` in place, beside the copy ceiling);
#   2. per tree of TREES (default "before ."; TREES= for none): scripts/profile_decode.py --kernels (PROFILE=0: none) on an 8-layer
#      Qwen3-30B-A3B shape at batch 1 (kernels per token and per layer, memcpy, busy vs span),
#      then scripts/bench_engine.py on the LAYERS-layer shape (default 40) at each batch of
#      BATCHES (default 1) against the roofline of the bytes a step reads.
#   run(command="bash scripts/run_decode_roofline_gpu.sh", carry=[".whl", "before"])
# before/ (git-ignored): `git archive <commit>` of the earlier tree.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_run_setup.sh
if [ "${KERNELS:-1}" = 1 ]; then
  CROSSPOOL_TEST_ON_GPU=1 PYTHONPATH=. timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -m gpu \
    tests/pallas_kernels/test_grouped_matmul.py -k layer_matmul -p no:cacheprovider 2>&1 | tail -4 | tee "$LOG/gpu_tests.log"
  PYTHONPATH=. timeout "${BENCH_TIMEOUT:-120}" python3 scripts/bench_kernels.py --layer-matmul-only \
    --json "$LOG/bench_layer_matmul.json" 2>&1 | quiet | grep -v "^{" | tail -14
fi
for tree in ${TREES-before .}; do
  [ -d "$tree" ] || { echo "no tree $tree: skipped"; continue; }
  name="$(basename "$(cd "$tree" && pwd)")"
  if [ "${PROFILE:-1}" = 1 ]; then
    (cd "$tree" && PYTHONPATH=. timeout "${PROFILE_TIMEOUT:-90}" python3 scripts/profile_decode.py \
      --random_config qwen3moe-30b-a3b-4l:8 --requests 1 --tokens 24 --kernels 2>&1 | quiet \
      > "$LOG/profile_$name.txt"); tail -22 "$LOG/profile_$name.txt"
  fi
  for b in ${BATCHES:-1}; do
    (cd "$tree" && PYTHONPATH=. timeout "${ENGINE_TIMEOUT:-150}" python3 scripts/bench_engine.py \
      --random_config "qwen3moe-30b-a3b-4l:${LAYERS:-40}" --num_prompts "$b" --prompt_len 512 --max_tokens 64 \
      --max_decode_steps 8 2>&1 | quiet > "$LOG/engine_${name}_b$b.txt"); tail -8 "$LOG/engine_${name}_b$b.txt"
  done
done
echo "decode roofline run done"
