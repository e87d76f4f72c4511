"""In-place writes on computed tensors: an op that rewrites the whole tensor (x.add_(y), x.mul_(2),
x.masked_fill_(m, 0), x += y) is traced as its out-of-place twin, a write that keeps part of it
(t[:, i] = v, t.copy_(v), t.fill_(c)) as `written(dst, method, ...)` with a COPY rule
(lrpfast/shape_trace.py, lrpfast/op_rules.py's WRITES); later uses of the tensor read the new value,
in the shape-agnostic trace and in the per-shape one.

Each model writes into a tensor computed from the input, as timm's MViTv2 (`attn[:, :, 1:, 1:] =
attn[:, :, 1:, 1:] + rel`) and NaFlexViT (`x.add_(pos_embed)`) do. In float64 at eps = 0 the map
must equal gradient x input of the unmodified model (lrpfast.oracle: autograd runs the model's own
in-place ops), and the logits the model's. Writes that would mix the samples are refused with the
node named.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lrpfast
from lrpfast.ops import RelevanceError
from lrpfast.oracle import gradient_oracle

F64 = torch.float64


class Writer(nn.Module):
    """x -> Linear -> (the write `variant` names) -> ReLU -> Linear: logits (B, 5)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 8)
        self.head = nn.Linear(8, 5)
        self.register_buffer("pos", torch.randn(8))
        self.register_buffer("mask", torch.rand(8) < 0.4)

    def forward(self, x):
        y = self.a(x)
        v = self.variant
        if v == "slice_sum":          # MViTv2: part of a computed tensor replaced by a sum involving it
            y[:, 2:] = y[:, 2:] * 2.0 + self.b(x)[:, 2:]
        elif v == "slice_const":      # a constant written over part of it: that part carries none
            y[:, :3] = self.pos[:3]
        elif v == "add_const":        # NaFlexViT: a constant added in place (it absorbs its share)
            y.add_(self.pos)
        elif v == "add_computed":     # a sum of two computed tensors, in place
            y.add_(self.b(x))
        elif v == "iadd":             # augmented assignment on a traced tensor
            y += self.b(x)
            y *= 0.5
        elif v == "masked_fill":
            y.masked_fill_(self.mask, 0.0)
        elif v == "fill_part":        # a part of y filled with a number (written: COPY)
            y[:, 1:3] = 0.5
        elif v == "relu_":            # an in-place activation method: the activation's rule
            y.relu_()
        elif v == "scale":
            y.mul_(3.0).div_(2.0)
        elif v == "copy":             # overwritten entirely by another computed tensor
            y.copy_(self.b(x))
        # refused ones
        elif v == "batch_row":        # one sample's row overwritten: the samples no longer alike
            y[0] = 0.0
        elif v == "view_write":       # a write into a view of y does not reach y in the trace: refused
            y[:, :2].add_(1.0)
        return self.head(torch.relu(y))


EXPLAINED = ["slice_sum", "slice_const", "add_const", "add_computed", "iadd", "masked_fill", "fill_part", "relu_",
             "scale", "copy"]


def _model(variant):
    torch.manual_seed(0)
    return Writer(variant).to(F64).eval()


@pytest.mark.parametrize("variant", EXPLAINED)
def test_write_equals_the_oracle(variant):
    model = _model(variant)
    x = torch.randn(4, 6, dtype=F64)
    e = lrpfast.LRP(model, eps=0.0).explain(x)
    with torch.no_grad():
        want = model(x.clone())
    assert torch.allclose(e.logits, want, rtol=0, atol=1e-12)
    ref = gradient_oracle(model, x, e.targets)
    err = ((e.relevance - ref).norm() / ref.norm()).item()
    assert err < 1e-10, err
    # each sample alone gets the same map (the batch stays apart through the write)
    one = lrpfast.LRP(model, eps=0.0)(x[2:3], e.targets[2:3])
    assert torch.allclose(one, e.relevance[2:3], rtol=0, atol=1e-12)


def test_written_region_of_a_constant_carries_nothing():
    """slice_const: the entries overwritten by the constant lose their relevance: the map equals the
    same model with those weights of `a` set to zero (another way to compute it)."""
    model = _model("slice_const")
    x = torch.randn(3, 6, dtype=F64)
    t = torch.tensor([0, 1, 2])
    got = lrpfast.LRP(model, eps=0.0)(x, t)
    cut = _model("add_const")
    with torch.no_grad():
        cut.a.weight[:3] = 0.0
        cut.a.bias[:3] = 0.0
        cut.pos.zero_()
        cut.pos[:3] = model.pos[:3]   # the same values after the write
    ref = gradient_oracle(cut, x, t)
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_in_place_sum_takes_the_epsilon_rule(eps):
    """add_computed at eps > 0: y.add_(b(x)) is the sum's ε step: the map equals the out-of-place
    model's."""

    class OutOfPlace(Writer):
        def forward(self, x):
            return self.head(torch.relu(self.a(x) + self.b(x)))

    model = _model("add_computed")
    twin = OutOfPlace("none").to(F64).eval()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(3, 6, dtype=F64)
    t = torch.tensor([4, 0, 2])
    got = lrpfast.LRP(model, eps=eps)(x, t)
    ref = lrpfast.LRP(twin, eps=eps)(x, t)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant, why", [("batch_row", "written.*dim 0"), ("view_write", "does not reproduce")])
def test_writes_that_mix_or_get_lost_are_refused(variant, why):
    model = _model(variant)
    with pytest.raises(RelevanceError, match=why):
        lrpfast.LRP(model, eps=0.0)(torch.randn(3, 6, dtype=F64))
