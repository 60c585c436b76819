#!/usr/bin/env bash
# Issue 19's one-GPU check of the Mosaic GPU prefill kernel (results under $OUT):
#   1. the gpu-marked tests of tests/pallas_kernels/test_prefill_mgpu.py (backend="mgpu"
#      against the reference: ragged prompts, prefix-cached chunks under every schedule,
#      GQA 32/8, 32/4, 16/4, 8/8) -> gpu_tests.log;
#   2. the prefill rows of bench_kernels (2k, 8k, 32k tokens, 1 and 4 sequences, GQA 32/8 and
#      32/4, pages of 64: the Triton kernel "gpu" beside "mgpu", "mgpu_q128", "mgpu_ws2") and
#      the bf16 matmul rate -> bench_prefill.json (bench_prefill_rows.json: the printed rows).
#   run(command="bash scripts/run_prefill_gpu.sh")          # nothing to carry
# Each step under its own timeout (TEST_TIMEOUT, BENCH_TIMEOUT): the whole run stays under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_run_setup.sh
CROSSPOOL_TEST_ON_GPU=1 PYTHONPATH=. timeout "${TEST_TIMEOUT:-140}" python3 -m pytest -q -m gpu \
  tests/pallas_kernels/test_prefill_mgpu.py -p no:cacheprovider -rf 2>&1 | quiet > "$LOG/gpu_tests.log"
echo "gpu tests: exit ${PIPESTATUS[0]}"; tail -30 "$LOG/gpu_tests.log"
PYTHONPATH=. timeout "${BENCH_TIMEOUT:-300}" python3 scripts/bench_kernels.py --prefill-only \
  --json "$LOG/bench_prefill.json" 2>&1 | quiet > "$LOG/bench_prefill.log"
echo "bench: exit ${PIPESTATUS[0]}"; grep -v "^{" "$LOG/bench_prefill.log" | tail -40
# the rows as printed, kept even where a timeout stopped the bench before its JSON was written
python3 -c "import ast, json, sys; json.dump([ast.literal_eval(l) for l in open(sys.argv[1]) if l.startswith('{')], open(sys.argv[2], 'w'), indent=1)" \
  "$LOG/bench_prefill.log" "$LOG/bench_prefill_rows.json"
echo "prefill run done"
