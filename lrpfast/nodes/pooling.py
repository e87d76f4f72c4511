"""Pooling and means: average pooling and means by the ε rule, max pooling winner-take-all.
"""
from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F

from .. import _fallback, ops
from ..ops import RelevanceError
from .base import Step, _batch_first_dim, _EpsilonStep
from .messages import DENSE, DIVIDED, LAZY, Msg, divide, materialize

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
