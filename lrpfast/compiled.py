"""`LRP(model, compile=True)`: the forward and relevance pass of a prepared plan as one compiled graph.

Eagerly, every call walks the plan's steps in Python: at a small batch (a transformer explaining
one sequence) the ~100 Python steps and the small elementwise kernels between the GEMMs cost as
much as the GEMMs. torch.compile traces that walk once per input shape into one graph (inductor
fuses the elementwise work around each contraction into a few loops; no Python runs per step):
on the tiny Llama of benchmarks/llama_speed.py at batch 1 the call takes about two thirds of the
eager one (benchmarks/RESULTS.md).

What is compiled, and what stays eager:
- The first call for an input shape runs eagerly: it traces the model (per-shape plans), checks
  the plan against model(x) (LRP._verify) and gives every error its eager message. Only calls whose
  plan is already verified for that shape go through the compiled graph.
- The argument checks, the NaN/Inf reads of x and of the map, chunking (`batch_size`) and K-target
  grouping stay outside; `explain(...)` (per-layer records) is always eager.
- Parameters and buffers are inputs of the graph, not constants: a change to a weight or to the
  values of lrpfast.hf's attention mask shows in the next call without a recompile. (inductor's
  `freezing` would bake them in: not used.)
- The op table's generic relevance step takes J^T s from the op's own autograd
  (torch.autograd.grad inside the pass): dynamo traces that only with
  `torch._dynamo.config.trace_autograd_ops`, switched on around each compiled call.
- Each LRP compiles its own copy of the pass function, so its shapes count against dynamo's
  recompile limit (torch._dynamo.config.recompile_limit, 8 by default) alone, not shared with
  other LRP objects in the process. Past the limit dynamo runs the pass eagerly (same result).

A compile that fails (no C++ compiler, a backend error) is not the user's error: LRP._run runs the
call eagerly, warns once with the cause and stays eager (bad input still raises its eager message).

Cost: one compile per input shape (tens of seconds for a small transformer on 2 CPU cores; torch
caches the generated code on disk, so a later process compiles faster). It pays when many inputs
share a shape: pad token batches to a fixed length.
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable, Optional, Union

import torch

from . import ops
from .ops import RelevanceError

BACKENDS_HINT = "True (inductor), a backend name ('inductor', 'aot_eager', ...) or a dict of torch.compile arguments"


def options(value: Union[bool, str, dict, None]) -> Optional[dict]:
    """The torch.compile keyword arguments for LRP's `compile=`, or None for eager."""
    if value is None or value is False:
        return None
    if value is True:
        opts = {"backend": "inductor"}
    elif isinstance(value, str):
        opts = {"backend": value}
    elif isinstance(value, dict):
        unknown = set(value) - {"backend", "mode", "options", "fullgraph", "dynamic"}
        if unknown:
            raise RelevanceError(f"LRP: compile= got unknown torch.compile arguments {sorted(unknown)}; accepted: "
                                 "backend, mode, options, fullgraph, dynamic")
        opts = {"backend": "inductor", **value}
    else:
        raise TypeError(f"LRP: compile must be {BACKENDS_HINT}; got {type(value).__name__}")
    if (opts.get("options") or {}).get("freezing"):
        raise RelevanceError("LRP: compile= with inductor's freezing would bake the parameters and lrpfast.hf's "
                             "attention mask into the graph (a stale mask or weight gives a wrong map): not allowed")
    # One plan per shape (traced eagerly, verified eagerly): the graph is specialised per shape.
    opts.setdefault("dynamic", False)
    return opts


def _own_copy(method: types.MethodType) -> types.MethodType:
    """The bound method with a code object of its own: dynamo keeps its compiled graphs (and counts
    recompiles) per code object, so each LRP gets a cache of its own."""
    f = method.__func__
    copy = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(copy, method.__self__)


def compile_pass(method: types.MethodType, opts: dict) -> Callable:
    """torch.compile(method) on a private copy, run under the dynamo settings the pass needs."""
    compiled = torch.compile(_own_copy(method), **opts)

    def run(*args, **kwargs):
        with _settings():
            return compiled(*args, **kwargs)

    return run


@contextlib.contextmanager
def _settings():
    cfg = torch._dynamo.config
    # (an older torch without trace_autograd_ops: the op table's steps break the graph there)
    patch = cfg.patch(trace_autograd_ops=True) if hasattr(cfg, "trace_autograd_ops") else contextlib.nullcontext()
    before = ops.INLINE_ELEMENTWISE
    ops.INLINE_ELEMENTWISE = True   # the elementwise ops as pure torch, fused by inductor (lrpfast/ops.py)
    try:
        with patch:
            yield
    finally:
        ops.INLINE_ELEMENTWISE = before
