"""Layers with weights: Linear/Conv (ContractionStep, any rule) and a BatchNorm that cannot be
folded into the layer before it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import canonize
from ..ops import RelevanceError
from ..rules import Epsilon, LayerContext
from .base import Step, _EpsilonStep
from .messages import DENSE, DIVIDED, LAZY, Msg, divide, materialize
from .remat import LATER, value

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
