set -uo pipefail
for tree in . baseline; do
  TREE=$tree DEVICE_GIB=64 TIMEOUT=230 bash scripts/run_redesign_gpu.sh 2>&1 | grep -v "^\s*File\|^\s*\^" | tail -8
done
