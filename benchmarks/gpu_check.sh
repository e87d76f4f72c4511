#!/usr/bin/env bash
# The GPU visit in one call (issue 7): build lrpfast from source against the torch found here, run
# the CUDA tests, the GPU figures, compute-sanitizer memcheck on a small subset, the bench CLI, and
# racecheck last; every log and figure goes to OUT_DIR, and a short summary is printed last.
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # on an H100/H200: under 5 minutes (BUDGET_S=290)
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR   # the same steps on the CPU, tiny sizes (CI)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -x .venv/bin/python ]; then PY=${PYTHON:-$PWD/.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PYTHONUNBUFFERED=1
# benchmarks/*.py import lrpfast from this checkout (its in-place build), whether or not pip installed it
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -a SUMMARY=()
FAILED=0

# The whole visit has a deadline (BUDGET_S, from the start): each step runs under its own cap and
# never past the deadline less RESERVE_S, so the summary is always printed inside the device call's
# timeout, even when a step hangs. Steps run most valuable first.
BUDGET_S=${BUDGET_S:-$([ $DRY -eq 1 ] && echo 1800 || echo 290)}
RESERVE_S=10
step() {  # step NAME LOGFILE CAP_S CMD...: run, log, record pass/fail and duration
  local name=$1 log=$2 cap=$3; shift 3
  local t0=$SECONDS left=$((BUDGET_S - RESERVE_S - SECONDS))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -le 5 ]; then
    SUMMARY+=("$name: SKIPPED (the ${BUDGET_S} s budget is spent)"); FAILED=1; return 1
  fi
  echo "== $name (cap ${cap} s)" | tee -a "$OUT/steps.log"
  # SIGINT first: pytest still prints its counts and failures, a Python script its traceback (where
  # it hung) and gpu_figures.py what it measured so far; SIGKILL 5 s later if that is ignored.
  timeout -s INT -k 5 "$cap" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  local why="FAILED (rc=$rc)"; [ $rc -eq 124 ] && why="TIMED OUT after ${cap} s"
  local line="$name: $([ $rc -eq 0 ] && echo ok || echo "$why") in $((SECONDS - t0)) s  [$log]"
  SUMMARY+=("$line")
  echo "$line" | tee -a "$OUT/steps.log"
  if [ $rc -ne 0 ]; then FAILED=1; tail -n 25 "$OUT/$log"; fi
  return $rc
}

# ---------------------------------------------------------------- 1. build
if [ $DRY -eq 1 ]; then
  export FORCE_CUDA=${FORCE_CUDA:-1} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
else
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# The GPU machines set CXX=/opt/gcc/bin/g++ (a gcc 13.3 wrapper). An extension built with it
# segfaulted (H100, 2026-11-26) on any TORCH_CHECK whose message formats a number or a shape,
# instead of raising; the system compiler builds a working one.
ORIG_CXX=${CXX:-} ORIG_CC=${CC:-}
if [ $DRY -eq 0 ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
{ nvidia-smi 2>&1 || true; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
  echo "CXX=${CXX:-} $(${CXX:-c++} --version 2>&1 | head -n 1)"; "$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -n 2
  echo "commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo +dirty)"; nproc; } > "$OUT/machine.txt" 2>&1
if [ $DRY -eq 1 ]; then
  # CI has just built the package (make test): ninja's incremental in-place build checks it is current.
  step build build.log 900 "$PY" setup.py build_ext --inplace || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
else
  if ! step build build.log 150 "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    # The system compiler did not build it: once more with the image's own (the check below
    # then says whether its TORCH_CHECKs raise or crash).
    if [ -z "$ORIG_CXX" ] || [ "$ORIG_CXX" = "${CXX:-}" ]; then printf '%s\n' "${SUMMARY[@]}"; exit 1; fi
    export CXX=$ORIG_CXX CC=${ORIG_CC:-cc}
    step build_image_cxx build_image_cxx.log 150 "$PY" -m pip install --no-build-isolation --no-deps -e . ||
      { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
  fi
fi
# The extension loads, and a C++ argument check raises a Python error instead of crashing the
# process (what the image's compiler wrapper broke once; see the comment above).
step build_info build_info.json 60 "$PY" -c "
import json, torch, lrpfast
i = lrpfast.build_info(); print(json.dumps(i, indent=1)); assert i['extension_loaded'], 'extension not loaded'
# a build that silently left out the CUDA kernels would skip every extension case on the GPU
assert i['cuda'] or not torch.cuda.is_available(), 'extension built without its CUDA kernels'
try:
    torch.ops.lrpfast.stab_div(torch.ones(2, 3), torch.ones(4, 5), 1e-6, 'sign')
    raise SystemExit('a bad shape passed the C++ check')
except RuntimeError as e:
    print('C++ checks raise:', str(e).splitlines()[0])
"

# ---------------------------------------------------------------- 2. CUDA tests
if [ $DRY -eq 1 ]; then
  # No GPU: the CUDA cases skip; the CPU side of the same files runs on a small subset.
  step tests tests.log 600 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_models.py tests/test_ops.py -k "cpu and float32"
else
  # pytest-xdist is in the GPU image: 8 workers (2 threads each for the CPU float64 references).
  XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
  export LRPFAST_TEST_THREADS=2
  step tests tests.log 100 "$PY" -m pytest -q -m cuda "${XDIST[@]}" --continue-on-collection-errors \
    -p no:cacheprovider --durations=15 tests
fi
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 1

# ---------------------------------------------------------------- 3. figures (issue 7's numbers)
if [ $DRY -eq 1 ]; then
  step figures figures.log 600 "$PY" benchmarks/gpu_figures.py --device cpu --tiny --out "$OUT/figures.json"
else
  step figures figures.log 100 "$PY" benchmarks/gpu_figures.py --device cuda --out "$OUT/figures.json"
fi

# ---------------------------------------------------------------- 4. compute-sanitizer
SAN=$(command -v compute-sanitizer || ls "$CUDA_HOME/bin/compute-sanitizer" 2>/dev/null || true)
sanitize() {  # sanitize TOOL
  # Only lrpfast's own kernels are instrumented (kns=lrpfast): cuDNN/cuBLAS are not ours to check.
  # No caching allocator: each tensor is its own cudaMalloc, so memcheck sees an access past a
  # tensor's end (inside one of the allocator's 2 MB blocks it would be a valid address).
  # No API-error reports: CUDA calls that fail by design (torch/driver probing, e.g. cuGetProcAddress
  # on a newer toolkit) would count as errors; a failed launch of ours raises (csrc/cuda/launch_check.h).
  step "sanitizer_$1" "sanitizer_$1.log" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$1" \
    --report-api-errors no --error-exitcode 9 --kernel-name kns=lrpfast \
    "$PY" benchmarks/sanitizer_smoke.py --device cuda
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer_$1.log" | tail -n 1
}
if [ $DRY -eq 1 ] || [ -z "$SAN" ]; then
  step sanitizer_smoke sanitizer_smoke.log 300 "$PY" benchmarks/sanitizer_smoke.py --device cpu
else
  sanitize memcheck
fi

# ---------------------------------------------------------------- 5. the bench CLI on this device
# Issue 5's device paths (CUDA-event timing, --kernels) once, quickly: a smoke run, not a figure.
DEV=$([ $DRY -eq 1 ] && echo cpu || echo cuda)
step bench_cli bench_cli.log 40 "$PY" -m lrpfast.cli bench --device "$DEV" --quick --no-plot --no-progress \
  --impls lrpfast,lrpfast-fallback,floor --out "$OUT/bench_cli"
step bench_cli_kernels bench_cli_kernels.log 40 "$PY" -m lrpfast.cli bench --device "$DEV" --quick --kernels \
  --no-plot --no-progress --out "$OUT/bench_cli"

# ---------------------------------------------------------------- 6. racecheck, last
# racecheck reports shared-memory hazards, and no lrpfast kernel uses shared memory or a barrier
# (benchmarks/cuda_resources.sh): the least informative step, so the first one the budget cuts.
if [ $DRY -eq 0 ] && [ -n "$SAN" ]; then sanitize racecheck; fi

{
  echo
  echo "==== gpu_check summary ($([ $DRY -eq 1 ] && echo dry-run || echo GPU), ${SECONDS} s of ${BUDGET_S}) ===="
  grep -E "NVIDIA|^torch|^commit" "$OUT/machine.txt" | head -n 4
  printf '%s\n' "${SUMMARY[@]}"
  grep -E "passed|failed|error" "$OUT/tests.log" 2>/dev/null | tail -n 1
  [ -f "$OUT/figures.txt" ] && cat "$OUT/figures.txt"
} | tee "$OUT/summary.txt"
exit $FAILED
