#!/usr/bin/env bash
# The one prepared script for a GPU host (an NVIDIA H200 with torch, triton, nvcc, no network).
#
#   bash benchmarks/gpu_check.sh                     # logs and results in ./gpu_results
#   OUT=/some/dir bash benchmarks/gpu_check.sh       # ... or there
#   MEMFT_GPU_CHECK_DRYRUN=1 bash benchmarks/gpu_check.sh   # the same stages, tiny, on a CPU
#
# Stages, each time-boxed with `timeout` and continuing when one fails:
#   env        nvidia-smi, versions, `memft info`
#   wheels     .whl/*.whl (e.g. liger-kernel) -> pip --no-index --no-deps --target /tmp/site
#   build      the CUDA extension for sm_90, in place (MEMFT_CUDA=1 MEMFT_CUDA_ARCHS=90)
#   tests      MEMFT_TEST_GPU=1 pytest -m gpu -x -q tests/
#   memcheck   compute-sanitizer memcheck on benchmarks/cuda_memcheck.py
#   bench      bench_loss (N=16384 then N=4096, bf16 fwd+bwd, every vocab size), bench_linear_loss,
#              bench_train_step, each with a time cap
#   report     markdown table and PNG, then a short table last on stdout
# Budget: build <= 90 s, tests <= 120 s, memcheck <= 45 s, bench <= 200 s; the whole script stops
# starting work at MEMFT_GPU_CHECK_TOTAL_S (default 430 s; the closing table takes at most 30 s more) so that it ends under 8 minutes.
# At most 8 files land in $OUT, all at its top level (see the list at the end).
#
# Dry run (MEMFT_GPU_CHECK_DRYRUN=1): on a CPU machine, every stage runs its real command at tiny
# size, except that the build skips native code (MEMFT_NATIVE=0: a shared checkout's in-place
# modules must not be overwritten), memcheck runs the script without the sanitizer, and every time
# box is 3x longer (MEMFT_GPU_CHECK_LIMIT_SCALE).
# shellcheck disable=SC2317  # the stage functions are called indirectly, through timeout + bash -c
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu_results}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
DRYRUN="${MEMFT_GPU_CHECK_DRYRUN:-0}"
PY="${PYTHON:-python3}"
SITE="${MEMFT_SITE:-/tmp/site}"
if [[ "$DRYRUN" == 1 ]]; then
  # a 2-core CPU is far slower than the GPU host at everything: same stages, looser time boxes
  SCALE="${MEMFT_GPU_CHECK_LIMIT_SCALE:-3}"
else
  SCALE="${MEMFT_GPU_CHECK_LIMIT_SCALE:-1}"
fi
TOTAL_S=$((${MEMFT_GPU_CHECK_TOTAL_S:-430} * SCALE))
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 4)}"

START=$(date +%s)
SUMMARY=()
: >"$LOG"

say() { echo "$*" | tee -a "$LOG"; }

# stage NAME LIMIT_S CMD...: run CMD with its output in the log, killed after LIMIT_S seconds (or
# when the total budget runs out); prints the stage's result and the tail of its output.
stage() {
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  local now left rc t0 secs
  now=$(date +%s)
  left=$((TOTAL_S - (now - START)))
  if ((left < 5)); then
    say "=== [$name] not started: the total budget of ${TOTAL_S}s is used up"
    SUMMARY+=("$(printf '%-10s %-22s %4ss' "$name" "not run (budget)" 0)")
    return 0
  fi
  ((limit > left)) && limit=$left
  say "=== [$name] limit ${limit}s: $*"
  t0=$(date +%s)
  echo "--- output of [$name]" >>"$LOG"
  if declare -F "$1" >/dev/null; then
    # a function of this script: run it in a child bash (timeout only runs programs)
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >"$OUT/.stage.txt" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" >"$OUT/.stage.txt" 2>&1
  fi
  rc=$?
  cat "$OUT/.stage.txt" >>"$LOG"
  secs=$(($(date +%s) - t0))
  tail -n "${MEMFT_GPU_CHECK_TAIL:-12}" "$OUT/.stage.txt"
  rm -f "$OUT/.stage.txt"
  local status="ok"
  if ((rc == 124 || rc == 137)); then
    status="TIMEOUT (${limit}s)"
  elif ((rc != 0)); then
    status="FAILED rc=$rc"
  fi
  say "=== [$name] $status in ${secs}s"
  SUMMARY+=("$(printf '%-10s %-22s %4ss' "$name" "$status" "$secs")")
  return 0
}

env_info() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
EOF
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2
  "$PY" -m memft_kernels info
}

install_wheels() {
  local wheels=()
  local w
  for w in "$ROOT"/.whl/*.whl; do
    [[ -f "$w" ]] && wheels+=("$w")
  done
  if ((${#wheels[@]} == 0)); then
    echo "no wheels in .whl/: optional providers (liger-kernel) will be reported as not installed"
    return 0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" &&
    echo "installed into $SITE: ${wheels[*]##*/}"
}

build_cuda() {
  if [[ "$DRYRUN" == 1 ]]; then
    MEMFT_NATIVE=0 "$PY" setup.py -q build_ext --inplace
  else
    MEMFT_CUDA=1 MEMFT_CUDA_ARCHS="${MEMFT_CUDA_ARCHS:-90}" "$PY" setup.py build_ext --inplace
  fi
  local rc=$?
  "$PY" -c "from memft_kernels.ops import native_cuda as m; print('native_cuda:', m.availability() or 'available', '| built for', m.built_architectures())"
  return "$rc"
}

memcheck() {
  if [[ ! -f benchmarks/cuda_memcheck.py ]]; then
    echo "benchmarks/cuda_memcheck.py is not in this checkout"
    return 0
  fi
  local sanitizer
  sanitizer="$(command -v compute-sanitizer || true)"
  for c in /usr/local/cuda/bin/compute-sanitizer /opt/cuda/bin/compute-sanitizer; do
    [[ -z "$sanitizer" && -x "$c" ]] && sanitizer=$c
  done
  if [[ "$DRYRUN" == 1 || -z "$sanitizer" ]]; then
    echo "running without compute-sanitizer (${sanitizer:-not found}; dry run: $DRYRUN)"
    "$PY" benchmarks/cuda_memcheck.py
    return $?
  fi
  "$sanitizer" --tool memcheck --error-exitcode 1 "$PY" benchmarks/cuda_memcheck.py
}

export ROOT OUT DRYRUN PY SITE
export -f env_info install_wheels build_cuda memcheck

# --- stages ------------------------------------------------------------------------------------
say "# gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT (commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)), OUT=$OUT, dry run: $DRYRUN"

stage env 25 env_info
stage wheels 15 install_wheels
if [[ -d "$SITE" ]]; then
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
stage build 90 build_cuda
stage tests 120 env MEMFT_TEST_GPU=1 "$PY" -m pytest -m gpu -x -q -p no:cacheprovider tests/
stage memcheck 45 memcheck

if [[ "$DRYRUN" == 1 ]]; then
  BIG=(--device cpu --smoke --n 64 --providers memft-cuda memft-cpu memft-torch torch-plain torch-compile liger)
  SMALL=(--device cpu --smoke --n 32 --providers memft-cuda memft-cpu memft-torch torch-plain torch-compile liger)
  LINEAR=(--device cpu --quick)
  TRAIN=(--device cpu --smoke)
else
  BIG=(--device cuda --n 16384 --v 32000 128256 151936 262144 --dtype bf16 --mode fwd+bwd --time-cap 100 --budget-s 0.5 --reps 30)
  SMALL=(--device cuda --n 4096 --v 32000 128256 151936 262144 --dtype bf16 --mode fwd+bwd fwd --time-cap 20 --budget-s 0.3 --reps 20)
  LINEAR=(--device cuda)
  TRAIN=(--device cuda --quick)
fi
stage loss-16k 120 "$PY" benchmarks/bench_loss.py "${BIG[@]}" --csv "$OUT/bench_loss.csv"
stage loss-4k 30 "$PY" benchmarks/bench_loss.py "${SMALL[@]}" --csv "$OUT/bench_loss.csv"
if [[ -f benchmarks/bench_linear_loss.py ]]; then
  stage linear 25 "$PY" benchmarks/bench_linear_loss.py "${LINEAR[@]}" --out "$OUT/bench_linear_loss.csv"
fi
stage train 25 "$PY" benchmarks/bench_train_step.py "${TRAIN[@]}" --no-jsonl --csv "$OUT/bench_train_step.csv"

REPORT_IN=()
for f in "$OUT/bench_loss.csv" "$OUT/bench_train_step.csv"; do
  [[ -f "$f" ]] && REPORT_IN+=("$f")
done
if ((${#REPORT_IN[@]} > 0)); then
  stage report 30 "$PY" benchmarks/report.py "${REPORT_IN[@]}" --md "$OUT/bench_report.md" --png "$OUT/bench_loss.png"
fi

# --- the short table, last on stdout -------------------------------------------------------------
say ""
say "# stage      result                  time   (total $(($(date +%s) - START))s; log: $LOG)"
for line in "${SUMMARY[@]}"; do
  say "  $line"
done
if [[ -f "$OUT/bench_loss.csv" ]]; then
  say ""
  timeout 30 "$PY" benchmarks/report.py "$OUT/bench_loss.csv" --mode fwd+bwd --dtype bf16 --no-png 2>&1 | tee -a "$LOG"
fi
say "files in $OUT: $(find "$OUT" -maxdepth 1 -type f -printf '%f ' | head -c 400)"
n_files=$(find "$OUT" -type f | wc -l)
if ((n_files > 8)); then
  say "WARNING: $n_files files in $OUT (only 8 come back from the device machine)"
fi
exit 0
