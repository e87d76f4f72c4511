"""One step per graph node of a traced model: its forward, and its relevance step.

The whole-model pass (lrpfast/graph.py) runs `forward` for every step in graph order, then
`relprop` in reverse order. Relevance travels between steps as a Msg:

    DENSE    a = R                      the relevance itself
    LAZY     a = c, x:  R = x ⊙ c        the product with a layer's input not yet taken: the
                                        next lower step with a denominator z takes it inside its
                                        division, s = (x ⊙ c) / stab(z), one fused pass
                                        (ops.mul_stab_div) across the ReLU in between
    DIVIDED  a = s = R / stab(z') of    a max pooling above that step already divided (the
             the step numbered x        division fused with the winner-take-all scatter)

`owned` says that `a` is a temporary of this pass that a step may overwrite in place. x and z are
shared by the K maps of a sample: a relevance tensor has K*B rows (row b*K + k), x and z have B.

The batch dimension of a forward tensor may sit elsewhere than dim 0 (a sequence-first transformer:
x.transpose(0, 1) before nn.MultiheadAttention(batch_first=False)). `Call.bdim` records where, for
the steps whose output has it elsewhere; only steps with `batch_anywhere` accept such inputs, and
messages stay batch-first (K*B rows leading) whatever the forward layout: those steps save their
x and z as batch-first views (`Call.batch_first`).
"""
from __future__ import annotations

import math
import operator
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _fallback, canonize, merged_batch, ops
from .ops import RelevanceError
from .rules import Epsilon, LayerContext

DENSE, LAZY, DIVIDED = 0, 1, 2


class Msg(NamedTuple):
    kind: int
    a: torch.Tensor
    x: object = None
    owned: bool = False


def materialize(msg: Msg) -> torch.Tensor:
    if msg.kind == DENSE:
        return msg.a
    if msg.kind == LAZY:
        return ops.mul_input(msg.a, msg.x)
    raise RelevanceError("LRP internal error: a divided relevance reached a step without its denominator")


def per_sample(a: torch.Tensor, b: int) -> torch.Tensor:
    """(K*B, ...) as (B, K, ...): sample-major rows, so a view."""
    return a.view(b, a.shape[0] // b, *a.shape[1:])


def _dense_order(z: torch.Tensor):
    """The permutation that makes z contiguous, where z is a permuted dense tensor with its batch
    dim first (a (B, heads, L, D) view of a (B, L, heads, D) tensor); else None."""
    if z.dim() < 3 or z.is_contiguous() or torch.compiler.is_compiling():
        return None
    order = sorted(range(z.dim()), key=lambda d: (-z.stride(d), d))
    if order[0] != 0 or not z.permute(order).is_contiguous():
        return None
    return order


def divide(msg: Msg, z: torch.Tensor, eps: float, stabilizer: str) -> torch.Tensor:
    """s = R / stab(z), fused with the pending product when R is LAZY. Tensors laid out alike in
    a permuted order are divided in that order (the fused kernels would copy each to contiguous)."""
    if msg.kind == LAZY and msg.x.shape == z.shape:
        order = _dense_order(z)
        if order is not None and msg.a.permute(order).is_contiguous() and msg.x.permute(order).is_contiguous():
            s = ops.mul_stab_div(msg.a.permute(order), msg.x.permute(order), z.permute(order), eps, stabilizer)
            return s.permute([order.index(d) for d in range(z.dim())])
        return ops.mul_stab_div(msg.a, msg.x, z, eps, stabilizer)
    return ops.stab_div(materialize(msg), z, eps, stabilizer)


def combine(msgs: List[Msg]) -> Msg:
    """The relevance at a tensor used by several steps: the sum of what each sends back. LAZY
    messages with the same x add their c (x ⊙ c1 + x ⊙ c2 = x ⊙ (c1 + c2))."""
    if len(msgs) == 1:
        return msgs[0]
    first = msgs[0]
    if all(m.kind == LAZY and m.x is first.x for m in msgs):
        kind, x = LAZY, first.x
        parts = [m for m in msgs]
    elif all(m.kind == LAZY and m.a.shape == m.x.shape and m.a.dtype == m.x.dtype for m in msgs) \
            and not torch.compiler.is_compiling():
        # R = Σ x_i ⊙ c_i: the first product, then each further one added in the same pass (addcmul)
        acc = ops.mul_input(first.a, first.x)
        for m in msgs[1:]:
            acc.addcmul_(m.a, m.x)
        return Msg(DENSE, acc, None, True)
    else:
        kind, x = DENSE, None
        parts = [m if m.kind == DENSE else Msg(DENSE, materialize(m), None, True) for m in msgs]
    # Accumulate into a temporary of this pass when there is one (a residual's skip relevance
    # arrives as the shared, unowned s; the branch's c is ours to overwrite).
    first = next((i for i, m in enumerate(parts) if m.owned and m.a.is_contiguous()), 0)
    parts.insert(0, parts.pop(first))
    acc, owned = parts[0].a, parts[0].owned
    for m in parts[1:]:
        if owned and acc.shape == m.a.shape and acc.is_contiguous():
            acc.add_(m.a)
        else:
            acc, owned = acc + m.a, True
    return Msg(kind, acc, x, owned)


def relevance_sum(msg: Msg, b: int, k: int) -> torch.Tensor:
    """Σ R per map: (B, K) for a message of n*K rows, n = B*m (a merged batch: m rows per sample,
    lrpfast/merged_batch.py). A LAZY message is summed without forming x ⊙ c."""
    n = msg.a.shape[0] // k
    if msg.kind == LAZY:
        c = msg.a.reshape(n, k, -1)
        s = torch.bmm(c, msg.x.reshape(n, -1, 1).to(c.dtype)).squeeze(-1)
    else:
        s = materialize(msg).reshape(n, k, -1).sum(-1)
    return s.view(b, n // b, k).sum(1)


class Call:
    """The state of one call: what each step saved in its forward, denominators asked for."""

    __slots__ = ("saved", "dens", "fuse_pools", "steps", "logits", "bdim", "batch", "pending", "remat")

    def __init__(self, steps, fuse_pools: bool, batch: Optional[int] = None):
        self.steps = steps
        self.batch = batch   # B, the input's rows (a merged batch has B*m: lrpfast/merged_batch.py)
        self.saved = [None] * len(steps)
        self.dens = {}
        # step index -> its output recomputed in the relevance pass (None: not yet), for the steps
        # that keep no output for it (Step.remat: `value`)
        self.remat = {}
        self.fuse_pools = fuse_pools
        self.logits = None
        self.bdim = {}   # step index -> the batch dim of its output, where it is not 0
        self.pending = None   # during the relevance pass: step index -> messages waiting for it

    def batch_first(self, i: int, t):
        """Step i's output t (or a tensor laid out like it) as a batch-first view."""
        d = self.bdim.get(i, 0)
        return t.movedim(d, 0) if d and isinstance(t, torch.Tensor) else t

    def denominator(self, index: int):
        if index not in self.dens:
            self.dens[index] = self.steps[index].denominator(self)
        return self.dens[index]


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


# ============================================================================= base


class Step:
    """A graph node. Plan-time fields are filled by lrpfast.graph:
    index, src (the main tensor input's step, or None), inputs (the steps that receive relevance),
    deps (every step whose value the forward reads), users."""

    op = "?"                    # what the node computes, for messages
    tensor_output = True        # False for shape arithmetic (x.size(0))
    fresh_output = False        # the forward allocates its output (a ReLU may rectify it in place)
    has_denominator = False     # its relevance step starts with s = R / stab(z')
    batch_anywhere = False      # accepts inputs whose batch dim is not dim 0 (module docstring)
    # Its output is >= 0 wherever all its tensor inputs are (moves, selects, averages, sums them).
    # The plan trusts it: the z+/αβ rules skip their x- branch after such steps (graph._finish),
    # so only steps that guarantee it say so; a LayerNorm, a product with a constant or a sum with
    # a number do not.
    sign_preserving = False

    def __init__(self, name: str):
        self.name = name
        self.index = -1
        self.src: Optional[int] = None
        self.inputs: List[int] = []
        self.deps: List[int] = []
        self.users: List[int] = []

    def describe(self) -> str:
        return f"node {self.name!r} ({self.op})"

    def forward(self, env, call):
        raise NotImplementedError

    def relprop(self, msg: Msg, call: Call) -> List[Tuple[int, Msg]]:
        raise NotImplementedError

    def saved_extra(self, call: Call) -> Tuple[torch.Tensor, ...]:
        """Tensors the forward keeps for the relevance pass besides step outputs (attention
        weights): the memory scheduler counts them (lrp.LRP._profile)."""
        return ()

    def relprop_scratch(self, call: Call) -> int:
        """Bytes of temporaries this step's relevance pass holds per relevance map beyond the
        messages themselves (AttnLRP: attention-sized tensors); lrp.LRP._profile takes the largest."""
        return 0

    def denominator(self, call: Call):
        return None

    def output_of(self, call: Call):
        """This step's forward output, while the pass holds it (steps with a denominator)."""
        return None

    def zero_preserving(self, plan) -> bool:
        """The relevance this step sends to its inputs is 0 wherever an input is 0."""
        return False

    remat = False   # keeps no output for the relevance pass: recomputes it (`value`, module above)

    def recompute(self, call: Call):
        """This step's forward output again, from what the relevance pass still holds."""
        raise RelevanceError(f"LRP internal error: {self.describe()} cannot recompute its output")


class InputStep(Step):
    op = "input"

    def forward(self, env, call):
        raise AssertionError("the input is set by the pass")


class ConstStep(Step):
    """A parameter or buffer read by the graph (get_attr): a constant, it receives no relevance."""

    op = "get_attr"

    def __init__(self, name, value):
        super().__init__(name)
        self.value = value

    def forward(self, env, call):
        v = self.value
        return v.detach() if isinstance(v, torch.Tensor) else v

    def relprop(self, msg, call):
        return []   # a constant absorbs what reaches it (the output itself: a model constant in x, map 0)


class ConstExprStep(ConstStep):
    """A tensor computed from constants only (a class token expanded to the batch, a mask built
    from a buffer): a constant like the parameter it comes from, it receives no relevance. Where
    it enters a sum or a concatenation it absorbs its share like a bias."""

    def __init__(self, name, fn, args, kwargs, load, op):
        super().__init__(name, None)
        self.fn, self.args, self.kwargs, self.load, self.op = fn, args, kwargs, load, op

    def forward(self, env, call):
        args, kwargs = self.load(env, self.args, self.kwargs)
        return self.fn(*args, **kwargs)


class MetaStep(Step):
    """Shape arithmetic (x.size(0), x.shape, x.dim(), ints combined): no relevance."""

    op = "shape arithmetic"
    tensor_output = False
    batch_anywhere = True

    def __init__(self, name, fn, args, kwargs, load):
        super().__init__(name)
        self.fn, self.args, self.kwargs, self.load = fn, args, kwargs, load

    def forward(self, env, call):
        args, kwargs = self.load(env, self.args, self.kwargs)
        return self.fn(*args, **kwargs)

    def zero_preserving(self, plan):
        return True


# ============================================================================= layers with weights


class ContractionStep(Step):
    """nn.Linear / nn.Conv1d/2d/3d (BatchNorm after it folded in): the rule of the composite."""

    fresh_output = True
    has_denominator = True

    def __init__(self, name, module, kind, rule, bn=None, bn_name=None):
        super().__init__(name)
        self.module, self.kind, self.rule, self.bn, self.bn_name = module, kind, rule, bn, bn_name
        self.op = type(module).__name__ + (f" + {type(bn).__name__} (folded)" if bn is not None else "")
        self.cache: dict = {}   # the rule's per-layer cache (LayerContext.cache)
        self.is_first = False
        self.x_nonnegative = False
        self.output_feeds_relu = False
        self._stamp = None
        self._wb = None
        self.batch_anywhere = kind == "linear"   # over the last dim: any leading layout
        if kind == "conv":
            if getattr(module, "padding_mode", "zeros") != "zeros":
                raise RelevanceError(f"LRP: {self.describe()} has padding_mode={module.padding_mode!r}; only "
                                     "'zeros' is supported")
            dims = module.weight.dim() - 2
            self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
            self.stride = tuple(module.stride)
            self.dilation = tuple(module.dilation)
            self.groups = int(module.groups)
            # ints, or 'valid' / 'same' (even kernels: asymmetric, handled by lrpfast.contractions)
            self.padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        else:
            self.stride, self.padding, self.dilation, self.groups = (), 0, (), 1

    # A functional call (F.linear / F.conv2d inside a module's own forward: timm's ScaledStdConv2d
    # standardises its weight first) reads its weight and bias from the graph: `load_wb(env)`
    # gives them (constants: parameters or tensors computed from them only), and `module` is a
    # bare nn.Linear/nn.ConvNd that carries the call's geometry for the rules and composites.
    load_wb = None
    _fwb = (None, None)
    _plain = None   # (weight, bias, their detached views): params() without two detach() per call

    def params(self, env=None):
        """The weight and bias the forward runs with: the module's own (detached), or with the
        BatchNorm folded in, recomputed when the user changes a parameter or statistic; for a
        functional call, those of this call (env given) or of the last one."""
        m = self.module
        if self.load_wb is not None:
            if env is not None:
                w, b = self.load_wb(env)
                self._fwb = (w.detach(), None if b is None else b.detach())
            return self._fwb
        if self.bn is None:
            plain = self._plain
            if plain is not None and plain[0] is m.weight and plain[1] is m.bias and not torch.compiler.is_compiling() \
                    and plain[2][0].data_ptr() == m.weight.data_ptr() and plain[2][0].dtype == m.weight.dtype \
                    and (m.bias is None or (plain[2][1].data_ptr() == m.bias.data_ptr()
                                            and plain[2][1].dtype == m.bias.dtype)):
                # detached views of these very parameters, sharing their storage and version (a
                # `param.data = ...` swap, as module.to() does, changes the pointer: taken again)
                return plain[2]
            wb = m.weight.detach(), None if m.bias is None else m.bias.detach()
            if not torch.compiler.is_compiling():
                self._plain = (m.weight, m.bias, wb)
            return wb
        if torch.compiler.is_compiling():
            # Fold in the graph, every call: the stamp's `_version` is not traceable, and the
            # parameters are graph inputs, so this is never stale (lrpfast.modified_weights).
            return canonize.fold(m.weight.detach(), None if m.bias is None else m.bias.detach(), self.bn)
        stamp = canonize.source_version(m.weight, m.bias, *canonize.bn_tensors(self.bn))
        if stamp != self._stamp:
            self._wb = canonize.fold(m.weight.detach(), None if m.bias is None else m.bias.detach(), self.bn)
            self._stamp = stamp
            self.cache.clear()  # modified weights of the rule came from the old ones
        return self._wb

    def context(self, x=None, z=None, weight=None, bias=None) -> LayerContext:
        return LayerContext(name=self.name, module=self.module, kind=self.kind, x=x, z=z, weight=weight, bias=bias,
                            stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                            is_first=self.is_first, x_nonnegative=self.x_nonnegative, cache=self.cache,
                            output_feeds_relu=self.output_feeds_relu)

    def forward(self, env, call):
        x = env[self.src]
        w, b = self.params(env)
        if self.kind == "linear":
            z = F.linear(x, w, b)
            if self.bn is not None and z.dim() != 2:
                raise RelevanceError(f"LRP: {self.describe()}: a BatchNorm folded into a Linear needs (B, features) "
                                     f"outputs, got {tuple(z.shape)}")
        else:
            z = self.conv(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        later = self.remat_x and self.src in call.remat and not call.bdim   # x recomputed (module doc)
        call.saved[self.index] = self.context(LATER if later else call.batch_first(self.src, x),
                                              call.batch_first(self.src, z), w, b)
        return z

    remat_x = False   # x may be recomputed in the relevance pass (fusion.rematerialize)

    def _ctx(self, call):
        ctx = call.saved[self.index]
        if ctx.x is LATER:
            ctx.x = value(call, self.src)
        return ctx

    def denominator(self, call):
        return self.rule.denominator(self._ctx(call))

    def output_of(self, call):
        return call.saved[self.index].z

    def relprop(self, msg, call):
        ctx = self._ctx(call)
        rule = self.rule
        out = None
        if msg.kind == DIVIDED:
            s = msg.a
        else:
            den = call.denominator(self.index)
            if den is None:
                out = Msg(DENSE, rule.relprop(ctx, materialize(msg)), None, True)
            else:
                s = divide(msg, *den)
        if out is None:
            if self.kind == "linear" and type(rule).contract is Epsilon.contract and self._accumulate(ctx, s, call):
                return []
            contract = getattr(rule, "contract", None)
            c = contract(ctx, s) if contract is not None else None
            if c is None:
                out = Msg(DENSE, rule.relprop_from_s(ctx, s), None, True)
            else:
                out = Msg(LAZY, c, ctx.x, True)
        return [(self.src, out)]

    def _accumulate(self, ctx, s, call) -> bool:
        """Wᵀs added into the message another reader of x has already sent x (q, k and v
        projections of one normalised x; a gate and an up projection): R = x ⊙ (c1 + c2) is one
        message either way, and the sum is taken inside the GEMM (addmm) instead of a pass after."""
        pending = call.pending[self.src] if call.pending is not None else None
        if not pending or len(pending) != 1 or torch.compiler.is_compiling():
            return False
        m = pending[0]
        w = ctx.weight
        if not (m.kind == LAZY and m.owned and m.x is ctx.x and m.a.is_contiguous() and m.a.dtype == s.dtype
                and w.dtype == s.dtype and m.a.shape == (*s.shape[:-1], w.shape[1]) and s.is_contiguous()):
            return False
        m.a.view(-1, w.shape[1]).addmm_(s.view(-1, w.shape[0]), w)
        return True

    def zero_preserving(self, plan):
        return bool(getattr(self.rule, "input_proportional", False))


# ============================================================================= parameter-free ε steps


class _EpsilonStep(Step):
    """A step whose relevance rule is ε with the LRP's eps/stabiliser: s = R / stab(z) over its own
    output z, then a linear map of s, then ⊙ x."""

    fresh_output = True
    has_denominator = True

    def __init__(self, name, eps, stabilizer):
        super().__init__(name)
        self.eps, self.stabilizer = eps, stabilizer

    def denominator(self, call):
        return call.saved[self.index][1], self.eps, self.stabilizer

    def output_of(self, call):
        return call.saved[self.index][1]

    def _s(self, msg, call):
        if msg.kind == DIVIDED:
            return msg.a
        return divide(msg, *call.denominator(self.index))

    def zero_preserving(self, plan):
        return True


class BatchNormStep(_EpsilonStep):
    """A BatchNorm that cannot be folded into a layer before it (DenseNet: after a concatenation):
    the per-channel affine map y = a x + b with the ε rule, R_in = x ⊙ a ⊙ R / stab(y)."""

    def __init__(self, name, bn, eps, stabilizer):
        super().__init__(name, eps, stabilizer)
        self.bn = bn
        self.op = type(bn).__name__
        self._stamp = None
        self._scale = None

    def scale(self):
        if torch.compiler.is_compiling():  # in the graph, as ContractionStep.params
            return canonize.affine(self.bn)[0]
        stamp = canonize.source_version(*canonize.bn_tensors(self.bn))
        if stamp != self._stamp:
            self._scale, _ = canonize.affine(self.bn)
            self._stamp = stamp
        return self._scale

    def forward(self, env, call):
        x = env[self.src]
        bn = self.bn
        if x.dim() < 2 or x.shape[1] != bn.running_mean.shape[0]:
            raise RelevanceError(f"LRP: {self.describe()} expects (B, {bn.running_mean.shape[0]}, ...) input, got "
                                 f"{tuple(x.shape)}")
        y = F.batch_norm(x, bn.running_mean.detach(), bn.running_var.detach(),
                         None if bn.weight is None else bn.weight.detach(),
                         None if bn.bias is None else bn.bias.detach(), False, 0.0, bn.eps)
        call.saved[self.index] = (x, y)
        return y

    def relprop(self, msg, call):
        x, y = call.saved[self.index]
        s = self._s(msg, call)
        a = self.scale().to(s.dtype).reshape(1, -1, *([1] * (s.dim() - 2)))
        # s is a temporary of this step (a fused division's output, or a pooling's scatter)
        return [(self.src, Msg(LAZY, s.mul_(a), x, True))]


_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


class AvgPoolStep(_EpsilonStep):
    """AvgPool1d/2d/3d (module or functional): each input's share of the window mean."""

    sign_preserving = True

    def __init__(self, name, dims, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
                 eps, stabilizer, op):
        super().__init__(name, eps, stabilizer)
        self.op = op
        tup = lambda v: (v,) * dims if isinstance(v, int) else tuple(v)  # noqa: E731
        self.dims = dims
        self.kernel_size = tup(kernel_size)
        self.stride = self.kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0) \
            else tup(stride)
        self.padding = tup(padding)
        self.ceil_mode, self.count_include_pad, self.divisor_override = bool(ceil_mode), bool(count_include_pad), \
            divisor_override

    def forward(self, env, call):
        x = env[self.src]
        if self.dims == 1:
            z = F.avg_pool1d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)
        else:
            z = _AVG[self.dims](x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                self.count_include_pad, self.divisor_override)
        call.saved[self.index] = (x, z)
        return z

    def relprop(self, msg, call):
        x, z = call.saved[self.index]
        s = self._s(msg, call)
        c = _fallback.avg_pool_contract(s, x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                        self.count_include_pad, self.divisor_override)
        return [(self.src, Msg(LAZY, c, x, True))]


class AdaptiveAvgPoolStep(_EpsilonStep):
    sign_preserving = True

    def __init__(self, name, dims, output_size, eps, stabilizer, op):
        super().__init__(name, eps, stabilizer)
        self.dims, self.output_size, self.op = dims, output_size, op

    def forward(self, env, call):
        x = env[self.src]
        z = _ADAPTIVE[self.dims](x, self.output_size)
        call.saved[self.index] = (x, z)
        return z

    def relprop(self, msg, call):
        x, z = call.saved[self.index]
        s = self._s(msg, call)
        c = _fallback.adaptive_avg_pool_contract(s, x)
        return [(self.src, Msg(LAZY, c, x, True))]


def _batch_first_dim(d: int, bd: int) -> int:
    """Dim d of a tensor whose batch is at dim bd, once the batch is moved to dim 0."""
    return d + 1 if d < bd else d


class MeanStep(_EpsilonStep):
    """x.mean(dims) over non-batch dims (global average pooling written by hand; the mean over
    the tokens of a sequence-first transformer, x.mean(0) with x (L, B, E)); x.sum(dims) with
    total=True (the heads of an ensemble stacked before the batch, lrpfast/stacking.py)."""

    sign_preserving = True

    op = "mean"
    batch_anywhere = True

    def __init__(self, name, dims, keepdim, eps, stabilizer, total=False):
        super().__init__(name, eps, stabilizer)
        self.mean_dims, self.keepdim, self.total = dims, keepdim, total
        if total:
            self.op = "sum"

    def forward(self, env, call):
        x = env[self.src]
        bd = call.bdim.get(self.src, 0)
        dims = tuple(d % x.dim() for d in self.mean_dims)
        if bd in dims:
            raise RelevanceError(f"LRP: {self.describe()} {'sums' if self.total else 'averages'} over the batch dimension")
        out = x.sum(dims, keepdim=self.keepdim) if self.total else x.mean(dims, keepdim=self.keepdim)
        z = out
        if bd:   # the relevance pass works batch-first: x, z and the dims as views with the batch first
            out_bd = bd if self.keepdim else bd - sum(d < bd for d in dims)
            call.bdim[self.index] = out_bd   # explicit, also when 0: the batch moved to the front
            x, z = x.movedim(bd, 0), (out.movedim(out_bd, 0) if out_bd else out)
            dims = tuple(_batch_first_dim(d, bd) for d in dims)
        call.saved[self.index] = (x, z, dims)
        return out

    def denominator(self, call):
        return call.saved[self.index][1], self.eps, self.stabilizer

    def relprop(self, msg, call):
        x, z, dims = call.saved[self.index]
        s = self._s(msg, call)
        n = 1 if self.total else math.prod([x.shape[d] for d in dims])  # a list: dynamo refuses a generator
        if not self.keepdim:
            for d in sorted(dims):
                s = s.unsqueeze(d)
        c = (s / n).expand(s.shape[0], *x.shape[1:])
        return [(self.src, Msg(LAZY, c, x, False))]


class AddStep(_EpsilonStep):
    """a + b (residual connections): R_i = a_i ⊙ R / stab(a + b), each summand its share. A
    constant summand (a parameter, a number) absorbs its share like a bias."""

    op = "add"
    batch_anywhere = True

    def __init__(self, name, fn, args, kwargs, load, eps, stabilizer):
        super().__init__(name, eps, stabilizer)
        self.fn, self.args, self.kwargs, self.load = fn, args, kwargs, load

    def forward(self, env, call):
        args, kwargs = self.load(env, self.args, self.kwargs)
        z = self.fn(*args, **kwargs)
        operands = [env[i] for i in self.inputs]
        for i, t in zip(self.inputs, operands):
            if isinstance(t, torch.Tensor) and t.shape != z.shape and call.steps[i].tensor_output \
                    and not isinstance(call.steps[i], ConstStep) and (t.dim() != z.dim() or t.shape[0] != z.shape[0]):
                raise RelevanceError(f"LRP: {self.describe()} broadcasts a summand of shape {tuple(t.shape)} to "
                                     f"{tuple(z.shape)} across samples; only broadcasting within a sample is "
                                     "supported")
        dims = {call.bdim.get(i, 0) for i in self.inputs if not isinstance(call.steps[i], ConstStep)}
        if len(dims) > 1:
            raise RelevanceError(f"LRP: {self.describe()} adds tensors with the batch at different dims {sorted(dims)}")
        d = dims.pop() if dims else 0
        if d:  # save batch-first views (a constant summand receives nothing: leave it)
            call.bdim[self.index] = d
            operands = [t.movedim(d, 0) if isinstance(t, torch.Tensor) and t.shape == z.shape else t for t in operands]
        call.saved[self.index] = (operands, z.movedim(d, 0) if d else z)
        return z

    def relprop(self, msg, call):
        operands, z = call.saved[self.index]
        s = self._s(msg, call)
        # a summand broadcast within the sample (x + x.sum(1, keepdim=True)) collects the share of
        # every position it was added at: the transpose of its broadcast
        steps = call.steps
        return [(i, Msg(LAZY, s if t.shape == z.shape else s.sum_to_size((s.shape[0], *t.shape[1:])), t,
                        t.shape != z.shape)) for i, t in zip(self.inputs, operands)
                if not isinstance(steps[i], ConstStep)]   # a constant summand absorbs its share


class MulStep(_EpsilonStep):
    """a * b, elementwise (broadcasting within the sample). With s = R / stab(z):

    - one factor constant (a number, a parameter, a tensor computed from parameters: ConvNeXt's
      layer scale): a diagonal linear map under the ε rule, R_x = x ⊙ c ⊙ s;
    - both factors computed (squeeze-and-excitation gates, gated MLPs): the uniform rule of
      AttnLRP (Achtibat et al. 2024), the ε rule's relevance split evenly between the factors,
      R_a = ½ a ⊙ b ⊙ s and R_b = ½ b ⊙ Σ(a ⊙ s), the sum over the dims b is broadcast along (an
      SE gate of shape (B, C, 1, 1) collects the relevance of its whole channel)."""

    op = "mul"

    def __init__(self, name, fn, args, kwargs, load, eps, stabilizer, factors):
        super().__init__(name, eps, stabilizer)
        self.fn, self.args, self.kwargs, self.load = fn, args, kwargs, load
        self.factors = factors   # per factor: its step index when computed, else None (a constant)

    def forward(self, env, call):
        args, kwargs = self.load(env, self.args, self.kwargs)
        z = self.fn(*args, **kwargs)
        values = [env[i] if i is not None else None for i in self.factors]
        if not isinstance(z, torch.Tensor):
            raise RelevanceError(f"LRP: {self.describe()} multiplies no tensor")
        for i, t in zip(self.factors, values):
            if i is not None and (t.dim() != z.dim() or t.shape[0] != z.shape[0]):
                raise RelevanceError(f"LRP: {self.describe()} broadcasts the factor of shape {tuple(t.shape)} across "
                                     f"samples or leading dims of {tuple(z.shape)}; only broadcasting within a "
                                     "sample (e.g. (B, C, 1, 1) gates) is supported")
        if all(t.shape == z.shape and t.dtype == z.dtype for i, t in zip(self.factors, values) if i is not None):
            # no computed factor broadcast: R_i = z ⊙ s / n for each (relprop), the factors not needed
            if self.remat and not call.bdim and not torch.compiler.is_compiling():
                call.remat[self.index] = None   # z recomputed from the factors (module doc: `value`)
                call.saved[self.index] = (None, LATER, None)
            else:
                call.saved[self.index] = (None, z, None)
            return z
        operands = list(args[:2]) + ([kwargs["other"]] if len(args) < 2 else [])
        const = [a for a, i in zip(operands, self.factors) if i is None]   # numbers, parameters
        call.saved[self.index] = (values, z, const)
        return z

    def recompute(self, call):
        args, kwargs = self.load(RematEnv(call), self.args, self.kwargs)
        return self.fn(*args, **kwargs)

    def denominator(self, call):
        z = call.saved[self.index][1]
        return (take(call, self.index) if z is LATER else z), self.eps, self.stabilizer

    def output_of(self, call):
        z = call.saved[self.index][1]
        return None if z is LATER else z

    def relprop(self, msg, call):
        values, z, const = call.saved[self.index]
        s = self._s(msg, call)                      # R / stab(z): K*B rows
        later = z is LATER
        if later:   # recomputed by `denominator`, unless a step above divided already
            z = call.dens[self.index][0] if self.index in call.dens else take(call, self.index)
        if values is None:
            n = sum(i is not None for i in self.factors)
            if later and n > 1 and msg.kind != DIVIDED and s.shape == z.shape and not torch.compiler.is_compiling():
                # the recomputed z is dropped here: each factor's (1/n) z ⊙ s is formed once, in s's
                # buffer (our division's), one dense message for all (not z kept till the last reads it)
                s = s.mul_(1.0 / n).mul_(z)
                return [(i, Msg(DENSE, s, None, False)) for i in self.factors if i is not None]
            # Each computed factor t of z = Π factors gets (1/n) t ⊙ (Π others) ⊙ s = (1/n) z ⊙ s:
            # one message (s/n, z) for all of them, read by each recipient's own division
            computed = [i for i in self.factors if i is not None]
            if len(computed) > 1:
                s = s.mul_(1.0 / len(computed)) if msg.kind != DIVIDED else s * (1.0 / len(computed))
            return [(i, Msg(LAZY, s, z, len(computed) == 1)) for i in computed]
        b = z.shape[0]
        computed = [(i, t) for i, t in zip(self.factors, values) if i is not None]
        share = 1.0 / len(computed)                 # uniform rule: ½ each for two computed factors
        out = []
        for j, (i, t) in enumerate(computed):
            c = s
            for cst in const:   # a factor held constant may be per sample (derived.py): K maps each
                c = _times_per_sample(c, cst, b) if isinstance(cst, torch.Tensor) and cst.dim() == z.dim() \
                    and cst.shape[0] == b else c * cst
            for jj, (_, other) in enumerate(computed):
                if jj != j:                         # the other computed factor, per sample
                    c = _times_per_sample(c, other, b)
            if share != 1.0:
                c.mul_(share)                       # c is fresh: the other factor multiplied it
            dims = [d for d in range(1, z.dim()) if t.shape[d] == 1 and z.shape[d] != 1]
            if dims:
                c = c.sum(dims, keepdim=True)
            out.append((i, Msg(LAZY, c, t, True)))
        return out


def _times_per_sample(c: torch.Tensor, t: torch.Tensor, b: int) -> torch.Tensor:
    """c (K*B rows) ⊙ t (B rows), t broadcast over the K maps of its sample."""
    if not b or c.shape[0] == b:
        return c * t
    out = per_sample(c, b) * t.unsqueeze(1)
    return out.reshape(c.shape[0], *out.shape[2:])


MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)


# ============================================================================= max pooling

_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class MaxPoolStep(Step):
    """MaxPool1d/2d/3d: winner-take-all through the forward's own indices. When the pooling sits
    on a step with a denominator (conv → ReLU → pool → ...), the division of that step is done
    here, on the pooled (smaller) tensor, and the scatter passes s down (DIVIDED)."""

    sign_preserving = True

    fresh_output = True
    returns_indices = False
    pool = None  # adaptive max pooling: x -> (out, indices)

    def __init__(self, name, dims, kernel_size, stride, padding, dilation, ceil_mode, returns_indices, op):
        super().__init__(name)
        self.dims, self.op = dims, op
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0) else stride
        self.padding, self.dilation, self.ceil_mode = padding, dilation, bool(ceil_mode)
        self.returns_indices = returns_indices
        self.prediv: Optional[int] = None   # the step whose division this pooling takes over
        self.prediv_same_tensor = False     # ... and whose output this pooling reads unchanged

    def forward(self, env, call):
        x = env[self.src]
        if self.pool is not None:
            out, idx = self.pool(x)
        else:
            out, idx = _MAX[self.dims](x, self.kernel_size, self.stride, self.padding, self.dilation,
                                       self.ceil_mode, True)
        # id(x), not x: keeping x alive here would hold a tensor that nothing else needs; the
        # denominator compared against it below is alive, so the ids cannot collide.
        call.saved[self.index] = (tuple(x.shape), out, idx)
        return (out, idx) if self.returns_indices else out

    def relprop(self, msg, call):
        in_shape, out, idx = call.saved[self.index]
        if self.prediv is not None and call.fuse_pools and msg.kind != DIVIDED:
            den = call.denominator(self.prediv)
            if den is not None:
                zd, eps, stabilizer = den
                if self.prediv_same_tensor and zd is call.steps[self.prediv].output_of(call):
                    # The pooling read that very tensor (directly, or through in-place ReLUs): the
                    # pooled values are the denominator at the winners, no gather needed.
                    zg = out
                else:
                    zg = zd.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
                s = divide(msg, zg, eps, stabilizer)
                return [(self.src, Msg(DIVIDED, self._scatter(s, idx, in_shape), self.prediv, True))]
        r = self._scatter(materialize(msg), idx, in_shape)
        return [(self.src, Msg(DENSE, r, None, True))]

    def _scatter(self, r, idx, in_shape):
        if self.pool is not None:  # adaptive: windows of varying size, no stride
            return ops.max_pool_relprop(r, idx, in_shape, where=self.name)
        return ops.max_pool_relprop(r, idx, in_shape, where=self.name, kernel_size=self.kernel_size,
                                    stride=self.stride, padding=self.padding, dilation=self.dilation)

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)


# ============================================================================= relevance passes unchanged


class PassStep(Step):
    """Elementwise activations (ReLU, ReLU6, LeakyReLU, GELU, SiLU, Tanh, Sigmoid, ...), Dropout,
    Identity: relevance passes unchanged (LRP's pass rule). A ReLU runs in place on its input when
    the plan allows it (lrpfast.graph: the input's producer tolerates it and no relevance can
    arrive where the ReLU outputs 0). Passes a DIVIDED message too (max pooling above a layer)."""

    batch_anywhere = True

    def __init__(self, name, fn, args, kwargs, load, op, zero_at_zero, is_relu=False, identity=False):
        super().__init__(name)
        self.fn, self.args, self.kwargs, self.load, self.op = fn, args, kwargs, load, op
        self.zero_at_zero, self.is_relu, self.identity = zero_at_zero, is_relu, identity
        self.preserves_values = identity  # output values == input values (identity, contiguous, ...)
        self.inplace = False
        self.nonnegative_output = False

    def forward(self, env, call):
        if self.identity:
            return env[self.src]
        if self.is_relu:
            x = env[self.src]
            return torch.relu_(x) if self.inplace else torch.relu(x)
        args, kwargs = self.load(env, self.args, self.kwargs)
        return self.fn(*args, **kwargs)

    def relprop(self, msg, call):
        return [(self.src, msg)]

    def recompute(self, call):
        """(an elementwise activation not run in place: fusion.rematerialize checks)"""
        args, kwargs = self.load(RematEnv(call), self.args, self.kwargs)
        return self.fn(*args, **kwargs)

    def zero_preserving(self, plan):
        return (self.identity or self.zero_at_zero) and plan.users_zero_preserving(self.index)


class ReshapeStep(Step):
    """view / reshape / flatten / unflatten / squeeze / unsqueeze / contiguous / nn.Flatten: the
    relevance takes the input's shape back. The batch may be merged with the dims after it and
    split again (window attention: lrpfast/merged_batch.py)."""

    sign_preserving = True

    def __init__(self, name, fn, args, kwargs, load, op):
        super().__init__(name)
        self.fn, self.args, self.kwargs, self.load, self.op = fn, args, kwargs, load, op

    def forward(self, env, call):
        x = env[self.src]
        args, kwargs = self.load(env, self.args, self.kwargs)
        y = self.fn(*args, **kwargs)
        why = "gives no tensor" if not isinstance(y, torch.Tensor) else \
            merged_batch.check_rows(x.shape, y.shape, call.batch)
        if why:
            raise RelevanceError(f"LRP: {self.describe()} turns {tuple(x.shape)} into "
                                 f"{tuple(getattr(y, 'shape', ()))}: {why}")
        call.saved[self.index] = (x, y.shape[0])
        return y

    def relprop(self, msg, call):
        x, n_out = call.saved[self.index]
        n_in, shape = x.shape[0], x.shape[1:]
        if msg.kind == LAZY:
            # The pending factor is the tensor the message was made for (an activation above may
            # have changed it), not this step's input: both take the input's shape back.
            return [(self.src, Msg(LAZY, merged_batch.regroup(msg.a, n_out, n_in, shape),
                                   msg.x.reshape(n_in, *shape), msg.owned))]
        r = materialize(msg)
        return [(self.src, Msg(DENSE, merged_batch.regroup(r, n_out, n_in, shape), None,
                               msg.owned or msg.kind != DENSE))]

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)


class PermuteStep(Step):
    """permute / transpose: relevance permuted back. The batch dimension may move (a
    sequence-first block); the messages stay batch-first on both sides."""

    sign_preserving = True

    batch_anywhere = True

    def __init__(self, name, fn, args, kwargs, load, op, perm_of):
        super().__init__(name)
        self.fn, self.args, self.kwargs, self.load, self.op = fn, args, kwargs, load, op
        self.perm_of = perm_of  # (ndim, args, kwargs) -> permutation

    def forward(self, env, call):
        x = env[self.src]
        args, kwargs = self.load(env, self.args, self.kwargs)
        perm = self.perm_of(x.dim(), args, kwargs)
        d_in = call.bdim.get(self.src, 0)
        d_out = perm.index(d_in)
        if d_out:
            call.bdim[self.index] = d_out
        # batch-first message above -> batch-first message below, as one permutation
        out_layout = list(range(1, d_out + 1)) + [0] + list(range(d_out + 1, len(perm)))  # movedim(0, d_out)
        above = [out_layout[p] for p in [perm.index(i) for i in range(len(perm))]]      # then the inverse
        back = [above[i] for i in [d_in] + [j for j in range(len(perm)) if j != d_in]]    # then movedim(d_in, 0)
        call.saved[self.index] = (call.batch_first(self.src, x), back)
        return x.permute(perm)

    def relprop(self, msg, call):
        x, back = call.saved[self.index]
        if msg.kind == LAZY:   # the pending factor permuted alike (ReshapeStep.relprop)
            return [(self.src, Msg(LAZY, msg.a.permute(back), msg.x.permute(back), msg.owned))]
        r = materialize(msg)
        return [(self.src, Msg(DENSE, r.permute(back), None, msg.owned or msg.kind != DENSE))]

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)


class CatStep(Step):
    """torch.cat along a non-batch dimension: each input gets its slice of the relevance. With the
    batch off dim 0 (a sequence-first transformer prepending a class token: cat(dim=0) of (1, B, E)
    and (L, B, E)), every computed input has it at the same dim; the relevance pass works on
    batch-first views."""

    sign_preserving = True

    op = "cat"
    fresh_output = True
    batch_anywhere = True

    def __init__(self, name, dim, load_list):
        super().__init__(name)
        self.dim, self.load_list = dim, load_list

    def forward(self, env, call):
        xs = self.load_list(env)
        d = self.dim % xs[0].dim()
        bds = {call.bdim.get(i, 0) for i in self.inputs if not isinstance(call.steps[i], ConstStep)}
        if len(bds) > 1:
            raise RelevanceError(f"LRP: {self.describe()} concatenates tensors with the batch at different dims "
                                 f"{sorted(bds)}")
        bd = bds.pop() if bds else 0
        if d == bd:
            raise RelevanceError(f"LRP: {self.describe()} concatenates along the batch dimension")
        y = torch.cat(xs, d)
        if bd:
            call.bdim[self.index] = bd
            xs, d = [x.movedim(bd, 0) for x in xs], _batch_first_dim(d, bd)
        call.saved[self.index] = (xs, d)
        return y

    def relprop(self, msg, call):
        xs, d = call.saved[self.index]
        src = msg.a if msg.kind == LAZY else materialize(msg)
        owned = msg.owned or msg.kind != DENSE
        out, start = [], 0
        for i, x in zip(self.inputs, xs):
            n = x.shape[d]
            part = src.narrow(d, start, n)
            # the pending factor's slice, not the input x (an activation above the cat changes it)
            out.append((i, Msg(LAZY, part, msg.x.narrow(d, start, n), owned) if msg.kind == LAZY
                        else Msg(DENSE, part, None, owned)))
            start += n
        return out

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)


class SplitStep(Step):
    """torch.chunk / torch.split (and the methods): a tuple of views. It carries no relevance
    itself: each element taken from it (x.chunk(2, 1)[0]) is a PieceStep on the source tensor."""

    op = "split"
    # Tensors, not shape arithmetic: what is computed from the pieces must not be taken for a
    # constant (graph.py classifies nodes by their inputs). Relevance never comes here: the
    # pieces send theirs to the source directly.

    batch_anywhere = True   # it only makes the tuple; the pieces check where the batch is
    unbind = False          # torch.unbind: the pieces are selections (SelectStep), not narrow views

    def __init__(self, name, fn, args, kwargs, load, what):
        super().__init__(name)
        self.fn, self.args, self.kwargs, self.load, self.op = fn, args, kwargs, load, what

    def forward(self, env, call):
        args, kwargs = self.load(env, self.args, self.kwargs)
        return self.fn(*args, **kwargs)

    def relprop(self, msg, call):
        return []


class SelectStep(Step):
    """Element `item` of x.unbind(dim) along a non-batch dim: x.select(dim, item). The batch may
    sit elsewhere in x (timm's attention unbinds q, k, v from a (3, B, H, N, D) tensor); the piece
    then has it first again. Relevance goes back into its slice of a map of x's shape."""

    op = "getitem (unbind)"
    batch_anywhere = True
    sign_preserving = True

    def __init__(self, name, split_index, item, dim):
        super().__init__(name)
        self.split_index, self.item, self.dim = split_index, item, dim

    def forward(self, env, call):
        x, parts = env[self.src], env[self.split_index]
        bd = call.bdim.get(self.src, 0)
        d = self.dim % x.dim()
        if d == bd:
            raise RelevanceError(f"LRP: {self.describe()} unbinds the batch dimension")
        call.bdim[self.index] = bd - 1 if d < bd else bd   # explicit, also when 0 (MeanStep)
        call.saved[self.index] = (tuple(call.batch_first(self.src, x).shape[1:]), _batch_first_dim(d, bd))
        return parts[self.item]

    def relprop(self, msg, call):
        shape, d = call.saved[self.index]
        a = materialize(msg)
        full = a.new_zeros((a.shape[0], *shape))
        full.select(d, self.item).copy_(a)
        return [(self.src, Msg(DENSE, full, None, True))]

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)


class PieceStep(Step):
    """Element `item` of a chunk/split of the source x along a non-batch dim: a narrow view of x,
    whose relevance goes back into its place in a map of x's shape (zeros elsewhere)."""

    sign_preserving = True

    op = "getitem (chunk/split)"

    def __init__(self, name, split_index, item, dim):
        super().__init__(name)
        self.split_index, self.item, self.dim = split_index, item, dim

    def forward(self, env, call):
        x, parts = env[self.src], env[self.split_index]
        d = self.dim % x.dim()
        if d == 0:
            raise RelevanceError(f"LRP: {self.describe()} splits along the batch dimension")
        piece = parts[self.item]
        start = sum(p.shape[d] for p in parts[:self.item % len(parts)])
        call.saved[self.index] = (x, d, start)
        return piece

    def relprop(self, msg, call):
        x, d, start = call.saved[self.index]
        # The product pending in a LAZY message is taken on the piece (small) before the scatter:
        # its factor is the tensor the message was made for, which need not be a piece of x.
        a = materialize(msg)
        full = a.new_zeros((a.shape[0], *x.shape[1:]))
        full.narrow(d, start, a.shape[d]).copy_(a)
        return [(self.src, Msg(DENSE, full, None, True))]

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)


class GetItemStep(Step):
    """(output, indices)[0] of a max pooling with return_indices=True."""

    sign_preserving = True

    op = "getitem"
    batch_anywhere = True

    def __init__(self, name, item):
        super().__init__(name)
        self.item = item
        self.tensor_output = True

    def forward(self, env, call):
        return env[self.src][self.item]

    def relprop(self, msg, call):
        return [(self.src, msg)] if self.item == 0 else []

    def zero_preserving(self, plan):
        return self.item != 0 or plan.users_zero_preserving(self.index)


class IndexStep(Step):
    """Basic indexing x[idx] (ints, slices, None, Ellipsis) that keeps the batch dimension whole:
    the relevance is scattered back into zeros of the input's shape (K*B rows; the index's batch
    entry is a full slice, so it applies to the K maps of every sample alike). A pending product
    is taken on the selection first: its factor is the tensor the message was made for, which an
    activation between this step and that layer may have changed (so it is not x[idx])."""

    sign_preserving = True

    op = "getitem (slicing)"
    batch_anywhere = True

    def __init__(self, name, index, load):
        super().__init__(name)
        self.index_arg, self.load = index, load

    def canonical(self, x, idx, d):
        """(idx with one entry per consumed dim, Ellipsis expanded; the output's batch dim),
        checked to keep the batch dim d whole."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        for e in idx:
            if not (e is None or e is Ellipsis or isinstance(e, (slice, int, torch.SymInt))) or isinstance(e, bool):
                raise RelevanceError(f"LRP: {self.describe()} indexes with {type(e).__name__} "
                                     f"({e!r}): advanced (tensor, list or bool) indexing has no relevance rule; "
                                     "only ints, slices, None and ... are supported")
        consumed = sum(1 for e in idx if e is not None and e is not Ellipsis)
        if sum(1 for e in idx if e is Ellipsis) > 1 or consumed > x.dim():
            raise RelevanceError(f"LRP: {self.describe()}: index {idx!r} does not fit a tensor of shape "
                                 f"{tuple(x.shape)}")
        out = []
        for e in idx:
            out.extend([slice(None)] * (x.dim() - consumed) if e is Ellipsis else [e])
        pos = out_dims = 0
        entry, out_bd = slice(None), None
        for j, e in enumerate(out):
            if e is None:
                out_dims += 1
                continue
            if pos == d:
                entry, out_bd = e, out_dims
                out[j] = slice(None)  # all K*B rows of a message, not the forward's B
                break
            out_dims += 0 if isinstance(e, (int, torch.SymInt)) else 1
            pos += 1
        if out_bd is None:  # the batch dim is among the trailing dims the index leaves whole
            out_bd = out_dims + d - pos
        if not (isinstance(entry, slice) and entry.start in (None, 0) and entry.step in (None, 1)
                and (entry.stop is None or entry.stop >= x.shape[d])):
            raise RelevanceError(f"LRP: {self.describe()} indexes {idx!r}, which does not keep the batch dimension "
                                 f"(dim {d}) whole: x[:, ...] is supported")
        return tuple(out), out_bd

    def forward(self, env, call):
        x = env[self.src]
        args, _ = self.load(env, self.index_arg, {})
        d = call.bdim.get(self.src, 0)
        idx, out_bd = self.canonical(x, args[0], d)
        if out_bd:
            call.bdim[self.index] = out_bd
        y = x[idx]
        # everything selected, nothing added or dropped (HF's hidden[:, slice(0, None), :]): the
        # relevance passes as it is
        whole = y.shape == x.shape and len(idx) <= x.dim() and all(
            isinstance(e, slice) and e.start in (None, 0) and e.step in (None, 1) and (e.stop is None or e.stop >= n)
            for e, n in zip(idx, x.shape))
        call.saved[self.index] = (x, idx, d, out_bd, whole)
        return y

    def relprop(self, msg, call):
        x, idx, d, out_bd, whole = call.saved[self.index]
        if whole:
            return [(self.src, msg)]
        a = materialize(msg)   # the pending product on the selection, before the scatter (PieceStep)
        shape = list(x.shape)
        shape[d] = a.shape[0]
        full = a.new_zeros(shape)
        full[idx] = a.movedim(0, out_bd) if out_bd else a
        if d:
            full = full.movedim(d, 0)
        return [(self.src, Msg(DENSE, full, None, True))]

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)


ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
