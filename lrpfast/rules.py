"""LRP rules for the layers with parameters (Linear, Conv1d/2d/3d).

A rule turns the relevance r at a layer's output into the relevance at its input, given the
layer's cached forward (x, z) and parameters, wrapped in a LayerContext. The whole-model pass
(lrpfast.lrp) asks its composite which rule each layer gets; Epsilon is the default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from . import ops
from .ops import DEFAULT_EPS


@dataclass
class LayerContext:
    """One layer's relevance step inputs. `forward(x, w, b)` recomputes the layer with other
    parameters or inputs (same geometry): the rules that modify W or x need it."""

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv"
    x: torch.Tensor
    z: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    stride: Tuple[int, ...] = ()
    padding: object = 0
    dilation: Tuple[int, ...] = ()
    groups: int = 1
    is_first: bool = False  # the layer that sees the model input
    x_nonnegative: bool = False  # x comes out of a ReLU: x- = 0 (DESIGN.md §2 shortcut)
    cache: dict = field(default_factory=dict)  # per-layer cache the rule may fill (modified weights)

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        if self.kind == "linear":
            return torch.nn.functional.linear(x, w, b)
        return self.module._conv_forward(x, w, b)

    def epsilon_step(self, r, x, z, w, eps: float, stabilizer: str) -> torch.Tensor:
        """x ⊙ wᵀ(r / stab(z)) with this layer's geometry, through the fused ops."""
        if self.kind == "linear":
            return ops.linear_relprop(r, x, z, w, eps, stabilizer, where=self.name)
        return ops.conv_relprop(r, x, z, w, self.stride, self.padding, self.dilation, self.groups, eps,
                                stabilizer, where=self.name)


class Rule:
    """Base class: subclasses implement relprop(ctx, r)."""

    def relprop(self, ctx: LayerContext, r: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def denominator(self, ctx: LayerContext) -> Optional[Tuple[torch.Tensor, float, str]]:
        """(z', eps, stabilizer) when the rule's first step is exactly stab_div(r, z', eps,
        stabilizer) followed by `relprop_from_s`; the whole-model pass then fuses that division
        with the layer above (mul_stab_div). None: no such fusion."""
        return None

    def relprop_from_s(self, ctx: LayerContext, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Epsilon(Rule):
    """ε rule: R_in = x ⊙ Wᵀ(r / stab(z)). eps = 0 is LRP-0."""

    def __init__(self, eps: float = DEFAULT_EPS, stabilizer: str = "sign"):
        ops.check_stabilizer("Epsilon", eps, stabilizer)
        self.eps, self.stabilizer = float(eps), stabilizer

    def relprop(self, ctx, r):
        return ctx.epsilon_step(r, ctx.x, ctx.z, ctx.weight, self.eps, self.stabilizer)

    def denominator(self, ctx):
        return ctx.z, self.eps, self.stabilizer

    def relprop_from_s(self, ctx, s):
        # s already divided: only the contraction and the product with x remain. eps=0 and a
        # z of ones make stab_div the identity; cheaper: the contraction directly.
        if ctx.kind == "linear":
            c = s.matmul(ctx.weight)
        else:
            c = torch.ops.aten.convolution_backward(
                s, ctx.x if s.shape[0] == ctx.x.shape[0] else ctx.x.new_empty((s.shape[0], *ctx.x.shape[1:])),
                ctx.weight, None, list(ctx.stride), list(ctx.padding), list(ctx.dilation), False,
                [0] * (ctx.weight.dim() - 2), ctx.groups, [True, False, False])[0]
        return ops.mul_input(c, ctx.x)

    def __repr__(self):
        return f"Epsilon(eps={self.eps}, stabilizer={self.stabilizer!r})"
