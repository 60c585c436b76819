# Sourced by the one-GPU run scripts (run_decode_roofline_gpu.sh, run_prefill_gpu.sh,
# run_redesign_gpu.sh) after `cd` to the repository root: LOG (absolute: $OUT, else gpu_logs/),
# the environment of every run (unbuffered output, JAX's allocator given 94% of the card: its
# default 75% is 59 GiB of an H100), the wheels of .whl/ (git-ignored; carried: what the device
# image lacks), the card and JAX version in $LOG/gpu.txt, and `quiet` (drops XLA's I/W lines).
ROOT="$(pwd)"
LOG="${OUT:-gpu_logs}"
case "$LOG" in /*) ;; *) LOG="$ROOT/$LOG" ;; esac
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}"
if [ -d .whl ]; then pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -1; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$LOG/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG/gpu.txt"
git log --oneline -1 2>/dev/null | tee -a "$LOG/gpu.txt"
quiet() { grep -v "^[IW][0-9]\{4\} "; }
