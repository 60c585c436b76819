#!/usr/bin/env bash
# Issue 13's measurement on ONE GPU: static against shared under a bursty many-model trace, each
# mode in a fresh process (python -m crosspool_jax.bench.trace sweep), warmed up by a separate
# shorter trace of the same shape, then one measured window per request rate.
#   run(command="bash scripts/run_trace_gpu.sh", carry=[".whl"])      results under $OUT/trace
# Defaults: 8 random-weight models of real layer shapes (3 Qwen3-30B-A3B 4-layer, 2 Mixtral-8x7B
# 2-layer, 3 OLMoE 4-layer: ~40 GiB of weights in bf16), a 2 GiB KV pool (static gives each model
# 1/8 of it, 256 MiB: 32k tokens of Qwen3/Mixtral, 8k of OLMoE), a chat trace with CV 4 and Zipf 1.0
# popularity (2% long-context prompts around 16k tokens), rates 2,4,8,16 req/s, 12 s per rate.
# Every size is an environment variable (below); the whole run must stay under ~6 minutes:
# each mode costs start-up + per rate WARMUP_S of warm-up (+ compiles; the second mode reads the
# persistent compilation cache in /tmp, so does a later call on the same warm machine) + per rate
# DURATION_S + up to DRAIN_S.
# If the first mode's warm-up (compiles) eats its RUN_TIMEOUT, fill the cache first with a short call
# on the same machine (MODES=shared RATES=16 DURATION_S=2), then run the full one while it stays warm.
# Plots, tables and JSON land under $OUT/trace (`python -m crosspool_jax.bench.trace report --out DIR`
# redraws them from the JSON files anywhere).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-gpu_logs}"
mkdir -p "$LOG"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
MODELS="${MODELS:-qwen3moe-30b-a3b-4l:3,mixtral-8x7b-2l:2,olmoe-1b-7b-4l:3}"   # shape:count,...
MODES="${MODES:-static,shared}"
KV_POOL="${KV_POOL:-2GiB}"
RATES="${RATES:-2,4,8,16}"
CV="${CV:-4}"
ZIPF="${ZIPF:-1.0}"
PROFILE="${PROFILE:-chat}"
DURATION_S="${DURATION_S:-12}"       # arrivals per rate point (the trace is made at the highest rate)
WARMUP_S="${WARMUP_S:-6}"            # warm-up seconds per rate (a separate trace: same shape, other draws)
DRAIN_S="${DRAIN_S:-10}"             # after the last arrival, wait this long, then cancel (= SLO miss)
TTFT_SLO_MS="${TTFT_SLO_MS:-1000}"
TBT_SLO_MS="${TBT_SLO_MS:-100}"
DECODE_STEPS="${DECODE_STEPS:-1}"    # tokens per decode dispatch: 1 = every token its own chunk, so
                                     # each gap is measured, not averaged over a multi-step chunk
RUN_TIMEOUT="${RUN_TIMEOUT:-170}"    # per mode process
EXTRA_ARGS="${EXTRA_ARGS:-}"         # more flags of `trace sweep`, e.g. "--max_num_batched_tokens=1024 --prompt_len_median=512"
CACHE="${CACHE:-/tmp/crosspool-jax-cache}"

# the image has matplotlib, tqdm, httpx and prometheus-client but not fastapi, which the server
# package (AsyncEngine's home) imports: install it and its friends from wheels carried in .whl/
if ! python3 -c "import fastapi" 2>/dev/null; then
  wheels=$(ls .whl/fastapi-*.whl .whl/starlette-*.whl .whl/pydantic-*.whl .whl/pydantic_core-*.whl \
    .whl/annotated_types-*.whl .whl/typing_inspection-*.whl .whl/uvicorn-*.whl .whl/opentelemetry_api-*.whl \
    .whl/importlib_metadata-*.whl .whl/zipp-*.whl .whl/annotated_doc-*.whl 2>/dev/null)
  [ -n "$wheels" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site $wheels && export PYTHONPATH=.:/tmp/site
  python3 -c "import fastapi" || { echo "fastapi is missing: carry .whl/ (carry=[\".whl\"])"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$LOG/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG/gpu.txt"

# the random-weight model folders (config.json + RANDOM_WEIGHTS marker), shapes interleaved so that
# the most popular trace models (m0, m1, ...) cover every shape
MODEL_FLAGS=$(python3 - "$MODELS" <<'EOF'
import sys
from crosspool_jax.models.random_models import random_model_dirs
wanted = [(s.split(":")[0], int(s.split(":")[1]) if ":" in s else 1) for s in sys.argv[1].split(",") if s]
folders = random_model_dirs(sorted({s for s, _ in wanted}))
left = dict(wanted)
order = []
while any(left.values()):
    for shape, _ in wanted:
        if left[shape]:
            order.append(shape)
            left[shape] -= 1
print(" ".join(f"--model={shape}-{i}={folders[shape]}" for i, shape in enumerate(order)))
EOF
)
NUM_MODELS=$(echo "$MODEL_FLAGS" | wc -w)
echo "models: $MODEL_FLAGS" | tee "$LOG/models.txt"

python3 -m crosspool_jax.bench.trace sweep --out "$LOG/trace" --modes "$MODES" --rates "$RATES" \
  --num_models "$NUM_MODELS" --cv "$CV" --zipf "$ZIPF" --profile "$PROFILE" --duration_s "$DURATION_S" \
  --warmup_s "$WARMUP_S" --drain_timeout_s "$DRAIN_S" --ttft_slo_ms "$TTFT_SLO_MS" --tbt_slo_ms "$TBT_SLO_MS" \
  --kv_pool_bytes "$KV_POOL" --compilation_cache_dir "$CACHE" --run_timeout_s "$RUN_TIMEOUT" \
  --max_decode_steps "$DECODE_STEPS" --sample_interval_s 0.1 --noprogress $EXTRA_ARGS $MODEL_FLAGS 2>&1 \
  | grep --line-buffered -v "^[IW][0-9]\{4\} " | tee "$LOG/trace.log"
rc=${PIPESTATUS[0]}
echo "sweep rc=$rc"
exit "$rc"
