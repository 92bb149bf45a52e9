#!/usr/bin/env bash
# The whole GPU check in one run on a GPU machine, from the repo root:
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Stages, each under its own timeout and all within about 6 minutes (later stages get what is
# left, and are skipped when too little is):
#   build        the extension with the CUDA kernels (sm_90, with the python3 there; no downloads);
#                if that fails, a build without CUDA so the Triton paths are still checked
#   tests        the per-op tests (their cuda and triton cases run on the GPU), tests/test_gpu*.py and
#                tests/test_cxx_runtime.py (the module's C++ runtime bindings)
#   bench        bench/bench_gpu.py: correctness, then timings against torch and issue 9's targets
#   integration  bench/gpu_integration.py: DDP hook and GradientSparsifier on CUDA, gloo x2 and NCCL x1
#                (the hook's NCCL path, where the stream rule of docs/exchange.md applies: results
#                taken with Future.wait(); one GPU allows one NCCL rank, NCCL refuses two on a device)
#   deft-bench   the worker-count benchmark on CUDA: ResNet-50, then GPT-2 small if time is left
# Writes at most 7 files into OUTDIR: gpu_check.log (everything printed, and the stage summary at
# its end), build.log, tests.log, bench_gpu.json, integration.json, worker_count_<model>_cuda.json.
# Exits non-zero if any stage failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export PY=${PYTHON:-python3} OUT
# torch's CMake config takes the CUDA architectures from TORCH_CUDA_ARCH_LIST (or detects the GPU) and
# ignores CMAKE_CUDA_ARCHITECTURES; without a visible GPU it picks 11 architectures, sm_50 among them,
# which nvcc 13 rejects.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
BUDGET=${GPU_CHECK_BUDGET_S:-360}
T0=$(date +%s)
SUMMARY=()
FAILED=0

elapsed() { echo $(( $(date +%s) - T0 )); }

# stage NAME LIMIT_S COMMAND...: runs COMMAND (a program or one of the functions below, which are
# exported for the timeout's shell) under min(LIMIT_S, what is left of the budget).
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - $(elapsed) ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then
    SUMMARY+=("SKIP $name (budget spent)")
    return 0
  fi
  echo "== t=$(elapsed)s $name (limit ${limit}s)"
  local start rc
  start=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c '"$@"' stage "$@"
  rc=$?
  local took=$(( $(date +%s) - start ))
  if (( rc == 0 )); then
    SUMMARY+=("OK   $name ${took}s")
  elif (( rc == 124 || rc == 137 )); then
    SUMMARY+=("TIME $name ${took}s (limit ${limit}s)")
    FAILED=1
  else
    SUMMARY+=("FAIL $name ${took}s (exit $rc)")
    FAILED=1
  fi
  return $rc
}

build_cuda() {
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 . > "$OUT/build.log" 2>&1 || {
    grep -n -E "error|Error" "$OUT/build.log" | head -30
    return 1
  }
}
build_cpu_only() {
  "$PY" -m pip install --no-build-isolation --no-deps --no-index \
    -C cmake.define.DEFT_WITH_CUDA=OFF . >> "$OUT/build.log" 2>&1
}
run_tests() {
  local files=() opts=()
  for f in tests/test_op_*.py tests/test_gpu*.py tests/test_cxx_runtime.py; do [[ -e $f ]] && files+=("$f"); done
  # Worker processes (pytest-xdist): a test that crashes its process fails alone instead of ending
  # the run; pytest-timeout: a hung test fails alone.
  "$PY" -c "import xdist" 2>/dev/null && opts+=(-n 2)
  "$PY" -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout 120)
  "$PY" -m pytest -q -p no:cacheprovider -rf --tb=short "${opts[@]}" "${files[@]}" > "$OUT/tests.log" 2>&1
  local rc=$?
  tail -40 "$OUT/tests.log"
  return $rc
}
worker_count() {
  "$PY" -m deft_kernels.bench --device cuda --model "$1" --workers 1 2 4 8 16 32 \
    --sparsifiers deft topk cltk --no-progress --out "$WC" || return
  cp "$WC"/worker_count_"$1"_*.json "$OUT/"
}
export WC=$(mktemp -d)
export -f build_cuda build_cpu_only run_tests worker_count

echo "== gpu_check at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
"$PY" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"

if ! stage build 240 build_cuda; then
  stage build-without-cuda 200 build_cpu_only || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
fi
"$PY" -c "import deft_kernels.ops as o; print('served by the Triton fallback on CUDA:', o.TRITON_FALLBACK)"
# How the module is linked (the SIGSEGV of the first GPU run: C++ runtime calls split between
# libstdc++.so.6 and torch's exported copies; tests/test_cxx_runtime.py checks the bindings).
c++ --version | head -1; nvcc --version | tail -1
MODULE=$("$PY" -c "import torch, deft_kernels._C as c; print(c.__file__)")
readelf -d "$MODULE" | grep -E 'NEEDED|RUNPATH'
ldd "$MODULE" | grep -E 'libstdc|libgcc_s|cudart'
stage tests 150 run_tests
stage bench 150 "$PY" bench/bench_gpu.py --json "$OUT/bench_gpu.json"
stage integration 150 "$PY" bench/gpu_integration.py --json "$OUT/integration.json"
stage deft-bench-resnet50 100 worker_count resnet50
stage deft-bench-gpt2 120 worker_count gpt2
rm -rf "$WC"

echo "== t=$(elapsed)s summary"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
