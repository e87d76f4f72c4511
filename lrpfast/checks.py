"""Argument checks shared by lrpfast.LRP and its callers: one clear line naming the argument and
what it may be, before any work (issue 14)."""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
import re
import threading
from typing import Optional

import torch

from .ops import RelevanceError

# memory_budget strings: a number (1, 1.5, .5, 1e9) and an optional binary unit K/M/G/T with an
# optional B or iB ("2GiB", "512MB", "1.5G", "100k", "4096B"): 1K = 1024 bytes.
_BUDGET = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*([KMGT]?)(i?B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
BUDGET_ALLOWED = "a positive number of bytes or a size like '2GiB', '512MB', '1.5G' (units K/M/G/T, 1K = 1024)"


def parse_budget(v) -> Optional[int]:
    """memory_budget -> bytes (None stays None). Anything else: RelevanceError naming it."""
    if v is None:
        return None
    if isinstance(v, str):
        m = _BUDGET.fullmatch(v)
        if not m:
            raise RelevanceError(f"LRP: memory_budget {v!r} is not {BUDGET_ALLOWED}")
        try:
            number = float(m.group(1)) * 10.0 ** int(m.group(2) or 0) * _UNITS[m.group(3).upper()]
        except OverflowError:  # "1e999"
            number = math.inf
    elif isinstance(v, numbers.Real) and not isinstance(v, bool):
        number = float(v)
    else:
        raise RelevanceError(f"LRP: memory_budget must be {BUDGET_ALLOWED}, got {type(v).__name__} {v!r}")
    if not math.isfinite(number) or number < 1:
        raise RelevanceError(f"LRP: memory_budget must be {BUDGET_ALLOWED}, got {v!r}")
    return int(number)


TARGET_ALLOWED = "None (the argmax), an int class index, or a (B,) or (B, K) integer tensor, array or list"


def as_target(target):
    """A target as the LRP call takes it: None or an int as they are, anything else (lists,
    numpy arrays, numpy integers) as a tensor. Strings, floats and values beyond int64 are a
    clear error naming `target` instead of whatever torch.as_tensor would say."""
    if target is None or isinstance(target, torch.Tensor):
        return target
    if isinstance(target, (str, bytes)):
        raise TypeError(f"LRP: target must be {TARGET_ALLOWED}, got the string {target!r}")
    if isinstance(target, bool):
        raise TypeError(f"LRP: target must be {TARGET_ALLOWED}, got the bool {target!r}")
    if isinstance(target, int):
        return target
    try:
        return torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        if "verflow" in str(exc):
            raise RelevanceError(f"LRP: target holds a class index beyond int64 ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0]}); expected {TARGET_ALLOWED}") from None
        raise TypeError(f"LRP: target must be {TARGET_ALLOWED}, got {type(target).__name__} "
                        f"({str(exc).splitlines()[0]})") from None


class _ThisThread(logging.Filter):
    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record):
        return record.thread != self.thread


# torch logs the exception of a meta kernel at ERROR level (a traceback of ~20 lines) before it
# re-raises it; the shape profile (LRP._profile) catches it and the call reports a clean error.
FAKE_TENSOR_LOGGERS = ("torch._subclasses.fake_tensor", "torch._subclasses.fake_impls")


@contextlib.contextmanager
def quiet_fake_tensor_errors():
    """Drop the fake-tensor error log records of this thread while the block runs (other
    threads still log)."""
    flt = _ThisThread()
    loggers = [logging.getLogger(n) for n in FAKE_TENSOR_LOGGERS]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


# ----------------------------------------------------------------------------- the explained function

def _forward_reads_training(m: torch.nn.Module) -> bool:
    """The module's own forward reads self.training (a user's `if self.training:`, torch's
    fast-path checks): traced through, its branch is fixed when LRP traces it."""
    code = getattr(getattr(type(m), "forward", None), "__code__", None)
    return code is not None and "training" in code.co_names


def _random_or_batch_dependent(m: torch.nn.Module) -> bool:
    """In training mode this module's output is random or depends on the batch."""
    nn = torch.nn
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True   # batch statistics
    if isinstance(m, (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)):
        return m.p > 0
    if isinstance(m, nn.MultiheadAttention):
        return m.dropout > 0
    # torchvision's StochasticDepth (p), timm's DropPath/DropBlock (drop_prob), other dropouts
    for attr in ("drop_prob", "p", "dropout_p"):
        v = getattr(m, attr, None)
        if isinstance(v, float) and v > 0 and "drop" in type(m).__name__.lower() + attr:
            return True
    return False


def training_modes(model: torch.nn.Module) -> dict:
    """name -> (module, its training flag) for every module whose forward reads the flag (LRP
    records them at the trace)."""
    return {name: (m, m.training) for name, m in model.named_modules() if _forward_reads_training(m)}


def check_explained_function(model, traced_modes: Optional[dict] = None, where: str = "LRP") -> None:
    """What LRP explains is the model's forward as traced, deterministic, without hooks. A forward
    hook or pre-hook that could change an output, a module in training mode whose output is random
    or depends on the batch (dropout, BatchNorm's batch statistics), or a module whose forward
    reads self.training switched to the other mode since the trace would make the map explain
    another function than `model(x)`: refused, naming the module (issue 14, defect 3). Cheap: a
    look at each module's flags. `model`: the module, or its named_modules() as a list (LRP keeps
    one, so a call does not walk the module tree)."""
    from torch.nn.modules import module as _module

    if getattr(_module, "_global_forward_hooks", None) or getattr(_module, "_global_forward_pre_hooks", None):
        raise RelevanceError(f"{where}: a global forward hook is registered (torch.nn.modules.module."
                             "register_module_forward_hook); LRP explains the model's own forward and cannot "
                             "follow what the hook changes: remove it first")
    modules = model.named_modules() if isinstance(model, torch.nn.Module) else model
    label = lambda name, m: f"module {name or '(the model)'!r} ({type(m).__name__})"  # noqa: E731
    for name, m in modules:
        if not (m._forward_hooks or m._forward_pre_hooks or m.training):
            continue
        if m._forward_hooks or m._forward_pre_hooks:
            kind = "forward hook" if m._forward_hooks else "forward pre-hook"
            raise RelevanceError(f"{where}: {label(name, m)} has a {kind}; LRP explains the model's own forward and cannot "
                                 "follow what a hook changes: remove it (handle.remove()) or make it part of a "
                                 "module's forward")
        if m.training and _random_or_batch_dependent(m):
            raise RelevanceError(f"{where}: {label(name, m)} is in training mode, where its output is random or depends on "
                                 "the batch (dropout, batch statistics); LRP explains a deterministic function: "
                                 "call model.eval() first")
    for name, (m, was) in (traced_modes or {}).items():
        if m.training != was:
            raise RelevanceError(f"{where}: {label(name, m)} was switched to {'training' if m.training else 'eval'} mode "
                                 "after LRP(model) traced it, and its forward depends on the mode: build a new "
                                 "LRP(model) for this mode")
