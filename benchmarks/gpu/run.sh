#!/usr/bin/env bash
# Every check of the CUDA path and the many-core CPU targets in one run, each under its own time
# limit; everything it finds lands in $OUT (8 files at most, the GPU machine's limit).
#
#   bash benchmarks/gpu/run.sh                       on the GPU machine (one H100/H200, 16 cores): ~8 min
#   DEVICE=cpu bash benchmarks/gpu/run.sh --quick    the same steps, tiny and on CPU: a check of this script
#   ONLY="polar overhead" bash benchmarks/gpu/run.sh  a subset (names: env tests polar overhead step ds4 ds8)
#
# Nothing is downloaded: the package runs from this working tree (PYTHONPATH); the machine's own
# python3 brings torch, transformers and triton; DeepSpeed and what it needs come as wheels from
# .whl/ (made by benchmarks/gpu/fetch_wheels.sh on a machine with pip access; carry .whl along).
#
# Two lanes run side by side, so the whole fits the time: lane GPU (CUDA tests, polar throughput,
# training-step overhead; torch limited to 4 CPU threads) and lane CPU (benchmarks/step.py at
# W = 4 and 8, benchmarks/deepspeed_step.py at W = 4 and 8; one thread per rank, on the other
# cores where taskset exists). Both CPU benchmarks time their baselines in the same rounds.
set -u
cd "$(dirname "$0")/../.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
ONLY=${ONLY:-env tests polar overhead step ds4 ds8}
WORK=$(mktemp -d)
mkdir -p "$OUT"
SUMMARY=$OUT/summary.md
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCHDYNAMO_DISABLE=1
export DIST_SPECTRAL_CUDA_RECORD=$OUT/cuda_record.jsonl
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
: > "$DIST_SPECTRAL_CUDA_RECORD"

WHEELS="no .whl/ (DeepSpeed parts need it: benchmarks/gpu/fetch_wheels.sh, then carry .whl)"
if ls .whl/*.whl > /dev/null 2>&1; then  # DeepSpeed and its missing dependencies, never from a registry
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
            > "$WORK/pip.log" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$WORK/site"
        WHEELS="installed from .whl/: $(cd .whl && echo *.whl)"
    else
        WHEELS="install from .whl/ FAILED: $(tail -1 "$WORK/pip.log")"
    fi
fi

wanted() { [[ " $ONLY " == *" $1 "* ]]; }

# part LOG NAME LIMIT_S COMMAND...: run under timeout (its whole process group), log, one summary row.
part() {
    local log=$1 name=$2 limit=$3
    shift 3
    wanted "$name" || return 0
    local t0=$SECONDS
    echo "===== $name (limit ${limit} s): $*" >> "$log"
    timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    local verdict=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMED OUT"
    [ $rc -ne 0 ] && [ "$verdict" = ok ] && verdict="failed"
    echo "| $name | $verdict (rc $rc) | $((SECONDS - t0)) s | $limit s |" >> "$SUMMARY.rows"
}

{
    echo "# GPU run: $(date -u +%Y-%m-%dT%H:%M:%SZ), DEVICE=$DEVICE QUICK=$QUICK"
    echo
    echo "Wheels: $WHEELS"
    echo
    echo '```'
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" - <<'EOF'
import importlib, os, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "| cores", os.cpu_count())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
for name in ("triton", "transformers", "deepspeed", "pydantic", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING:", type(e).__name__, str(e)[:100])
EOF
    echo '```'
} > "$SUMMARY" 2>&1

if [ "$QUICK" = 1 ]; then
    TESTS=(tests/cuda tests/unit/test_kernels.py)
    POLAR=(--quick --repeats 1 --max-shapes 2)
    OVERHEAD=(--quick --steps 1 --warmup 1)
    STEP=(--worlds 2 --repeats 1)
    DS4=(--world 2 --stages 1 --repeats 1 --micro 1 --seq 16)
    DS8=()
    L=(60 120 120 300 400 0)
else
    TESTS=(tests/cuda tests/unit/test_kernels.py)
    POLAR=(--repeats 5)
    OVERHEAD=(--steps 5 --warmup 2)
    STEP=(--worlds 4,8 --repeats 5)
    DS4=(--world 4 --stages 1,2,3 --repeats 3)
    DS8=(--world 8 --stages 1,2,3 --repeats 3)
    L=(150 110 150 150 150 180)
fi
PIN=()
if [ "$QUICK" = 0 ] && command -v taskset > /dev/null && [ "$(nproc)" -ge 16 ]; then
    PIN=(taskset -c 4-$(($(nproc) - 1)))
fi

gpu_lane() {
    local log=$OUT/log.txt
    OMP_NUM_THREADS=4 part "$log" tests "${L[0]}" "$PY" -m pytest -rA -p no:cacheprovider "${TESTS[@]}"
    OMP_NUM_THREADS=4 part "$log" polar "${L[1]}" "$PY" benchmarks/gpu/polar_cuda.py --device "$DEVICE" "${POLAR[@]}" \
        --out "$OUT/polar_gpu.md"
    OMP_NUM_THREADS=4 part "$log" overhead "${L[2]}" "$PY" benchmarks/gpu/train_overhead.py --device "$DEVICE" \
        "${OVERHEAD[@]}" --out "$OUT/overhead_gpu.md"
}

cpu_lane() {
    local log=$OUT/log_cpu.txt
    part "$log" step "${L[3]}" "${PIN[@]}" "$PY" benchmarks/step.py "${STEP[@]}" --out "$OUT/step.md"
    part "$log" ds4 "${L[4]}" "${PIN[@]}" "$PY" benchmarks/deepspeed_step.py "${DS4[@]}" --out "$WORK/ds4.md"
    [ ${#DS8[@]} -gt 0 ] && part "$log" ds8 "${L[5]}" "${PIN[@]}" "$PY" benchmarks/deepspeed_step.py "${DS8[@]}" \
        --out "$WORK/ds8.md"
    cat "$WORK"/ds*.md > "$OUT/deepspeed.md" 2> /dev/null || true
}

: > "$SUMMARY.rows"
gpu_lane &
GPU_PID=$!
cpu_lane
wait $GPU_PID

{
    echo
    echo "| part | result | took | limit |"
    echo "|---|---|---|---|"
    cat "$SUMMARY.rows"
    echo
    echo "CUDA tests: $(grep -Eo '[0-9]+ (passed|failed|skipped|error)[^=]*' "$OUT/log.txt" | tail -1)"
    echo "Measured errors (cuda_record.jsonl): $(wc -l < "$DIST_SPECTRAL_CUDA_RECORD") rows"
} >> "$SUMMARY"
rm -f "$SUMMARY.rows"
[ -s "$DIST_SPECTRAL_CUDA_RECORD" ] || rm -f "$DIST_SPECTRAL_CUDA_RECORD"
cat "$SUMMARY"
ls -l "$OUT"
