"""The two contractions of a Linear/Conv layer with weights other than its own, for the LRP rules.

    forward(ctx, x, w, b)    z' = w·x + b with the layer's geometry (stride, padding incl. 'same',
                             dilation, groups): the extra forward of z+/αβ/γ, and the
                             batch-independent denominators of flat/w²/z^B
    transpose(ctx, s, w)     wᵀ s: the input-gradient contraction (ATen's, like autograd's), with
                             K maps per sample and the asymmetric padding of an even-kernel 'same'

Both accept "paired" channels (two branches per channel group, csrc/rule_args.h): the weight's
shape says how many input/output channels there are. `channel_dim(ctx)` is where the channels
sit (1 for convolutions, -1 for Linear) and `pair_groups(ctx)` the groups the pairing follows.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.modules.conv import _ConvNd

from .ops import RelevanceError

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def channel_dim(ctx) -> int:
    return -1 if ctx.kind == "linear" else 1


def pair_groups(ctx) -> int:
    if ctx.kind == "linear":
        return 1
    return int(ctx.module.groups if isinstance(ctx.module, _ConvNd) else ctx.groups or 1)


def _tuple(v, dims: int) -> Tuple[int, ...]:
    return (int(v),) * dims if isinstance(v, int) else tuple(int(i) for i in v)


def geometry(ctx):
    """(stride, padding, dilation, groups) of a convolution context: the module's when it is a
    torch convolution, else the context's fields. padding stays a string ('same' / 'valid')
    when given as one."""
    m, dims = ctx.module, ctx.weight.dim() - 2
    if isinstance(m, _ConvNd):
        if m.padding_mode != "zeros":
            raise RelevanceError(f"{ctx.name}: padding_mode={m.padding_mode!r} is not supported; expected 'zeros'")
        stride, padding, dilation, groups = m.stride, m.padding, m.dilation, m.groups
    else:
        stride, padding, dilation, groups = ctx.stride or 1, ctx.padding, ctx.dilation or 1, ctx.groups or 1
    stride, dilation = _tuple(stride, dims), _tuple(dilation, dims)
    if not isinstance(padding, str):
        padding = _tuple(padding, dims)
    return stride, padding, dilation, int(groups)


def forward(ctx, x: torch.Tensor, w: torch.Tensor, b=None) -> torch.Tensor:
    """The layer's forward with weight w and bias b (b may be None)."""
    if ctx.kind == "linear":
        return F.linear(x, w, b)
    stride, padding, dilation, groups = geometry(ctx)
    return _CONV[w.dim() - 2](x, w, b, stride, padding, dilation, groups)


def _padding_lo_hi(padding, kernel: Sequence[int], dilation: Sequence[int]) -> Tuple[List[int], List[int]]:
    if padding == "valid":
        return [0] * len(kernel), [0] * len(kernel)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        lo = [t // 2 for t in total]
        return lo, [t - l for t, l in zip(total, lo)]
    return list(padding), list(padding)


def transpose(ctx, s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """wᵀ s for s of shape (K*B, *output) with the input's spatial size: the contraction of a
    relevance step. The input channels are w's (w.shape[1] * groups), so paired weights give
    paired results."""
    if ctx.kind == "linear":
        return s.matmul(w)
    stride, padding, dilation, groups = geometry(ctx)
    dims = w.dim() - 2
    lo, hi = _padding_lo_hi(padding, w.shape[2:], dilation)
    symmetric = lo == hi
    spatial = list(ctx.x.shape[2:]) if symmetric else [n + a + b for n, a, b in zip(ctx.x.shape[2:], lo, hi)]
    # The input-gradient kernels read only the sizes (and layout) of the forward input: an
    # empty tensor (never written) stands for it, for any number of maps per sample.
    shape = (s.shape[0], w.shape[1] * groups, *spatial)
    # When x itself has that shape (one map per sample, unpaired), pass x, like autograd does: a
    # fresh input-sized allocation per layer perturbs the CPU heap into page faults (the seed
    # CNN's second conv: 11.6 ms -> 13.8 ms per input-gradient at batch 64).
    like = ctx.x if tuple(ctx.x.shape) == shape else s.new_empty(shape)
    c = torch.ops.aten.convolution_backward(
        s, like, w, None, list(stride), lo if symmetric else [0] * dims, list(dilation), False, [0] * dims, groups,
        [True, False, False])[0]
    if symmetric:
        return c
    # Even-kernel 'same': the forward padded asymmetrically; crop the padded borders (their x is 0).
    return c[(slice(None), slice(None)) + tuple(slice(a, a + n) for a, n in zip(lo, ctx.x.shape[2:]))]
