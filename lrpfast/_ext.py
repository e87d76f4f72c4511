"""Loading of the compiled extension, and the switch between it and the pure-torch fallback.

`lrpfast._C` registers the `torch.ops.lrpfast.*` operators (C++ CPU kernels, and CUDA kernels when
built with them). Without it, or with LRPFAST_DISABLE_EXT=1, every op runs through
`lrpfast._fallback`, with one warning and never an import error.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

HAS_EXT = False
_LOAD_ERROR: str | None = None
_C = None

if os.environ.get("LRPFAST_DISABLE_EXT", "0") not in ("", "0"):
    _LOAD_ERROR = "disabled by LRPFAST_DISABLE_EXT=1"
else:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.lrpfast.*)

        HAS_EXT = True
    except ImportError as exc:  # not built, or built against another torch
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"

if not HAS_EXT:
    warnings.warn(
        f"lrpfast: compiled extension not used ({_LOAD_ERROR}); running the pure-torch fallback. "
        "Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

# Which implementation the ops use now. Tests flip it to compare the two in one process.
_use_ext = HAS_EXT


def extension_active() -> bool:
    """True when the ops currently run the compiled extension."""
    return _use_ext


def cuda_compiled() -> bool:
    return bool(HAS_EXT and _C.build_info().get("cuda"))


@contextlib.contextmanager
def use_implementation(name: str):
    """Run the enclosed code with `name` = "extension" or "fallback" (tests, benchmarks)."""
    global _use_ext
    if name not in ("extension", "fallback"):
        raise ValueError(f"use_implementation: expected 'extension' or 'fallback', got {name!r}")
    if name == "extension" and not HAS_EXT:
        raise RuntimeError(f"use_implementation('extension'): the extension is not loaded ({_LOAD_ERROR})")
    previous, _use_ext = _use_ext, name == "extension"
    try:
        yield
    finally:
        _use_ext = previous


def build_info() -> dict:
    """What was compiled: CPU and CUDA kernels, CUDA archs, and the torch versions involved."""
    info = {
        "extension_loaded": HAS_EXT,
        "extension_active": _use_ext,
        "load_error": _LOAD_ERROR,
        "torch_runtime": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if HAS_EXT:
        info.update(_C.build_info())
    else:
        info.update({"cpu": False, "cuda": False, "cuda_archs": "", "torch_compiled": None})
    return info
