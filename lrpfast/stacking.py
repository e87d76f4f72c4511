"""torch.stack: each input gets its slice of the relevance (as torch.cat's pieces, nodes.CatStep).

The new dim may come before the batch: an ensemble of heads, torch.stack([head(x) for head in
heads]).sum(0) (timm's CrossViT and EfficientViM), stacks (B, C) logits into (n, B, C). The
samples stay apart, only the batch moves to dim 1 (Call.bdim, lrpfast/nodes/messages.py); the steps after it that
accept the batch anywhere (a mean or sum over the heads, another stack, ...) follow it, and the
model's output must have it first again. Messages are batch-first whatever the layout, so the
relevance of input j is the message's slice j along the stacked dim in that layout.
"""
from __future__ import annotations

import torch

from .nodes import DENSE, LAZY, ConstStep, Msg, Step, _batch_first_dim, materialize
from .ops import RelevanceError


class StackStep(Step):
    sign_preserving = True

    op = "stack"
    fresh_output = True
    batch_anywhere = True

    def __init__(self, name, dim, load_list):
        super().__init__(name)
        self.dim, self.load_list = dim, load_list

    def forward(self, env, call):
        xs = self.load_list(env)
        bds = {call.bdim.get(i, 0) for i in self.inputs if not isinstance(call.steps[i], ConstStep)}
        if len(bds) > 1:
            raise RelevanceError(f"LRP: {self.describe()} stacks tensors with the batch at different dims {sorted(bds)}")
        bd = bds.pop() if bds else 0
        d = self.dim % (xs[0].dim() + 1)
        y = torch.stack(xs, d)
        out_bd = bd + 1 if d <= bd else bd
        if out_bd:
            call.bdim[self.index] = out_bd
        call.saved[self.index] = _batch_first_dim(d, out_bd)   # the stacked dim, batch first
        return y

    def relprop(self, msg, call):
        d = call.saved[self.index]
        src = msg.a if msg.kind == LAZY else materialize(msg)
        owned = msg.owned or msg.kind != DENSE
        return [(i, Msg(LAZY, src.select(d, j), msg.x.select(d, j), owned) if msg.kind == LAZY
                 else Msg(DENSE, src.select(d, j), None, owned))
                for j, i in enumerate(self.inputs) if not isinstance(call.steps[i], ConstStep)]

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)
