set -u
export OUT="${OUT:-gpu_logs}"
DONATION=1 TREES=. TRACE=0 MODES_TIMEOUT=230 NAME=main bash scripts/run_one_gpu.sh
if grep -q "RESOURCE_EXHAUSTED\|Out of memory" "$OUT"/bench_modes_main.log; then
  grep -n "Traceback\|File \"\|Error\|compile" "$OUT"/bench_modes_main.log | tail -40
  XLA_FLAGS=--xla_gpu_autotune_level=0 TREE=. NAME=main_autotune0 TIMEOUT=200 bash scripts/run_redesign_gpu.sh 2>&1 | tail -30
fi
