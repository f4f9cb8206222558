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
#   build      the CUDA extension for sm_90, in place (MEMFT_CUDA=1 MEMFT_CUDA_ARCHS=90), in the
#              background while the GPU tests that do not need it run
#   t-*        MEMFT_TEST_GPU=1 pytest -m gpu, one process per test file, side by side (the GPU has
#              room; first-time Triton / inductor compiles are CPU work): t-triton, t-linear,
#              t-train, t-dist at once; t-cuda (the whole file: build checks too) and t-dtensor (DTensor
#              logits on a one-rank nccl mesh; the vocab-parallel linear loss's per-rank work on
#              simulated slices; the Triton and CUDA backends) once the build is done
#   memcheck-* compute-sanitizer memcheck on cuda_memcheck.py and on triton_memcheck.py (no caching
#              allocator, so that every tensor is its own allocation), next to t-cuda
#   bench      alone on the machine, each with a time cap, through `python -m memft_kernels.bench`
#              (the harness is in the package): loss --gpu-set (issue 13's matrix: bf16, N=16384,
#              V in {32000, 128256, 151936, 262144}, fwd+bwd and fwd, memft triton / cuda / both in
#              place, plain PyTorch, torch.compile, Liger + mask), linear-loss (V=128256, D=4096:
#              fused vs materialized, Liger FLCE, F.linear_cross_entropy), tune-triton (block / warps
#              per Triton kernel, V = 128256 and 32000), train-step
#   report     markdown tables (with the targets) and PNG, then a short table last on stdout
# Budget (SCALE=1): every job is killed at its limit (+10 s to die); the parallel part ends by its
# slowest job (expected 100-140 s; limits 90-150 s, build + t-cuda 210 s), the benchmarks' limits
# add up to 345 s, so the last ones may not run. The script starts no work after
# MEMFT_GPU_CHECK_TOTAL_S (default 420 s), and a job that starts late, the machine-name lookup too,
# gets only what is left; every call of the interpreter is under a timeout; the closing table
# takes at most 35 s more: it ends by 420 + 10 + 35 = 465 s, under 8 minutes.
# At most 8 files land in $OUT, all at its top level: the log, the results (named as in
# benchmarks/results/, e.g. bench_loss_gpu-nvidia-h200.csv: copy them there to commit) and, only
# while a stage runs, its output as stage-NAME.txt (folded into the log after).
#
# Dry run (MEMFT_GPU_CHECK_DRYRUN=1): on a CPU machine, every stage runs its real command at tiny
# size, except that the build skips native code (MEMFT_NATIVE=0: a shared checkout's in-place
# modules must not be overwritten), memcheck runs triton_memcheck.py in Triton's interpreter
# without the sanitizer (cuda_memcheck.py needs a GPU), and every time box is 3x longer
# (MEMFT_GPU_CHECK_LIMIT_SCALE).
# shellcheck disable=SC2317  # the stage functions are called indirectly, through timeout + bash -c
# shellcheck disable=SC2030,SC2031  # STAGE_LIMIT is set in each job's subshell, for that job only
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu_results}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
DRYRUN="${MEMFT_GPU_CHECK_DRYRUN:-0}"
PY="${MEMFT_PYTHON:-python3}"  # the host's python3 (the one with torch), unless named
SITE="${MEMFT_SITE:-/tmp/site}"
if [[ "$DRYRUN" == 1 ]]; then
  # a 2-core CPU is far slower than the GPU host at everything: same stages, looser time boxes
  SCALE="${MEMFT_GPU_CHECK_LIMIT_SCALE:-3}"
else
  SCALE="${MEMFT_GPU_CHECK_LIMIT_SCALE:-1}"
fi
TOTAL_S=$((${MEMFT_GPU_CHECK_TOTAL_S:-420} * SCALE))
export PYTHONUNBUFFERED=1
# No network there: fail at once instead of waiting on the hub; one host: rendezvous on loopback.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}"
# Inductor compiles a few small kernels per graph here: in process, not in a pool of 16 workers
# that would each import torch while the test files run side by side.
export TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-1}"
# pip-installed cmake and ninja live next to the interpreter; setup.py looks them up on PATH.
# Every call of the interpreter is under a timeout, this one too: a python that hangs must not
# hold the whole call past its budget.
PY_SCRIPTS="$(timeout --kill-after=5 15 "$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"
[[ -n "$PY_SCRIPTS" ]] && export PATH="$PATH:$PY_SCRIPTS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 4)}"

START=$(date +%s)
SUMMARY=()
: >"$LOG"

say() { echo "$*" | tee -a "$LOG"; }

STATE="$(mktemp -d)"  # end times of the jobs (outside $OUT: it must stay at <= 8 files)
trap 'rm -rf "$STATE"' EXIT
declare -A PID T0 LIM

# stage_start NAME LIMIT_S CMD...: start CMD in the background, its output in $OUT/stage-NAME.txt,
# killed (with its whole process group: spawned workers too) after LIMIT_S seconds, or sooner when
# the total budget runs out. CMD may be a function of this script.
stage_start() {
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  local left=$((TOTAL_S - ($(date +%s) - START)))
  if ((left < 5)); then
    say "=== [$name] not started: the total budget of ${TOTAL_S}s is used up"
    SUMMARY+=("$(printf '%-15s %-22s %4ss' "$name" "not run (budget)" 0)")
    return 0
  fi
  ((limit > left)) && limit=$left
  say "=== [$name] started, limit ${limit}s: $*"
  T0[$name]=$(date +%s)
  LIM[$name]=$limit
  (
    export STAGE_LIMIT=$limit
    if declare -F "$1" >/dev/null; then
      # a function of this script: run it in a child bash (timeout only runs programs)
      timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@"
    else
      timeout --kill-after=10 "$limit" "$@"
    fi
    rc=$?
    date +%s >"$STATE/$name.end"
    exit "$rc"
  ) </dev/null >"$OUT/stage-$name.txt" 2>&1 &
  PID[$name]=$!
}

# stage_finish NAME: wait for it, fold its output into the log, print its result and output tail.
stage_finish() {
  local name=$1
  [[ -n "${PID[$name]:-}" ]] || return 0  # never started (budget)
  local rc end secs note status="ok"
  wait "${PID[$name]}"
  rc=$?
  unset "PID[$name]"
  end=$(cat "$STATE/$name.end" 2>/dev/null || date +%s)
  secs=$((end - T0[$name]))
  {
    echo "--- output of [$name]"
    cat "$OUT/stage-$name.txt"
  } >>"$LOG"
  tail -n "${MEMFT_GPU_CHECK_TAIL:-12}" "$OUT/stage-$name.txt"
  if ((rc == 124 || rc == 137)); then
    status="TIMEOUT (${LIM[$name]}s)"
  elif ((rc != 0)); then
    status="FAILED rc=$rc"
  fi
  say "=== [$name] $status in ${secs}s"
  # pytest's counts, the sanitizer's error count, the memcheck scripts' last words: at a glance
  note=$(grep -aE '^=* ?[0-9]+ (passed|failed|skipped|deselected|errors?)|ERROR SUMMARY|^(cuda|triton)_memcheck: ' \
    "$OUT/stage-$name.txt" | sed -E 's/^=+ //; s/ =+$//; s/ in [0-9.]+s.*$//; s/ kernel launches, worst relative error vs float64/ launches, worst rel err/' | tail -n 3 | paste -sd ';' | cut -c 1-110)
  rm -f "$OUT/stage-$name.txt"
  SUMMARY+=("$(printf '%-15s %-22s %4ss  %s' "$name" "$status" "$secs" "$note")")
}

# stage NAME LIMIT_S CMD...: one job, alone.
stage() {
  stage_start "$@"
  stage_finish "$1"
}

env_info() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'EOF'
import os, platform, sys, sysconfig, torch
from importlib import metadata
print(f"python {platform.python_version()} ({sys.executable})  torch {torch.__version__}  cuda {torch.version.cuda}  device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"
print("  ".join(f"{n} {version(n)}" for n in ("numpy", "transformers", "peft", "setuptools", "pybind11", "cmake", "ninja")))
# the build needs Python's headers (CMake's Development.Module)
include = sysconfig.get_paths()["include"]
print(f"Python.h {'found' if os.path.isfile(os.path.join(include, 'Python.h')) else 'MISSING'} in {include}")
EOF
  command -v c++ >/dev/null 2>&1 && c++ --version | head -n 1
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2
  command -v cmake >/dev/null 2>&1 && cmake --version | head -n 1
  command -v compute-sanitizer >/dev/null 2>&1 && compute-sanitizer --version | tail -n 1
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

# gpu_pytest ARGS...: pytest in GPU mode (the real Triton JIT, gpu tests not skipped); a test still
# running 15 s before the stage's kill prints every thread's stack (where a hang is).
gpu_pytest() {
  local limit=${STAGE_LIMIT:-120}
  local dump=$((limit > 40 ? limit - 15 : limit))
  MEMFT_TEST_GPU=1 "$PY" -m pytest -q -p no:cacheprovider --tb=short --durations=5 \
    -o "faulthandler_timeout=$dump" "$@"
}

# memcheck SCRIPT: benchmarks/SCRIPT.py under compute-sanitizer memcheck.
memcheck() {
  local script=$1 sanitizer c run=()
  if [[ "$DRYRUN" == 1 ]]; then
    if [[ "$script" == triton_memcheck ]]; then
      echo "dry run: no sanitizer; $script.py in Triton's interpreter, cases with V <= 64"
      TRITON_INTERPRET=1 "$PY" "benchmarks/$script.py" --device cpu --quick
      return $?
    fi
    echo "dry run: $script.py needs a GPU (the native CUDA module); not run"
    return 0
  fi
  sanitizer="$(command -v compute-sanitizer || true)"
  for c in /usr/local/cuda/bin/compute-sanitizer /opt/cuda/bin/compute-sanitizer; do
    [[ -z "$sanitizer" && -x "$c" ]] && sanitizer=$c
  done
  if [[ -n "$sanitizer" ]]; then
    # Memory errors only: torch and Triton make CUDA API calls that fail by design (probes).
    run=("$sanitizer" --tool memcheck --error-exitcode 1 --print-limit 20 --report-api-errors no
      --target-processes application-only)
  else
    echo "compute-sanitizer not found: $script.py runs without it (results checked, memory not)"
  fi
  # No caching allocator: each tensor its own allocation, so a read past its end is out of bounds.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 ${run[@]+"${run[@]}"} "$PY" "benchmarks/$script.py"
}

export ROOT OUT DRYRUN PY SITE
export -f env_info install_wheels build_cuda gpu_pytest memcheck

# --- stages ------------------------------------------------------------------------------------
say "# gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT (commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)), OUT=$OUT, dry run: $DRYRUN"

stage env 30 env_info
stage wheels 15 install_wheels
if [[ -d "$SITE" ]]; then
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi

# Correctness, side by side: the build in the background with the test files that do not need it,
# then the CUDA module's tests and the sanitizer. Everything ends here before any benchmark starts.
stage_start build 120 build_cuda
stage_start t-triton 150 gpu_pytest -m gpu tests/test_triton_ce.py
stage_start t-linear 60 gpu_pytest -m gpu tests/test_linear_loss.py
stage_start t-train 90 gpu_pytest -m gpu tests/test_train.py
stage_start t-dist 120 gpu_pytest -m gpu tests/test_distributed.py
stage_finish build
stage_start t-cuda 90 gpu_pytest tests/test_native_cuda.py
stage_start t-dtensor 60 gpu_pytest tests/test_dtensor.py tests/test_vocab_parallel_linear.py \
  -k "gpu_one_rank or simulated_slices"
stage_start memcheck-cuda 90 memcheck cuda_memcheck
stage_start memcheck-triton 90 memcheck triton_memcheck
for name in t-triton t-linear t-train t-dist t-cuda t-dtensor memcheck-cuda memcheck-triton; do
  stage_finish "$name"
done

# Benchmarks: one at a time, nothing else running. Result files carry the machine in their names,
# as the committed ones in benchmarks/results/ do (e.g. bench_loss_gpu-nvidia-h200.csv).
# (inside the total budget: when it is used up, no benchmark runs and no file needs the name)
left=$((TOTAL_S - ($(date +%s) - START)))
MACHINE=
if ((left >= 5)); then
  MACHINE=$(timeout --kill-after=5 $((left < 60 ? left : 60)) "$PY" -c 'import torch
from memft_kernels.bench import timing
print(timing.machine_slug(timing.machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))))' 2>>"$LOG")
fi
MACHINE="${MACHINE:-unknown}"
BENCH=("$PY" -m memft_kernels.bench)
if [[ "$DRYRUN" == 1 ]]; then
  # the GPU run's providers and modes at smoke size; the Triton ones (memft-triton, Liger) in
  # Triton's interpreter, so that their Python runs; the CUDA ones are rows saying why not
  LOSS=(--gpu-set --device cpu --smoke --n 8 --v 256)
  LINEAR=(--device cpu --smoke)
  BENCH_ENV=(TRITON_INTERPRET=1)
  TRAIN=(--device cpu --smoke)
  TUNE=(--device cpu --smoke --n 4 --kernels forward backward)
  TUNE_ENV=(TRITON_INTERPRET=1)
else
  # issue 13's matrix (--gpu-set: bf16, N=16384, 4 vocabularies, fwd+bwd and fwd, 7 providers); the
  # chunked reference is left out (slow, and not a peer)
  LOSS=(--gpu-set --device cuda --time-cap 160 --budget-s 0.3 --reps 20)
  BENCH_ENV=()
  LINEAR=(--device cuda)  # N=8192, V=128256, D=4096, bf16, frozen and trainable weight
  TRAIN=(--device cuda --quick --budget-s 2)
  TUNE=(--device cuda --n 16384 --v 128256 32000 --dtype bf16 --time-cap 45)
  TUNE_ENV=()
fi
LOSS_CSV="$OUT/bench_loss_$MACHINE.csv"
LINEAR_CSV="$OUT/bench_linear_loss_$MACHINE.csv"
TRAIN_CSV="$OUT/bench_train_step_$MACHINE.csv"
# In order of what issue 13 needs most, since the last ones may not fit in the total budget.
stage loss-16k 175 env ${BENCH_ENV[@]+"${BENCH_ENV[@]}"} "${BENCH[@]}" loss "${LOSS[@]}" --no-jsonl --csv "$LOSS_CSV"
stage linear 45 env ${BENCH_ENV[@]+"${BENCH_ENV[@]}"} "${BENCH[@]}" linear-loss "${LINEAR[@]}" --out "$LINEAR_CSV"
stage tune 55 env ${TUNE_ENV[@]+"${TUNE_ENV[@]}"} "${BENCH[@]}" tune-triton "${TUNE[@]}" --csv "$OUT/tune_triton_$MACHINE.csv"
stage train 40 "${BENCH[@]}" train-step "${TRAIN[@]}" --no-jsonl --csv "$TRAIN_CSV"

REPORT_IN=()
for f in "$LOSS_CSV" "$LINEAR_CSV" "$TRAIN_CSV"; do
  [[ -f "$f" ]] && REPORT_IN+=("$f")
done
if ((${#REPORT_IN[@]} > 0)); then
  stage report 30 "${BENCH[@]}" report "${REPORT_IN[@]}" --md "$OUT/bench_report_$MACHINE.md" --png "$OUT/bench_loss_$MACHINE.png"
fi

# --- the short table, last on stdout -------------------------------------------------------------
say ""
say "# stage           result                  time   (total $(($(date +%s) - START))s; log: $LOG)"
for line in "${SUMMARY[@]}"; do
  say "  $line"
done
if [[ -f "$LOSS_CSV" ]]; then
  say ""
  timeout --kill-after=5 30 "${BENCH[@]}" report "$LOSS_CSV" --mode fwd+bwd --no-png 2>&1 | tee -a "$LOG"
fi
say "files in $OUT: $(find "$OUT" -maxdepth 1 -type f -printf '%f ' | head -c 400)"
n_files=$(find "$OUT" -type f | wc -l)
if ((n_files > 8)); then
  say "WARNING: $n_files files in $OUT (only 8 come back from the device machine)"
fi
exit 0
