"""Ops linear in their computed inputs: one relevance step for all of them, one table entry per op.

An op whose output is a linear function of the tensors that carry relevance (the other arguments
constant: numbers, parameters, shapes) needs no rule of its own. With z = f(x_1, ..., x_n) and J_i
its Jacobian in x_i, the ε rule of a linear map is

    LINEAR   R_i = x_i ⊙ J_iᵀ (R / stab(z))              (negation, subtraction, division by a
                                                        constant, sum over dims, interpolation)

and for an op that only moves, copies or drops elements (every output element is one input element
or a constant), where x_i / z = 1 wherever relevance flows, the division cancels:

    COPY     R_i = J_iᵀ R                              (expand, repeat, stack, pad, roll, flip,
                                                        nearest interpolation, dtype casts)

J_iᵀ is applied by the op's own autograd (a vector-Jacobian product at the saved inputs), so the
rule is the op's exact transpose, broadcasting and padding included. A constant operand (a bias
subtracted, a padded border) absorbs its share, as a bias does. The batch dimension must stay dim 0
and unmixed: each entry says which arguments would touch it.

Adding an op is one entry in FUNCTIONS or METHODS below.
"""
from __future__ import annotations

import operator
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from .nodes import DENSE, LAZY, Msg, _EpsilonStep, divide, materialize, per_sample
from .ops import RelevanceError

COPY, LINEAR = "copy", "linear"


class OpRule(NamedTuple):
    kind: str                                   # COPY or LINEAR (module docstring)
    batch_args: Optional[Callable] = None       # (args, kwargs, ndim) -> the dims the op acts along, or
                                                # None when it cannot be told: checked to spare dim 0
    sign_preserving: bool = False               # output >= 0 where the computed inputs are
    only_first_computed: bool = False           # the other operands must be constants (x / c)


def _dims(v, ndim):
    if v is None:
        return None
    vals = v if isinstance(v, (list, tuple)) else (v,)
    return [int(d) % ndim for d in vals]


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _sum_dims(args, kwargs, ndim):
    d = _arg(args, kwargs, 1, "dim")
    return list(range(ndim)) if d is None else _dims(d, ndim)


def _stack_dims(args, kwargs, ndim):
    return _dims(_arg(args, kwargs, 1, "dim", 0), ndim + 1)


def _roll_dims(args, kwargs, ndim):
    d = _arg(args, kwargs, 2, "dims")
    return list(range(ndim)) if d is None else _dims(d, ndim)


def _flip_dims(args, kwargs, ndim):
    return _dims(_arg(args, kwargs, 1, "dims"), ndim)


def _pad_dims(args, kwargs, ndim):
    pad = _arg(args, kwargs, 1, "pad")
    return [ndim - 1 - i for i in range(len(pad) // 2)]


def _expand_dims(args, kwargs, ndim):
    sizes = args[1:] if len(args) > 1 else kwargs.get("size", ())
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
        sizes = sizes[0]
    lead = len(sizes) - ndim
    first = sizes[lead] if lead >= 0 and len(sizes) > lead else -1
    # the batch entry must stay: -1 or the batch size itself (checked against the output below)
    return [0] if lead > 0 or (isinstance(first, int) and first not in (-1,) and first != args[0].shape[0]) else []


def _repeat_dims(args, kwargs, ndim):
    reps = args[1:] if len(args) > 1 else kwargs.get("repeats", ())
    if len(reps) == 1 and isinstance(reps[0], (list, tuple, torch.Size)):
        reps = reps[0]
    lead = len(reps) - ndim
    return [0] if lead > 0 or reps[lead] != 1 else []


def _spatial(args, kwargs, ndim):
    return list(range(2, ndim))


def _none(args, kwargs, ndim):
    return []


_interp_kind = LINEAR

FUNCTIONS = {
    operator.neg: OpRule(LINEAR, _none),
    torch.neg: OpRule(LINEAR, _none),
    operator.sub: OpRule(LINEAR, _none),
    torch.sub: OpRule(LINEAR, _none),
    operator.truediv: OpRule(LINEAR, _none, only_first_computed=True),
    torch.div: OpRule(LINEAR, _none, only_first_computed=True),
    torch.sum: OpRule(LINEAR, _sum_dims, sign_preserving=True),
    torch.stack: OpRule(COPY, _stack_dims, sign_preserving=True),
    F.pad: OpRule(COPY, _pad_dims),
    torch.roll: OpRule(COPY, _roll_dims, sign_preserving=True),
    torch.flip: OpRule(COPY, _flip_dims, sign_preserving=True),
    F.interpolate: OpRule(LINEAR, _spatial),
}
METHODS = {
    "neg": OpRule(LINEAR, _none),
    "sub": OpRule(LINEAR, _none),
    "div": OpRule(LINEAR, _none, only_first_computed=True),
    "sum": OpRule(LINEAR, _sum_dims, sign_preserving=True),
    "expand": OpRule(COPY, _expand_dims, sign_preserving=True),
    "expand_as": OpRule(COPY, None, sign_preserving=True),
    "repeat": OpRule(COPY, _repeat_dims, sign_preserving=True),
    "roll": OpRule(COPY, _roll_dims, sign_preserving=True),
    "flip": OpRule(COPY, _flip_dims, sign_preserving=True),
    "float": OpRule(COPY, _none, sign_preserving=True),
    "double": OpRule(COPY, _none, sign_preserving=True),
    "half": OpRule(COPY, _none, sign_preserving=True),
    "bfloat16": OpRule(COPY, _none, sign_preserving=True),
    "to": OpRule(COPY, _none, sign_preserving=True),
    "type_as": OpRule(COPY, _none, sign_preserving=True),
}


def lookup(op: str, target) -> Optional[OpRule]:
    if op == "call_method":
        return METHODS.get(target)
    try:
        return FUNCTIONS.get(target)
    except TypeError:   # an unhashable target
        return None


class LinearOpStep(_EpsilonStep):
    """One node whose op has an entry above; its computed inputs are `inputs` (module docstring)."""

    def __init__(self, name, fn, args, kwargs, load, op, rule: OpRule, eps, stabilizer):
        super().__init__(name, eps, stabilizer)
        self.fn, self.args, self.kwargs, self.load, self.op, self.rule = fn, args, kwargs, load, op, rule
        self.sign_preserving = rule.sign_preserving
        if rule.kind == COPY:   # views (expand) or copies: nothing to divide, nothing to rectify in place
            self.has_denominator = False
            self.fresh_output = False

    def forward(self, env, call):
        args, kwargs = self.load(env, self.args, self.kwargs)
        z = self.fn(*args, **kwargs)
        xs = [env[i] for i in self.inputs]
        b = xs[0].shape[0] if xs else None
        if not isinstance(z, torch.Tensor) or z.dim() == 0 or any(x.dim() == 0 or x.shape[0] != b for x in xs) \
                or z.shape[0] != b:
            raise RelevanceError(f"LRP: {self.describe()} turns {[tuple(x.shape) for x in xs]} into "
                                 f"{tuple(getattr(z, 'shape', ()))}: it must keep the batch dimension first")
        if self.rule.batch_args is not None and xs:
            dims = self.rule.batch_args(args, kwargs, xs[0].dim())
            if dims is None or 0 in dims:
                raise RelevanceError(f"LRP: {self.describe()} acts along the batch dimension (dim 0); only ops on "
                                     "the other dims of each sample have a relevance rule")
        if self.rule.kind == LINEAR and z.dtype != xs[0].dtype:
            raise RelevanceError(f"LRP: {self.describe()} changes the dtype ({xs[0].dtype} -> {z.dtype})")
        call.saved[self.index] = (args, kwargs, xs, z)
        return z

    def denominator(self, call):
        if self.rule.kind == COPY:
            return None
        return call.saved[self.index][3], self.eps, self.stabilizer

    def output_of(self, call):
        return call.saved[self.index][3]

    def _transpose(self, args, kwargs, xs, g):
        """J_iᵀ g for every computed input, by the op's autograd; g has K*B rows (K maps per sample),
        the inputs B: one vector-Jacobian product per map."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        slots = {id(x): j for j, x in enumerate(xs)}
        where = [slots.get(id(v)) if isinstance(v, torch.Tensor) else None for v in leaves]
        b = xs[0].shape[0]
        k = g.shape[0] // b

        def vjp(gk):
            with torch.enable_grad():
                leaf = [x.detach().requires_grad_(True) for x in xs]
                vals = [leaf[w] if w is not None else v for v, w in zip(leaves, where)]
                a, kw = pytree.tree_unflatten(vals, spec)
                out = self.fn(*a, **kw)
                return torch.autograd.grad(out, leaf, gk.to(out.dtype), allow_unused=True)

        if k == 1:
            parts = [vjp(g)]
        else:
            gs = per_sample(g, b)
            parts = [vjp(gs[:, j]) for j in range(k)]
        out = []
        for i, x in enumerate(xs):
            cs = [p[i] if p[i] is not None else torch.zeros_like(x) for p in parts]
            c = cs[0] if k == 1 else torch.stack(cs, 1).reshape(b * k, *x.shape[1:])
            out.append(c.detach())
        return out

    def relprop(self, msg, call):
        args, kwargs, xs, z = call.saved[self.index]
        if self.rule.kind == COPY:
            cs = self._transpose(args, kwargs, xs, materialize(msg))
            return [(i, Msg(DENSE, c, None, True)) for i, c in zip(self.inputs, cs)]
        s = self._s(msg, call)
        cs = self._transpose(args, kwargs, xs, s)
        return [(i, Msg(LAZY, c, x, True)) for i, c, x in zip(self.inputs, cs, xs)]

    def zero_preserving(self, plan):
        return True if self.rule.kind == LINEAR else plan.users_zero_preserving(self.index)
