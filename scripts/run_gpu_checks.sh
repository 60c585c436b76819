#!/usr/bin/env bash
# GPU checks on the device machine: the gpu-marked kernel tests, then the kernel benchmark.
#   bash scripts/run_gpu_checks.sh [--sweep]     (logs under $OUT, or ./gpu_logs without it)
# Through the device tool: run(command="bash scripts/run_gpu_checks.sh", carry=[".whl"]).
# Extra arguments go to scripts/bench_kernels.py (its docstring lists the flags). Budget: the
# kernel GPU tests take ~130 s and the whole table over 300 s, so under a 300 s limit split it,
# e.g. TESTS=<a few test ids> ... --skip-mixed --moe-no-prefill, then, in the same command,
# python3 scripts/bench_kernels.py --sweep --skip-decode --skip-moe.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-gpu_logs}"
mkdir -p "$LOG"
export PYTHONPATH=. PYTHONUNBUFFERED=1
# pytest is not in the device image: install it from wheels carried in .whl/ (carry: [".whl"])
if ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl .whl/pygments-*.whl \
    .whl/packaging-*.whl && export PYTHONPATH=.:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$LOG/gpu.txt"
CROSSPOOL_TEST_ON_GPU=1 timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu \
  ${TESTS:-tests/pallas_kernels} -p no:cacheprovider 2>&1 | tee "$LOG/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout "${BENCH_TIMEOUT:-300}" python3 scripts/bench_kernels.py --json "$LOG/bench.json" "$@" \
  2>&1 | tee "$LOG/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
