#!/usr/bin/env bash
# A separate environment with LXT 2.1 (the AttnLRP reference library) for benchmarks/lxt_parity.py
# and benchmarks/llama_speed.py. LXT 2.1 patches the modelling code of transformers 4.52, which the
# main .venv need not carry, so it lives in its own venv (default /work/main/.venv-lxt, git-ignored).
#
# LXT's setup.py also requires bitsandbytes, open_clip_torch, accelerate and zennit; its efficient
# mode (lxt.efficient, the one the benchmarks use) imports none of them, so LXT goes in with
# --no-deps and only what lxt.efficient imports is installed beside it.
#
# lrpfast is not installed there: the checkout goes on PYTHONPATH, which works because the compiled
# extension (lrpfast/_C*.so, built by `make build` in the main venv) is in the tree and this venv has
# the same torch (2.14.1). The last step checks that the extension loads, not just the fallback.
#
# Usage:  bash benchmarks/lxt_env.sh            (creates or updates .venv-lxt)
#         LXT_VENV=/some/dir bash benchmarks/lxt_env.sh
# Then:   .venv-lxt/bin/python benchmarks/lxt_parity.py   (the scripts set PYTHONPATH themselves)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LXT_VENV:-$ROOT/.venv-lxt}"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION=2.14.1          # must equal the main venv's torch: lrpfast/_C*.so is built against it
TRANSFORMERS_VERSION=4.52.4   # LXT 2.1 patches transformers 4.52's modelling code
LXT_VERSION=2.1

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" "torch==$TORCH_VERSION" numpy
"${PIP[@]}" "transformers==$TRANSFORMERS_VERSION"
# What lxt.efficient imports (tabulate and matplotlib: lxt.utils, for the pdf/latex heatmaps).
"${PIP[@]}" tabulate matplotlib
# zennit: lxt.efficient imports it at start (its ViT patches) and warns without it.
"${PIP[@]}" --no-deps zennit
"${PIP[@]}" --no-deps "lxt==$LXT_VERSION"
# torchvision for the vit_b_16 row of llama_speed.py, same release as the main venv.
"${PIP[@]}" --no-deps "torchvision==0.29.1"

"$VENV/bin/python" - "$ROOT" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import torch, transformers, lxt.efficient, lrpfast
info = lrpfast.build_info()
print(f"torch {torch.__version__}, transformers {transformers.__version__}, lrpfast build {info}")
if not info["extension_loaded"]:
    sys.exit("lrpfast's compiled extension did not load in the LXT venv (torch versions differ? "
             "run `make build` in the main venv first): " + str(info["load_error"]))
EOF
echo "LXT environment ready: $VENV"
