#!/usr/bin/env bash
# The runtime redesign's one-GPU measurement: `shared` with 8 random-weight models of real layer
# shapes on ONE GPU, today's code against an earlier tree, each in a fresh process
# (scripts/bench_modes.py; results and logs under $OUT).
#   TREE=baseline  bash scripts/run_redesign_gpu.sh     # baseline/: an earlier commit's
#                                                       # crosspool_jax, pallas_kernels and scripts,
#                                                       # with this tree's bench_modes.py copied in
#   TREE=.         bash scripts/run_redesign_gpu.sh     # this tree
# MODELS, DEVICE_GIB, STEPS (max_decode_steps), PROMPT_LEN, MAX_TOKENS and TIMEOUT size it;
# BENCH_ARGS adds flags of bench_modes.py (e.g. --max_logprobs=0, --pipeline_models, or
# --noasync_scheduling for this tree's synchronous steps: async scheduling is the engine's default).
# One mode per run, in this process (--nofresh_process: `timeout` then stops the whole run).
# .whl/ (git-ignored; carry it) holds wheels the device image lacks (absl-py, fastapi, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_run_setup.sh          # LOG is absolute: the bench runs inside $TREE
TREE="${TREE:-.}"
NAME="${NAME:-$(basename "$(cd "$TREE" && pwd)")}"
MODELS="${MODELS:-qwen3moe-30b-a3b-4l,mixtral-8x7b-2l,qwen3moe-30b-a3b-4l,mixtral-8x7b-2l,qwen3moe-30b-a3b-4l,mixtral-8x7b-2l,qwen3moe-30b-a3b-4l,mixtral-8x7b-2l}"
cd "$TREE"
echo "== $NAME ($(pwd)): shared, models $MODELS" | tee "$LOG/bench_modes_$NAME.log"
PYTHONPATH=. timeout "${TIMEOUT:-540}" python3 scripts/bench_modes.py --modes shared \
  --device_gib "${DEVICE_GIB:-70}" --models "$MODELS" --max_decode_steps "${STEPS:-1}" \
  --prompt_len "${PROMPT_LEN:-512}" --max_tokens "${MAX_TOKENS:-48}" --out "$LOG/$NAME" --nofresh_process \
  ${BENCH_ARGS:-} 2>&1 \
  | grep -v "^[IW][0-9]\{4\} " | tee -a "$LOG/bench_modes_$NAME.log"
echo "done"
