#!/usr/bin/env bash
# Nsight Compute on our kernels (device machine; needs the Firecracker runtime, where ncu reads
# the hardware counters: KINDS.md). One report per case under $OUT (scripts/ncu_kernels.py).
#   CASES="moe_qwen3_t1 attn_b8_2k" bash scripts/run_ncu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-gpu_logs}"; mkdir -p "$LOG"
export PYTHONPATH=. PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: ${NCU:-not found}"
for c in ${CASES:-moe_qwen3_t1 attn_b8_2k}; do
  case $c in moe*) skip=8; count=4;; *) skip=2; count=1;; esac   # 4 kernels per MoE call
  timeout "${NCU_TIMEOUT:-150}" "$NCU" --clock-control none -k regex:"crosspool|ragged" \
    --launch-skip $skip --launch-count $count --section SpeedOfLight --section LaunchStats \
    --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
    python3 scripts/ncu_kernels.py --case "$c" > "$LOG/ncu_$c.txt" 2>&1
  echo "$c rc=$?"
done
