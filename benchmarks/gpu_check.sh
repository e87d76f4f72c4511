#!/usr/bin/env bash
# The GPU visit in one call (issue 7): build lrpfast from source against the torch found here, run
# the CUDA tests, compute-sanitizer memcheck + racecheck on a small subset, then the GPU benchmarks;
# every log and figure goes to OUT_DIR, and a short summary is printed last.
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # on an H100/H200 (under 5 minutes)
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
declare -a SUMMARY=()
FAILED=0

step() {  # step NAME LOGFILE CMD...: run, log, record pass/fail and duration
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  echo "== $name" | tee -a "$OUT/steps.log"
  timeout "${STEP_TIMEOUT:-240}" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  local line="$name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc=$rc)") in $((SECONDS - t0)) s  [$log]"
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
if [ $DRY -eq 0 ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
{ nvidia-smi 2>&1 || true; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"; } > "$OUT/machine.txt" 2>&1
if [ $DRY -eq 1 ]; then
  # CI has just built the package (make test): ninja's incremental in-place build checks it is current.
  step build build.log "$PY" setup.py build_ext --inplace || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
else
  step build build.log "$PY" -m pip install --no-build-isolation --no-deps -e . || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
fi
step build_info build_info.json "$PY" -c "import json, lrpfast; i = lrpfast.build_info(); print(json.dumps(i, indent=1)); assert i['extension_loaded']"

# ---------------------------------------------------------------- 2. CUDA tests
if [ $DRY -eq 1 ]; then
  # No GPU: the CUDA cases skip; the CPU side of the same files runs on a small subset.
  step tests tests.log "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_models.py tests/test_ops.py -k "cpu and float32"
else
  step tests tests.log "$PY" -m pytest -q -m cuda --continue-on-collection-errors -p no:cacheprovider tests
fi

# ---------------------------------------------------------------- 3. compute-sanitizer
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ $DRY -eq 1 ] || [ -z "$SAN" ]; then
  step sanitizer_smoke sanitizer_smoke.log "$PY" benchmarks/sanitizer_smoke.py --device cpu
else
  for tool in memcheck racecheck; do
    step "sanitizer_$tool" "sanitizer_$tool.log" "$SAN" --tool "$tool" --error-exitcode 9 \
      --kernel-name kns=lrpfast "$PY" benchmarks/sanitizer_smoke.py --device cuda
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer_$tool.log" | tail -n 1
  done
fi

# ---------------------------------------------------------------- 4. benchmarks
if [ $DRY -eq 1 ]; then
  step figures figures.log "$PY" benchmarks/gpu_figures.py --device cpu --tiny --out "$OUT/figures.json"
else
  step figures figures.log "$PY" benchmarks/gpu_figures.py --device cuda --out "$OUT/figures.json"
fi

echo
echo "==== gpu_check summary ($([ $DRY -eq 1 ] && echo dry-run || echo GPU)) ===="
head -n 20 "$OUT/machine.txt" | grep -E "NVIDIA|torch" | head -n 3
printf '%s\n' "${SUMMARY[@]}"
[ -f "$OUT/figures.txt" ] && cat "$OUT/figures.txt"
exit $FAILED
