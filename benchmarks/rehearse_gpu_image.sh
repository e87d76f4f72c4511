#!/usr/bin/env bash
# Rehearse a GPU visit on this CPU machine: the committed tree, built and tested against the torch of
# the GPU image (torch 2.11.0+cu130; its Python is 3.12, ours 3.11), so that an incompatibility
# with that torch shows up here and not in scarce device time. No GPU needed: the CUDA kernels are
# compiled (FORCE_CUDA=1, sm_90), the CPU side of every test runs, then gpu_check.sh --dry-run.
#
#   bash benchmarks/rehearse_gpu_image.sh [WORK_DIR]     # about 10 minutes on 2 cores
#
# WORK_DIR (default /tmp/lrpfast-rehearsal) receives the venv, a copy of HEAD and the logs.
# TORCH / TORCHVISION override the versions.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/lrpfast-rehearsal}
TORCH=${TORCH:-2.11.0}
TORCHVISION=${TORCHVISION:-0.26.0}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

if [ ! -x "$WORK/venv/bin/python" ]; then
  python3 -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q "torch==$TORCH" numpy pytest pytest-xdist pybind11 ninja setuptools wheel tqdm pillow
  # torchvision's own pin would pull another torch: the models are all the tests need from it
  "$WORK/venv/bin/pip" install -q --no-deps "torchvision==$TORCHVISION"
fi
PY=$WORK/venv/bin/python
"$PY" -c "import torch; print('rehearsal torch', torch.__version__)"

# the committed tree only (what CI and the GPU visit see), in a fresh folder
rm -rf "$WORK/tree" && mkdir "$WORK/tree"
git archive HEAD | tar -x -C "$WORK/tree"
cd "$WORK/tree"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" -m pip install --no-build-isolation --no-deps -e . > "$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log"; exit 1; }
"$PY" -c "import lrpfast; i = lrpfast.build_info(); print(i); assert i['extension_loaded'] and i['cuda']"

rc=0
XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "$(nproc)")
"$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" tests > "$WORK/tests.log" 2>&1 || rc=1
tail -n 1 "$WORK/tests.log"
PYTHON=$PY bash benchmarks/gpu_check.sh --dry-run "$WORK/gpu_check" > "$WORK/gpu_check.log" 2>&1 || rc=1
sed -n '/==== gpu_check summary/,$p' "$WORK/gpu_check.log" | head -n 14
echo "rehearsal with torch $TORCH: $([ $rc -eq 0 ] && echo ok || echo FAILED) (logs in $WORK)"
exit $rc
