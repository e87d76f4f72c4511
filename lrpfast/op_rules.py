"""Ops linear in their computed inputs: one relevance step for all of them, one table entry per op.

An op whose output is a linear function of the tensors that carry relevance (the other arguments
constant: numbers, parameters, shapes) needs no rule of its own. With z = f(x_1, ..., x_n) and J_i
its Jacobian in x_i, the ε rule of a linear map is

    LINEAR   R_i = x_i ⊙ J_iᵀ (R / stab(z))              (negation, subtraction, division by a
                                                        constant, sum over dims, interpolation;
                                                        AttnLRP's softmax rule has this form too)
    BILINEAR R_i = x_i ⊙ J_iᵀ (R / stab(z)) / n          (a product of n computed factors, linear in
                                                        each: matmul, einsum; AttnLRP's uniform
                                                        rule, an even split; one computed factor
                                                        and constants: LINEAR)

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

from .nodes import DENSE, LAZY, Msg, _EpsilonStep, materialize, per_sample
from .ops import RelevanceError
from .shape_trace import written

COPY, LINEAR, BILINEAR = "copy", "linear", "bilinear"

# Methods whose other tensor gives only a dtype, device or shape (x.type_as(y), x.to(y),
# x.view_as(y), x.reshape_as(y), x.expand_as(y)): y's data never reaches the output, so y is no
# operand of the relevance pass. Counting it made (h.to(float64)).type_as(h) a function of two
# tensors, which the derived rules then took for an activation (a silently wrong map).
SHAPE_SOURCE_METHODS = frozenset({"type_as", "to", "view_as", "reshape_as", "expand_as"})


def data_operands(node):
    """The part of an fx node's (args, kwargs) whose tensors' data reach its output."""
    if node.op == "call_method" and node.target in SHAPE_SOURCE_METHODS and node.args:
        return node.args[:1]
    return (node.args, node.kwargs)


class OpRule(NamedTuple):
    kind: str                                   # COPY or LINEAR (module docstring)
    batch_args: Optional[Callable] = None       # (args, kwargs, ndim) -> the dims the op acts along, or
                                                # None when it cannot be told: checked to spare dim 0
    sign_preserving: bool = False               # output >= 0 where the computed inputs are
    only_first_computed: bool = False           # the other operands must be constants (x / c)
    check: Optional[Callable] = None            # (args, kwargs, xs, computed) -> why it is refused, or None
    linearized: Optional[Callable] = None       # the function whose Jacobian the rule takes, where it is not
                                                # the op's own (a norm with its σ held constant)
    values: bool = False                        # the op returns (values, indices) (x.max(dim)): the values
                                                # are the output the rule is about, the indices carry none
    casts: bool = False                         # the op may return another dtype (softmax(x, dtype=float32) in a
                                                # float64 or bfloat16 model): its output is the z of the rule


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


def _softmax_dims(args, kwargs, ndim):
    return _dims(_arg(args, kwargs, 1, "dim"), ndim)


def _matmul_check(args, kwargs, xs, computed):
    """A matmul contracts over the batch when a computed operand is a matrix on the right, or two
    computed matrices meet: only batched products ((B, ..., n, k) @ (B, ..., k, m), or a computed
    left operand times a constant) keep the samples apart."""
    a, b = args[0], args[1]
    if computed(b) and b.dim() < 3:
        return "multiplies by a computed matrix on the right whose rows would mix the samples"
    if computed(a) and computed(b) and a.dim() != b.dim():
        return "multiplies computed tensors of different ranks (their batch dims would not line up)"
    return None


def _einsum_check(args, kwargs, xs, computed):
    eq = args[0]
    operands = list(args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(eq, str) or "->" not in eq:
        return "needs an explicit output ('...->...') to tell where the batch goes"
    ins, out = eq.replace(" ", "").split("->")
    for sub, t in zip(ins.split(","), operands):
        if computed(t) and not (sub[:1] == out[:1] != "" and (sub[0] != "." or out.startswith("..."))):
            return f"does not keep the batch (the first index of {sub!r}) first in its output {out!r}"
    return None


def _addmm_dims(args, kwargs, ndim):
    return [1]   # rows (the batch, or the batch merged with tokens) stay apart; dim 1 is contracted


def _addmm_check(args, kwargs, xs, computed):
    """addmm(bias, x, W): linear in x when the bias and W are constants (GPT-2's Conv1D)."""
    bias, mat2 = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 2, "mat2")
    if computed(bias) or computed(mat2):
        return "adds or multiplies by a tensor computed from the input (only addmm(constant, x, constant) is linear)"
    if _arg(args, kwargs, 3, "beta", 1) != 1 or _arg(args, kwargs, 4, "alpha", 1) != 1:
        return "scales with beta/alpha != 1"
    return None


def _gather_dims(args, kwargs, ndim):
    return _dims(_arg(args, kwargs, 1, "dim"), ndim)


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
    torch.matmul: OpRule(BILINEAR, check=_matmul_check),
    operator.matmul: OpRule(BILINEAR, check=_matmul_check),
    torch.bmm: OpRule(BILINEAR, check=_matmul_check),
    torch.einsum: OpRule(BILINEAR, check=_einsum_check),
    torch.masked_fill: OpRule(COPY, _none),
    torch.addmm: OpRule(LINEAR, _addmm_dims, check=_addmm_check),        # GPT-2's Conv1D: bias + x @ W
    torch.gather: OpRule(COPY, _gather_dims, sign_preserving=True),     # a constant index (lrpfast/hf.py)
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
    **{cast: OpRule(COPY, _none, sign_preserving=True) for cast in ("float", "double", "half", "bfloat16", "to",
                                                                     "type_as", "type")},
    "matmul": OpRule(BILINEAR, check=_matmul_check),
    "bmm": OpRule(BILINEAR, check=_matmul_check),
    "masked_fill": OpRule(COPY, _none),
    "addmm": OpRule(LINEAR, _addmm_dims, check=_addmm_check),
    "gather": OpRule(COPY, _gather_dims, sign_preserving=True),
}

# ---- more ops that copy or sum elements: unfold (sliding windows), im2col/col2im, interleaved
# repeats, max/min over dims (the winner takes the relevance: the LINEAR rule through amax's autograd,
# whose Jacobian is the winner's indicator, as max pooling), transposed convolutions (linear in x)


def _repeat_interleave_dims(args, kwargs, ndim):
    d = _arg(args, kwargs, 2, "dim")
    return None if d is None else _dims(d, ndim)   # no dim: flattens, samples mixed


def _unfold_dims(args, kwargs, ndim):
    return _dims(_arg(args, kwargs, 1, "dimension"), ndim)


def _reduce_dims(args, kwargs, ndim):
    d = _arg(args, kwargs, 1, "dim", ())
    return list(range(ndim)) if d is None or d == () or d == [] else _dims(d, ndim)


def _index_check(args, kwargs, xs, computed):
    """x[:, idx] with constant index lists/tensors: the batch (dim 0) must be taken whole."""
    item = args[1]
    entries = item if isinstance(item, tuple) else (item,)
    if not entries or not (isinstance(entries[0], slice) and entries[0] == slice(None)):
        return f"indexes dim 0 with {entries[0] if entries else item!r}; advanced indexing keeps the batch only as x[:, ...]"
    if any(e is Ellipsis for e in entries[1:]) and any(isinstance(e, (list, torch.Tensor)) and
                                                     getattr(e, "dtype", None) == torch.bool for e in entries):
        return "mixes a bool mask with '...'"
    return None


FUNCTIONS.update({
    torch.repeat_interleave: OpRule(COPY, _repeat_interleave_dims, sign_preserving=True),
    F.unfold: OpRule(COPY, _spatial, sign_preserving=True),
    F.fold: OpRule(LINEAR, _none, sign_preserving=True),
    torch.amax: OpRule(LINEAR, _reduce_dims, sign_preserving=True),
    torch.amin: OpRule(LINEAR, _reduce_dims, sign_preserving=True),
    F.conv_transpose1d: OpRule(LINEAR, _none, only_first_computed=True),
    F.conv_transpose2d: OpRule(LINEAR, _none, only_first_computed=True),
    F.conv_transpose3d: OpRule(LINEAR, _none, only_first_computed=True),
})
METHODS.update({
    "repeat_interleave": OpRule(COPY, _repeat_interleave_dims, sign_preserving=True),
    "unfold": OpRule(COPY, _unfold_dims, sign_preserving=True),
    "amax": OpRule(LINEAR, _reduce_dims, sign_preserving=True),
    "amin": OpRule(LINEAR, _reduce_dims, sign_preserving=True),
})


# ---- x.max(dim) / torch.min(x, dim): (values, indices). The values are amax's, and the winner takes
# the relevance as in max pooling: the LINEAR rule through the values' own autograd (its Jacobian
# the indicator of the index max returns, ties included). The indices (lrpfast/graph/function_steps.py: item 1) carry none.
# addcmul(c, a, b) = c + value·a·b with at most one of a, b computed: linear in the computed
# tensors (GlobalResponseNorm's bias + γ·(x·n), ResMLP's Affine); a constant c absorbs its share.


def _max_check(args, kwargs, xs, computed):
    d = _arg(args, kwargs, 1, "dim")
    if isinstance(d, torch.Tensor):
        return "takes the elementwise max/min of two tensors, which has no relevance rule (a max over a dim has)"
    if d is None:
        return "reduces over all dims, the batch included (give a dim)"
    return None


def _max_values(*args, **kwargs):
    return torch.max(*args, **kwargs)[0]


def _min_values(*args, **kwargs):
    return torch.min(*args, **kwargs)[0]


def _addcmul_check(args, kwargs, xs, computed):
    if computed(_arg(args, kwargs, 1, "tensor1")) and computed(_arg(args, kwargs, 2, "tensor2")):
        return "multiplies two tensors computed from the input (only one factor may be computed)"
    return None


def _where_check(args, kwargs, xs, computed):
    """torch.where(condition, a, b) / a.where(condition, b): every output entry is one of a's or b's
    (GPT-2's eager attention masks its scores so); the one-argument form returns indices."""
    if len(args) + len(kwargs) < 3:
        return "with one argument returns indices, which carry no relevance (give the two values)"
    return None


_WHERE = OpRule(COPY, _none, check=_where_check)
FUNCTIONS[torch.where] = _WHERE
METHODS["where"] = _WHERE

_MAX = OpRule(LINEAR, _sum_dims, sign_preserving=True, check=_max_check, linearized=_max_values, values=True)
_MIN = OpRule(LINEAR, _sum_dims, sign_preserving=True, check=_max_check, linearized=_min_values, values=True)
_ADDCMUL = OpRule(LINEAR, _none, check=_addcmul_check)
FUNCTIONS.update({torch.max: _MAX, torch.min: _MIN, torch.addcmul: _ADDCMUL})
METHODS.update({"max": _MAX, "min": _MIN, "addcmul": _ADDCMUL})

# x[:, [0, 2, 1]] / x[:, :, idx]: constant indices on non-batch dims copy elements (lrpfast/graph/function_steps.py's getitem)
ADVANCED_INDEX = OpRule(COPY, _none, sign_preserving=True, check=_index_check)

# AttnLRP's softmax rule (lrpfast/graph/function_steps.py sends softmax here under attention="attnlrp"; under "cp" the
# attention weights are constants)
SOFTMAX = OpRule(LINEAR, _softmax_dims, casts=True)


# ---- norms: the normaliser σ held constant (the LayerNorm rule of the README), so the map is
# linear (x − mean)/σ·γ (+ β: absorbs its share); the forward stays the op's own


def _group_norm_linear(input, num_groups, weight=None, bias=None, eps=1e-5):
    b, c = input.shape[:2]
    g = input.reshape(b, num_groups, -1)
    sigma = torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps).detach()
    y = ((g - g.mean(-1, keepdim=True)) / sigma).reshape(input.shape)
    shape = (1, c) + (1,) * (input.dim() - 2)
    y = y if weight is None else y * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def _rms_norm_linear(input, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    y = input / torch.sqrt(input.pow(2).mean(dims, keepdim=True) + eps).detach()
    return y if weight is None else y * weight


def _normalize_linear(input, p=2.0, dim=1, eps=1e-12, out=None):
    return input / input.norm(p, dim, keepdim=True).clamp_min(eps).detach()


def _group_norm_dims(args, kwargs, ndim):
    return list(range(1, ndim))


def _last_dims(args, kwargs, ndim):
    shape = _arg(args, kwargs, 1, "normalized_shape")
    n = 1 if isinstance(shape, int) else len(shape)
    return list(range(ndim - n, ndim))


def _normalize_dims(args, kwargs, ndim):
    return _dims(_arg(args, kwargs, 2, "dim", 1), ndim)


FUNCTIONS[F.group_norm] = OpRule(LINEAR, _group_norm_dims, linearized=_group_norm_linear)
FUNCTIONS[F.normalize] = OpRule(LINEAR, _normalize_dims, linearized=_normalize_linear)
if hasattr(F, "rms_norm"):
    FUNCTIONS[F.rms_norm] = OpRule(LINEAR, _last_dims, linearized=_rms_norm_linear)


# ---- modules that are one of the ops above: (op rule, the functional call of the module)
MODULES = {
    torch.nn.GroupNorm: (FUNCTIONS[F.group_norm],
                         lambda m: (F.group_norm, (m.num_groups, m.weight, m.bias, m.eps))),
    torch.nn.Upsample: (FUNCTIONS[F.interpolate],
                        lambda m: (F.interpolate, (m.size, m.scale_factor, m.mode, m.align_corners))),
    torch.nn.Softmax: (SOFTMAX, lambda m: (F.softmax, (m.dim,))),
    torch.nn.ZeroPad2d: (FUNCTIONS[F.pad], lambda m: (F.pad, (tuple(m.padding),))),
    torch.nn.ConstantPad1d: (FUNCTIONS[F.pad], lambda m: (F.pad, (tuple(m.padding), "constant", m.value))),
    torch.nn.ConstantPad2d: (FUNCTIONS[F.pad], lambda m: (F.pad, (tuple(m.padding), "constant", m.value))),
    torch.nn.ConstantPad3d: (FUNCTIONS[F.pad], lambda m: (F.pad, (tuple(m.padding), "constant", m.value))),
    torch.nn.ReflectionPad1d: (FUNCTIONS[F.pad], lambda m: (F.pad, (tuple(m.padding), "reflect"))),
    torch.nn.ReflectionPad2d: (FUNCTIONS[F.pad], lambda m: (F.pad, (tuple(m.padding), "reflect"))),
    torch.nn.ReplicationPad2d: (FUNCTIONS[F.pad], lambda m: (F.pad, (tuple(m.padding), "replicate"))),
}
MODULES.update({
    torch.nn.Unfold: (FUNCTIONS[F.unfold], lambda m: (F.unfold, (m.kernel_size, m.dilation, m.padding, m.stride))),
    torch.nn.Fold: (FUNCTIONS[F.fold], lambda m: (F.fold, (m.output_size, m.kernel_size, m.dilation, m.padding,
                                                           m.stride))),
})
# a transposed convolution is linear in x: the ε rule with its weights constant, its bias absorbing
# its share (the z+/αβ rules of a composite do not reach it). The module itself is the function.
for _ct in (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d):
    MODULES[_ct] = (OpRule(LINEAR, _none), lambda m: (_checked_conv_transpose(m), ()))


def _checked_conv_transpose(m):
    if m.padding_mode != "zeros":
        raise RelevanceError(f"LRP: {type(m).__name__} with padding_mode={m.padding_mode!r}: only zero padding")
    return lambda x: m(x)


if hasattr(torch.nn, "RMSNorm"):
    MODULES[torch.nn.RMSNorm] = (FUNCTIONS[F.rms_norm],
                                 lambda m: (F.rms_norm, (tuple(m.normalized_shape), m.weight, m.eps)))


def module_rule(m):
    """(op rule, fn, constant args) for a module that is one of the ops above, else None. Only
    the module's own class (a subclass with its own forward is traced through instead)."""
    entry = MODULES.get(type(m))
    if entry is None:
        return None
    rule, call = entry
    fn, extra = call(m)
    return rule, fn, extra



# ---- in-place writes that keep part of the tensor: lrpfast/shape_trace.py traces `t[i] = v`,
# `t.copy_(v)`, `t.fill_(c)` on a computed tensor as `written(dst, method, ...)`, a new value (dst
# itself unchanged; in-place ops that rewrite all of dst, x.add_(y), become their out-of-place twins
# there). Each copies elements (COPY): the overwritten entries of dst get no relevance, the written
# values theirs. The batch must stay whole: t[:, ...] = v.


def _write_index_check(args, kwargs, xs, computed):
    item = args[2]
    entries = item if isinstance(item, tuple) else (item,)
    if not entries or not (isinstance(entries[0], slice) and entries[0] == slice(None)):
        return (f"writes into dim 0 with index {entries[0] if entries else item!r}; an assignment keeps the batch "
                "whole only as t[:, ...] = v")
    return None


def _write_copy_check(args, kwargs, xs, computed):
    src = args[2] if len(args) > 2 else kwargs.get("src")
    if computed(src) and src.dim() == args[0].dim() and src.shape[0] != args[0].shape[0]:
        return "copies one sample's values into every sample"
    return None


WRITES = {
    "__setitem__": OpRule(COPY, _none, check=_write_index_check),
    "copy_": OpRule(COPY, _none, check=_write_copy_check),
    "fill_": OpRule(COPY, _none),
    "zero_": OpRule(COPY, _none, sign_preserving=True),
}


def lookup(op: str, target, args=()) -> Optional[OpRule]:
    if op == "call_method":
        return METHODS.get(target)
    if target is written and len(args) > 1:
        return WRITES.get(args[1])
    try:
        return FUNCTIONS.get(target)
    except TypeError:   # an unhashable target
        return None


class LinearOpStep(_EpsilonStep):
    """One node whose op has an entry above; its computed inputs are `inputs` (module docstring)."""

    def __init__(self, name, fn, args, kwargs, load, op, rule: OpRule, eps, stabilizer, extra=()):
        super().__init__(name, eps, stabilizer)
        self.fn, self.args, self.kwargs, self.load, self.op, self.rule = fn, args, kwargs, load, op, rule
        self.extra = tuple(extra)   # a module's constant arguments, after the input (module_rule)
        self.sign_preserving = rule.sign_preserving and rule.kind != BILINEAR
        if rule.kind == COPY:   # views (expand) or copies: nothing to divide, nothing to rectify in place
            self.has_denominator = False
            self.fresh_output = False

    def forward(self, env, call):
        args, kwargs = self.load(env, self.args, self.kwargs)
        args = (*args, *self.extra)
        z = out = self.fn(*args, **kwargs)
        if self.rule.values and isinstance(z, tuple):
            z = z[0]   # (values, indices): the values carry the relevance (lrpfast/graph/function_steps.py's getitem takes them)
        # computed inputs that carry relevance: floating tensors (a bool mask computed from the
        # input selects, it carries none)
        xs = [env[i] for i in self.inputs]
        carries = [x.is_floating_point() for x in xs]
        xs = [x for x, c in zip(xs, carries) if c]
        if self.rule.check is not None:
            ids = {id(x) for x in xs}
            why = self.rule.check(args, kwargs, xs, lambda t: isinstance(t, torch.Tensor) and id(t) in ids)
            if why:
                raise RelevanceError(f"LRP: {self.describe()} {why}")
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
        if self.rule.kind != COPY and not self.rule.casts and xs and z.dtype != xs[0].dtype:
            raise RelevanceError(f"LRP: {self.describe()} changes the dtype ({xs[0].dtype} -> {z.dtype})")
        call.saved[self.index] = (args, kwargs, xs, z, carries)
        return out

    def denominator(self, call):
        if self.rule.kind == COPY:
            return None
        return call.saved[self.index][3], self.eps, self.stabilizer

    def output_of(self, call):
        return call.saved[self.index][3]

    def saved_extra(self, call):
        return tuple(call.saved[self.index][2])   # the inputs, for the vector-Jacobian products

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
                out = (self.rule.linearized or self.fn)(*a, **kw)
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
        args, kwargs, xs, z, carries = call.saved[self.index]
        if not xs:
            return []
        targets = [i for i, c in zip(self.inputs, carries) if c]
        if self.rule.kind == COPY:
            cs = self._transpose(args, kwargs, xs, materialize(msg))
            return [(i, Msg(DENSE, c, None, True)) for i, c in zip(targets, cs)]
        s = self._s(msg, call)
        cs = self._transpose(args, kwargs, xs, s)
        if self.rule.kind == BILINEAR:
            # the uniform rule: each computed factor an even share (x @ x: x is two factors, and
            # x ⊙ Jᵀ(R/z) over both is 2R by Euler's theorem)
            ids = {id(x) for x in xs}
            n = sum(1 for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor) and id(v) in ids)
            if n > 1:
                cs = [c.mul_(1.0 / n) for c in cs]
        return [(i, Msg(LAZY, c, x, True)) for i, c, x in zip(targets, cs, xs)]

    def zero_preserving(self, plan):
        return True if self.rule.kind == LINEAR else plan.users_zero_preserving(self.index)
