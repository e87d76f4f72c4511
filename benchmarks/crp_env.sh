#!/usr/bin/env bash
# A separate environment with zennit-crp 0.6 (the CRP reference library) for
# benchmarks/crp_parity.py and benchmarks/crp_speed.py. zennit-crp 0.6 requires zennit<=0.4.6,
# while the main .venv carries zennit 0.5.1, so it lives in its own venv (default
# /work/main/.venv-crp, git-ignored).
#
# lrpfast is not installed there: the checkout goes on PYTHONPATH (the scripts do it themselves),
# which works because the compiled extension (lrpfast/_C*.so, built by `make build` in the main
# venv) is in the tree and this venv has the same torch (2.14.1). The last step checks that the
# extension loads, not just the fallback.
#
# Usage:  bash benchmarks/crp_env.sh            (creates or updates .venv-crp)
#         CRP_VENV=/some/dir bash benchmarks/crp_env.sh
# Then:   .venv-crp/bin/python benchmarks/crp_parity.py
#         .venv-crp/bin/python benchmarks/crp_speed.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CRP_VENV:-$ROOT/.venv-crp}"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION=2.14.1          # must equal the main venv's torch: lrpfast/_C*.so is built against it
TORCHVISION_VERSION=0.29.1    # the main venv's
ZENNIT_VERSION=0.4.6          # zennit-crp 0.6 pins zennit<=0.4.6
CRP_VERSION=0.6.0

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" numpy
"${PIP[@]}" "zennit==$ZENNIT_VERSION" "zennit-crp==$CRP_VERSION"

"$VENV/bin/python" - "$ROOT" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import torch, zennit, crp, lrpfast
from importlib.metadata import version
info = lrpfast.build_info()
print(f"torch {torch.__version__}, zennit {version('zennit')}, zennit-crp {version('zennit-crp')}, "
      f"lrpfast build {info}")
if version("zennit") != "0.4.6" or version("zennit-crp") != "0.6.0":
    sys.exit("wrong zennit / zennit-crp versions in the CRP venv")
if not info["extension_loaded"]:
    sys.exit("lrpfast's compiled extension did not load in the CRP venv (torch versions differ? "
             "run `make build` in the main venv first): " + str(info["load_error"]))
PY
echo "CRP environment ready: $VENV"
