"""Recomputed outputs: a step whose output is a cheap elementwise function of tensors the
relevance pass keeps anyway recomputes it there instead of keeping it (the comment below).
"""
from __future__ import annotations

from .base import ConstStep
from .messages import Call

# ============================================================================= recomputed outputs
#
# A step whose output is a cheap elementwise function of tensors the relevance pass keeps anyway
# (SwiGLU's silu(g) * u of the kept projections g and u, the RMSNorm of a kept residual sum, the
# rotary embedding of a kept query) need not keep that output: with `remat` set (by
# fusion.rematerialize, for steps read only by readers that accept it) its forward records its
# index in call.remat instead, its readers (a Linear's x, attention's query and key) keep LATER,
# and the first relevance step that needs the tensor recomputes it (`value`) by the step's own
# forward arithmetic, bit for bit; the producer's own relevance step takes it from call.remat and
# drops it. The forward keeps one tensor fewer per such step until the relevance pass reaches it.
# Under torch.compile the same: the recomputation is traced into the graph where the relevance
# pass needs it, so LRP(model, compile=True) keeps eager's peak memory (lrpfast/compiled.py).

LATER = object()   # in a step's saved state: the input's value, recomputed when needed (`value`)


def value(call: "Call", i: int):
    """Step i's forward output during the relevance pass: kept, or recomputed once and held in
    call.remat until step i's own relevance step takes it."""
    if i in call.remat:
        t = call.remat[i]
        if t is None:
            t = call.remat[i] = call.steps[i].recompute(call)
        return t
    out = call.steps[i].output_of(call)
    # else an intermediate of a recomputation (the activation inside SwiGLU's product), not held
    return out if out is not None else call.steps[i].recompute(call)


def take(call: "Call", i: int):
    """Step i's recomputed output for its own relevance step (the last use): dropped from call.remat."""
    t = call.remat.pop(i, None)
    return call.steps[i].recompute(call) if t is None else t


class RematEnv:
    """env for replaying a step's forward in the relevance pass: kept or recomputed outputs of
    its inputs, the values of plain constants, and the replay's own inner slots."""

    __slots__ = ("call", "local")

    def __init__(self, call, local=None):
        self.call, self.local = call, dict(local or {})

    def __getitem__(self, j):
        if j in self.local:
            return self.local[j]
        st = self.call.steps[j]
        if type(st) is ConstStep:
            return st.forward(None, self.call)
        return value(self.call, j)

    def __setitem__(self, j, v):
        self.local[j] = v
